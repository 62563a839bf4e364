"""Profile the l2v side (torch.profiler) of the encode and MNTP-step paths, plus SDPA micro-benchmarks.

    python bench/profile_l2v.py [--what encode,mntp,sdpa]

Writes bench/results/profile_<path>.txt (top ops by self CPU time) and profile_sdpa.json. Not a pass/fail
figure: it is what the suggestions in docs/performance.md are based on.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import DEMO_MODEL, RESULTS, THREADS, masked_batch, read_stsb_sentences  # noqa: E402


def table(prof, n=25):
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=60)


def profile_encode(dtype):
    from l2v.encoder import Encoder
    enc = Encoder.from_pretrained(DEMO_MODEL, is_causal=False, dtype=dtype, pooling="mean")
    sents = read_stsb_sentences(limit=320)
    enc.encode(sents[:32], batch_size=32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        enc.encode(sents, batch_size=32)
    return table(prof)


def profile_mntp(variant):
    from bench_train import token_stream
    from l2v.checkpoint import load_model
    from l2v.lora import add_lora, lora_parameters
    from l2v.objectives import mntp_loss
    ids, _ = token_stream(DEMO_MODEL, 4 * 512)
    masked, labels = (torch.from_numpy(a) for a in masked_batch(ids.reshape(4, 512), seed=0))
    model = load_model(DEMO_MODEL, dtype="bfloat16" if variant == "bf16w" else "float32", is_causal=False)
    add_lora(model, r=16, alpha=32, dropout=0.05)
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if variant != "fp32" else contextlib.nullcontext()

    def step():
        with amp:
            loss = mntp_loss(model, masked, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return table(prof)


def bench_sdpa(B, H, K, T, hd, dtype, backward, reps=5):
    """Median seconds of one SDPA call (+ backward) for each way of expressing bidirectional GQA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, K, T, hd, generator=g).to(dtype) for _ in range(2))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, T // 2:] = False  # one padded row: the masked variants need a real mask
    bool_mask = (pad[:, None, None, :] | torch.eye(T, dtype=torch.bool))  # (B, 1, T, T), as build_mask
    float_mask = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~bool_mask, torch.finfo(dtype).min)
    rep = H // K
    variants = {
        "no_mask+enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "no_mask+repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)),
        "bool_mask+enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask,
                                                                                enable_gqa=True),
        "bool_mask+repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bool_mask),
        "float_mask+repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=float_mask),
    }
    out = {}
    for name, fn in variants.items():
        ts = []
        for i in range(reps + 1):
            qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
            t0 = time.perf_counter()
            y = fn(qq, kk, vv)
            if backward:
                y.float().sum().backward()
            if i:
                ts.append(time.perf_counter() - t0)
        out[name] = float(np.median(ts))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="sdpa,encode,mntp")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(exist_ok=True)
    what = args.what.split(",")
    if "sdpa" in what:
        res = {}
        for label, shape, bwd in (("encode_b32_t24", (32, 9, 3, 24, 64), False),
                                  ("encode_b32_t64", (32, 9, 3, 64, 64), False),
                                  ("mntp_b4_t512_fwd_bwd", (4, 9, 3, 512, 64), True)):
            for dtype in (torch.float32, torch.bfloat16):
                key = f"{label}_{str(dtype)[6:]}"
                res[key] = bench_sdpa(*shape, dtype, bwd)
                print(key, {k: f"{v * 1e3:.2f} ms" for k, v in res[key].items()}, flush=True)
        (RESULTS / "profile_sdpa.json").write_text(json.dumps(res, indent=2) + "\n")
    for path, arg in (("encode", "float32"), ("encode", "bfloat16"), ("mntp", "fp32"), ("mntp", "bf16w"),
                      ("mntp", "autocast")):
        if path in what:
            t = (profile_encode if path == "encode" else profile_mntp)(arg)
            (RESULTS / f"profile_{path}_{arg}.txt").write_text(t)
            print(f"== {path} {arg}\n" + "\n".join(t.splitlines()[:22]), flush=True)


if __name__ == "__main__":
    main()
