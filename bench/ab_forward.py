"""Same-process A/B of one bidirectional forward (encode batch): l2v fp32, l2v bf16, upstream fp32.

    bench/.peer-venv/bin/python bench/ab_forward.py        (needs l2v importable from the repo root)

Both models live in one process and the calls alternate, so machine load hits all three alike: the
most load-robust encode comparison on a shared machine. Padding: 8 of 32 rows padded by a third
(right padding for l2v, left for upstream, as each encoder does).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import DEMO_MODEL, RESULTS, pin_threads  # noqa: E402


def main(reps=7):
    pin_threads()
    from l2v.checkpoint import load_model
    from llm2vec.models.bidirectional_llama import LlamaBiModel
    models = {"l2v_fp32": load_model(DEMO_MODEL, is_causal=False),
              "l2v_bf16": load_model(DEMO_MODEL, dtype="bfloat16", is_causal=False),
              "peer_fp32": LlamaBiModel.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32).eval()}
    out = {}
    for B, T in ((32, 13), (32, 40)):
        ids = torch.randint(100, 40000, (B, T), generator=torch.Generator().manual_seed(0))
        left = torch.ones(B, T, dtype=torch.long)
        left[:8, :T // 3] = 0
        right = left.flip(1)
        calls = {"l2v_fp32": lambda: models["l2v_fp32"](ids, right),
                 "l2v_bf16": lambda: models["l2v_bf16"](ids, right),
                 "peer_fp32": lambda: models["peer_fp32"](input_ids=ids, attention_mask=left)}
        ts = {k: [] for k in calls}
        with torch.inference_mode():
            for i in range(reps + 1):
                for k, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    if i:
                        ts[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        out[f"B{B}_T{T}"] = med
        print(f"B={B} T={T}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items())
              + f"; l2v fp32 {med['peer_fp32'] / med['l2v_fp32']:.2f}x, l2v bf16 {med['peer_fp32'] / med['l2v_bf16']:.2f}x"
              " vs upstream fp32", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ab_forward.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
