"""The worker loop both sides share; stdlib, numpy and torch only, so upstream's environment runs it too.

A worker reads the JSON spec run.py wrote (argv[1]), loads its model once, runs the spec's figures in order
and prints one line `RESULT {json}`. A figure that fails (e.g. out of GPU memory) is recorded; the next
runs."""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of fn after `warmup` untimed calls; queued CUDA work is waited for at both ends."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def train(loss_fn, params, spec: dict, device: torch.device, backward: bool = True) -> dict:
    """The training step both sides time: forward (under bf16 autocast if the spec says so), backward, AdamW.
    backward=False: loss_fn runs its own backward (a whole accumulated step) and returns the loss."""
    opt, losses = torch.optim.AdamW(params, lr=1e-4), []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["autocast"] is not None):
            loss = loss_fn()
        if backward:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return dict(times=timed(step, spec["warmup"], spec["steps"], device), losses=losses)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """The measured matmul peak (median of n x n x n products): MFU's denominator."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / sorted(timed(lambda: a @ b, 1, reps, device))[reps // 2] / 1e12


def peak_mb(device: torch.device) -> float:
    """Peak CUDA memory since the last reset, or on the CPU this process's peak RSS (Linux counts KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(load, figures: dict) -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    spec["data"], device = json.loads(Path(spec["inputs"]).read_text()), torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    state = load(spec, device)
    sync(device)
    out = {"load": {"s": time.perf_counter() - t0, "peak_mem_mb": peak_mb(device)}}
    for name in spec["figures"]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            out[name] = figures[name](state, spec, device)
        except Exception as e:  # recorded, and the next figure runs
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[name]["peak_mem_mb"] = peak_mb(device)
    print("RESULT " + json.dumps(out), flush=True)
