"""Encode figure: STS-B test sentences, batch 32, mean pooling, bidirectional; l2v vs llm2vec 0.2.3.

    python bench/bench_encode.py [--limit 1000] [--repeats 3] [--no-full]

One full-set run per side (2,758 sentences, no warm-up: the whole-process figure and the cosines),
then `--repeats` rounds on the first `--limit` sentences after a 32-sentence warm-up, alternating
l2v fp32 / upstream fp32 / l2v bf16 so that all three see similar machine load; medians are reported.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_MODEL, PEER_PYTHON, RESULTS, line, median, run_worker, save_results  # noqa: E402


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def round_(tmp, tag, limit, warmup, peer=True):
    out = {"l2v_fp32": run_worker(sys.executable, "l2v_encode.py", DEMO_MODEL, "float32", limit, warmup,
                                  f"{tmp}/l2v_fp32_{tag}.npy")}
    if peer:
        out["peer_fp32"] = run_worker(PEER_PYTHON, "peer_encode.py", DEMO_MODEL, limit, warmup,
                                      f"{tmp}/peer_fp32_{tag}.npy")
    out["l2v_bf16"] = run_worker(sys.executable, "l2v_encode.py", DEMO_MODEL, "bfloat16", limit, warmup,
                                 f"{tmp}/l2v_bf16_{tag}.npy")
    for k, r in out.items():
        print(f"  [{tag}] {k}: {r['n'] / r['encode_s']:.1f} sent/s encode-only, "
              f"{r['process_wall_s']:.1f} s process, {r['peak_rss_mb']:.0f} MB", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full", action="store_true")
    args = ap.parse_args()
    res = dict(limit=args.limit, repeats=args.repeats, batch_size=32, pooling="mean", rounds=[])
    prev = RESULTS / "encode.json"
    if args.no_full and prev.is_file():  # keep the earlier full-set run (it takes the longest)
        old = json.loads(prev.read_text())
        res.update({k: old[k] for k in ("full", "cosine_l2v_vs_upstream_fp32", "cosine_l2v_bf16_vs_l2v_fp32") if k in old})
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_full:
            full = round_(tmp, "full", 0, 0)
            res["full"] = full
            cos = cosines(np.load(f"{tmp}/l2v_fp32_full.npy"), np.load(f"{tmp}/peer_fp32_full.npy"))
            cos16 = cosines(np.load(f"{tmp}/l2v_bf16_full.npy"), np.load(f"{tmp}/l2v_fp32_full.npy"))
            res["cosine_l2v_vs_upstream_fp32"] = dict(min=float(cos.min()), mean=float(cos.mean()))
            res["cosine_l2v_bf16_vs_l2v_fp32"] = dict(min=float(cos16.min()), mean=float(cos16.mean()))
        for i in range(args.repeats):
            res["rounds"].append(round_(tmp, f"r{i}", args.limit, 32))
    lines = []
    if res["rounds"]:
        rate = {k: median([r[k]["n"] / r[k]["encode_s"] for r in res["rounds"]]) for k in res["rounds"][0]}
        tok = {k: median([r[k]["tokens"] / r[k]["encode_s"] for r in res["rounds"]]) for k in res["rounds"][0]}
        rss = {k: median([r[k]["peak_rss_mb"] for r in res["rounds"]]) for k in res["rounds"][0]}
        res["median"] = dict(sentences_per_s=rate, tokens_per_s=tok, peak_rss_mb=rss)
        n = f"first {args.limit}" if args.limit else "all"
        lines += [line(f"encode fp32 sentences/s ({n}, median)", rate["l2v_fp32"], rate["peer_fp32"], "sent/s"),
                  line("encode fp32 tokens/s", tok["l2v_fp32"], tok["peer_fp32"], "tok/s"),
                  line("encode bf16 sentences/s vs upstream fp32", rate["l2v_bf16"], rate["peer_fp32"], "sent/s"),
                  line("encode fp32 peak RSS", rss["l2v_fp32"], rss["peer_fp32"], "MB", higher_is_better=False)]
    if "full" in res:
        f = res["full"]
        lines += [line("encode fp32 full set, encode-only", f["l2v_fp32"]["n"] / f["l2v_fp32"]["encode_s"],
                       f["peer_fp32"]["n"] / f["peer_fp32"]["encode_s"], "sent/s"),
                  line("encode fp32 full set, whole process", f["l2v_fp32"]["n"] / f["l2v_fp32"]["process_wall_s"],
                       f["peer_fp32"]["n"] / f["peer_fp32"]["process_wall_s"], "sent/s"),
                  line("encode bf16 full set, whole process vs up fp32",
                       f["l2v_bf16"]["n"] / f["l2v_bf16"]["process_wall_s"],
                       f["peer_fp32"]["n"] / f["peer_fp32"]["process_wall_s"], "sent/s"),
                  f"{'cosine l2v fp32 vs upstream fp32 (min)':<44} {res['cosine_l2v_vs_upstream_fp32']['min']:.6f}",
                  f"{'cosine l2v bf16 vs l2v fp32 (min)':<44} {res['cosine_l2v_bf16_vs_l2v_fp32']['min']:.6f}"]
    print("\n".join(lines))
    res["lines"] = lines
    print("wrote", save_results("encode", res))


if __name__ == "__main__":
    main()
