"""Which attention path for soft-capped scores (Gemma 2): SDPA cannot soft-cap, so the candidates are
l2v's plain math (`l2v.model.softcapped_attention`) and FlexAttention with a `score_mod`, eager or compiled;
SDPA with the same boolean mask (no cap) is the reference speed, the path of every other family.

One attention layer at Gemma-2-9B's head shapes on packed rows (two texts per row, a sliding window, the
l2v mask of `build_mask`), forward alone (encoding) and forward + backward (training), float32 and bf16
autocast. Reports the median time, the bytes autograd keeps for the backward, and each path's largest
difference from the math path. docs/performance.md ("Attention paths per family") has this CPU's table.

    OMP_NUM_THREADS=2 python bench/attention_paths.py            # add --device cuda on a GPU
    python bench/attention_paths.py --tokens 256 --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# A fresh compile cache: the compiled path's first call then shows what compiling costs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from l2v.model import build_mask, softcapped_attention  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for fn's backward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def timed(fn, reps: int, sync, clock) -> float:
    fn()  # warm-up (and, for the compiled path, compilation: timed apart)
    times = []
    for _ in range(reps):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time, steadier than wall time on a machine others share",
    )
    p.add_argument("--paths", default="sdpa,math,flex_eager,flex_compiled")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    flex = any(name.startswith("flex") for name in args.paths.split(","))
    if flex:  # imports the compiler stack: only when asked for
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled_flex = torch.compile(flex_attention)
    B, T, H, K, D, cap = args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim, args.softcap
    scale = 1 / D**0.5
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(B, n, T, D, generator=g).to(dev) for n in (H, K, K))
    segments = torch.ones(B, T, dtype=torch.long, device=dev)
    segments[:, T // 3 :] = 2  # two texts per row
    segments[1:, -T // 8 :] = 0  # padding at the end of the other rows
    rows = []
    for is_causal in (False, True):
        mask = build_mask(segments, is_causal, args.window, T, dev)  # (B, 1, T, T)
        reach = args.window - 1 if is_causal else args.window // 2

        def mask_mod(b, h, qi, ki, causal=is_causal, reach=reach):
            same = (segments[b, qi] == segments[b, ki]) & (segments[b, ki] > 0) & ((qi - ki).abs() <= reach)
            return (same & (qi >= ki) if causal else same) | (qi == ki)

        block = create_block_mask(mask_mod, B, None, T, T, device=dev) if flex else None

        def score_mod(s, b, h, qi, ki):
            return torch.tanh(s / cap) * cap

        flex_kw = dict(score_mod=score_mod, block_mask=block, scale=scale, enable_gqa=True)
        paths = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            ),
            "math": lambda q, k, v: softcapped_attention(q, k, v, mask, is_causal, scale, cap, 0.0),
            "flex_eager": lambda q, k, v: flex_attention(q, k, v, **flex_kw),
            "flex_compiled": lambda q, k, v: compiled_flex(q, k, v, **flex_kw),
        }
        for amp in (None, torch.bfloat16):
            ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else contextlib.nullcontext
            with torch.no_grad(), ctx():
                ref = paths["math"](q0, k0, v0).float()
            for name in args.paths.split(","):
                attn = paths[name]
                leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
                # Under autocast the projections would hand attention bf16 q/k/v: cast them as they would be.
                inputs = (lambda: [t.to(amp) for t in leaves]) if amp else (lambda: leaves)

                def fwd():  # detached: FlexAttention on the CPU refuses inputs that require grad
                    with torch.no_grad(), ctx():
                        return attn(*[t.detach() for t in inputs()])

                def fwd_bwd():
                    with ctx():
                        out = attn(*inputs())
                    out.float().pow(2).mean().backward()

                row = dict(path=name, causal=is_causal, dtype=str(amp or "float32").removeprefix("torch."))
                rows.append(row)
                if name == "flex_compiled":
                    torch._dynamo.reset()  # compile afresh per setting: no cached or fallen-back call
                t0 = time.perf_counter()
                try:
                    out = fwd()
                except Exception as e:  # a path this torch cannot run here: say so, keep the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                row["forward_ms"] = round(1e3 * timed(fwd, args.reps, sync, clock), 2)
                row["max_diff_vs_math"] = float((out.float() - ref).abs().max()) if name != "sdpa" else None
                try:
                    with ctx():
                        row["kept_mb"] = round(saved_bytes(lambda: attn(*inputs())) / 2**20, 1)
                    row["forward_backward_ms"] = round(1e3 * timed(fwd_bwd, args.reps, sync, clock), 2)
                except Exception as e:  # FlexAttention has no CPU backward
                    row["backward_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                print(json.dumps(row), flush=True)
    print(
        f"\n{B} x {T} tokens, {H} heads ({K} KV) x {D}, window {args.window}, soft-cap {cap}, "
        f"{args.device}, {torch.get_num_threads()} threads, {args.clock} time, torch {torch.__version__}\n"
    )
    print(
        "| path | attention | dtype | forward ms | fwd+bwd ms | kept for backward MB | first call s "
        "| max diff vs math |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        attention = "causal" if r["causal"] else "bidirectional"
        if "error" in r:
            print(f"| {r['path']} | {attention} | {r['dtype']} | {r['error']} | | | | |")
            continue
        diff = "-" if r["max_diff_vs_math"] is None else f"{r['max_diff_vs_math']:.1e}"
        bwd = r.get("forward_backward_ms", "no backward")
        print(
            f"| {r['path']} | {attention} | {r['dtype']} | {r['forward_ms']} | {bwd} | "
            f"{r.get('kept_mb', '-')} | {r['first_call_s']} | {diff} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(args=vars(args), threads=torch.get_num_threads(), torch=torch.__version__, rows=rows),
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
