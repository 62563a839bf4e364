"""Measured matmul peak of this machine: n x n x n torch.mm in fp32 and bf16, 2 threads, median of reps.

    python bench/matmul_peak.py [N] [REPS]
"""
import sys
import time

import torch

from common import emit, pin_threads


def main(n=4096, reps=5):
    pin_threads()
    n, reps = int(n), int(reps)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up (oneDNN/BLAS kernel selection, page faults)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        out[name] = dict(times=ts, median_gflops=2 * n**3 / ts[len(ts) // 2] / 1e9, best_gflops=2 * n**3 / ts[0] / 1e9)
    emit(dict(n=n, reps=reps, **out))


if __name__ == "__main__":
    main(*sys.argv[1:])
