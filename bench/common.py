"""Helpers shared by the bench drivers and BOTH sides' worker scripts.

Imports only the stdlib, numpy and torch, so the peer venv (llm2vec + transformers 4.44) can import it
too. Every worker is its own process: its peak RSS is its own, and the two sides never share a heap.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED = ROOT.parent / "shared"
DEMO_MODEL = ROOT / "models" / "smollm2-135m-instruct"
STSB_TEST = SHARED / "data" / "stsbenchmark" / "sts-test.csv"
RESULTS = BENCH / "results"
PEER_PYTHON = BENCH / ".peer-venv" / "bin" / "python"
THREADS = 2
MASK_ID = 79  # '_' in the SmolLM2 vocabulary: llm2vec's "blank" mask token for this tokenizer


def pin_threads(n: int = THREADS) -> None:
    """Same intra-op thread count on both sides (OMP_NUM_THREADS is also set by `run_worker`)."""
    import torch
    torch.set_num_threads(n)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_stsb_sentences(path=STSB_TEST, limit: int | None = None) -> list[str]:
    """Fields 5 and 6 of every line, split on tabs (no CSV quoting: sentences hold literal quotes)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            out += [fields[5], fields[6]]
    return out[:limit] if limit else out


def emit(result: dict) -> None:
    """Last stdout line of a worker: one JSON object the driver parses."""
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(python, script: str, *args) -> dict:
    """Run bench/<script> in a fresh process with pinned threads; return its JSON plus wall time."""
    # OMP_WAIT_POLICY=PASSIVE: on a shared, oversubscribed machine OpenMP's default spin-waiting at
    # every parallel region's barrier made a 2-thread encode 7.6x slower (45 s vs 6 s for 128 sentences).
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT)  # l2v side imports l2v; the peer side only needs bench/common.py
    t0 = time.perf_counter()
    p = subprocess.run([str(python), str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {' '.join(map(str, args))} failed (rc {p.returncode}):\n"
                           f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = round(wall, 3)
    return out


def timed_steps(loss_fn, opt, warmup: int, steps: int, amp=None) -> tuple[list[float], list[float]]:
    """The training-step timing loop both sides share: (seconds per timed step, every step's loss)."""
    import contextlib
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with amp if amp is not None else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
    return times, losses


def median(xs):
    return statistics.median(xs)


def save_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = dict(data, machine=machine_info())
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def machine_info() -> dict:
    import platform
    import torch
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=THREADS,
                torch=torch.__version__, avx512_bf16="avx512_bf16" in flags, amx="amx_bf16" in flags)


def line(figure: str, l2v, peer, unit: str, higher_is_better: bool = True) -> str:
    """One printed line per figure: l2v, peer, ratio (ratio > 1 means l2v is better)."""
    if peer in (None, 0):
        return f"{figure:<44} l2v {l2v:>10.3f} {unit:<10} peer {'-':>10}"
    ratio = l2v / peer if higher_is_better else peer / l2v
    return f"{figure:<44} l2v {l2v:>10.3f} {unit:<10} peer {peer:>10.3f}   ratio {ratio:6.2f}x"


def masked_batch(ids, seed: int = 0, probability: float = 0.2, mask_id: int = MASK_ID):
    """ids (B, T) int64 numpy -> (masked_ids, labels). Exactly round(p * (T-1)) positions per row are
    replaced by `mask_id` (100%, llm2vec's all-mask style); position 0 is never masked (no t-1)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    B, T = ids.shape
    masked, labels = ids.copy(), np.full_like(ids, -100)
    k = int(round(probability * (T - 1)))
    for b in range(B):
        pos = rng.choice(np.arange(1, T), size=k, replace=False)
        labels[b, pos] = ids[b, pos]
        masked[b, pos] = mask_id
    return masked, labels
