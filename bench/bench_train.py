"""Train-step figures: MNTP (4 x 512, 20% masked with '_') and SimCSE (64 x 64) steps, LoRA r=16 on all
seven projections, l2v vs upstream (llm2vec's bidirectional Llama + peft, fp32).

    python bench/bench_train.py [--warmup 1] [--steps 3] [--only mntp|simcse] [--skip-peer-ckpt]

The masked MNTP batch and the SimCSE batch are built once here (numpy, fixed seeds) and fed to both
sides from an .npz file. Each configuration is a fresh process (its own peak RSS); l2v and upstream
processes alternate. Reported: median s/step over the timed steps, tokens/s, peak RSS.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_MODEL, PEER_PYTHON, RESULTS, line, masked_batch, median, read_stsb_sentences, run_worker, save_results  # noqa: E402,E501


def token_stream(model_dir, n_tokens):
    """Consecutive STS-B test tokens (no special tokens), cut like run_mntp.py's group_texts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from l2v.tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    ids = []
    for s in read_stsb_sentences():
        ids += tok.encode(s, add_special_tokens=False)
        if len(ids) >= n_tokens:
            return np.array(ids[:n_tokens], dtype=np.int64), tok.pad_id
    raise ValueError("not enough text")


def make_batches(tmp, model_dir=DEMO_MODEL, mntp_shape=(4, 512), simcse_shape=(64, 64)):
    B, T = mntp_shape
    ids, pad = token_stream(model_dir, B * T + simcse_shape[0] * simcse_shape[1])
    mntp_ids = ids[:B * T].reshape(B, T)
    masked, labels = masked_batch(mntp_ids, seed=0)
    np.savez(f"{tmp}/mntp.npz", ids=mntp_ids, masked=masked, labels=labels)
    B2, T2 = simcse_shape
    s_ids = ids[B * T:].reshape(B2, T2).copy()
    # Ragged rows: real lengths T/2..T (fixed seed), right-padded, so pooling over real tokens matters.
    lengths = np.random.default_rng(1).integers(T2 // 2, T2 + 1, size=B2)
    mask = (np.arange(T2)[None, :] < lengths[:, None]).astype(np.int64)
    s_ids[mask == 0] = pad
    np.savez(f"{tmp}/simcse.npz", ids=s_ids, attention_mask=mask)
    return dict(mntp_tokens=B * T, mntp_masked=int((labels[:, 1:] != -100).sum()),
                simcse_real_tokens=int(mask.sum()), simcse_shape=list(simcse_shape), mntp_shape=list(mntp_shape))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", choices=["mntp", "simcse"])
    ap.add_argument("--skip-peer-ckpt", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep runs already in results/train_step.partial.json")
    ap.add_argument("--rerun", default="", help="with --resume: comma-separated run names to measure again "
                    "(the earlier result is kept under 'earlier_runs'), e.g. mntp_l2v_fp32,mntp_peer_fp32")
    args = ap.parse_args()
    partial = RESULTS / "train_step.partial.json"
    res = dict(warmup=args.warmup, steps=args.steps, runs={})
    if args.resume and partial.is_file():
        old = json.loads(partial.read_text())
        res["runs"], res["earlier_runs"] = old["runs"], old.get("earlier_runs", {})
        for name in filter(None, args.rerun.split(",")):
            if name in res["runs"]:
                res["earlier_runs"].setdefault(name, []).append(res["runs"].pop(name))
    ws = (args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        res["batch"] = make_batches(tmp)
        plan = []
        if args.only in (None, "mntp"):
            plan += [("mntp", "l2v", "fp32", 0), ("mntp", "peer", "fp32", 0), ("mntp", "l2v", "autocast", 0),
                     ("mntp", "l2v", "bf16w", 0), ("mntp", "l2v", "fp32", 1)]
            plan += [] if args.skip_peer_ckpt else [("mntp", "peer", "fp32", 1)]
            plan += [("mntp", "l2v", "autocast", 1), ("mntp", "l2v", "bf16w", 1)]
        if args.only in (None, "simcse"):
            # With checkpointing only: 2 views x 64 x 64 tokens without it need > 24 GB in fp32 (killed here).
            plan += [("simcse", "l2v", "fp32", 1), ("simcse", "peer", "fp32", 1), ("simcse", "l2v", "autocast", 1),
                     ("simcse", "l2v", "bf16w", 1)]
        for obj, side, variant, ckpt in plan:
            name = f"{obj}_{side}_{variant}{'_ckpt' if ckpt else ''}"
            if name in res["runs"]:
                continue
            try:
                if side == "l2v":
                    r = run_worker(sys.executable, "l2v_train.py", obj, variant, ckpt, *ws, f"{tmp}/{obj}.npz")
                else:
                    r = run_worker(PEER_PYTHON, "peer_train.py", obj, ckpt, *ws, f"{tmp}/{obj}.npz")
            except RuntimeError as e:  # e.g. killed for memory: record it, go on with the other runs
                res.setdefault("failed", {})[name] = str(e).splitlines()[0]
                print(f"  {name}: FAILED: {str(e).splitlines()[0]}", flush=True)
                continue
            r["median_step_s"] = median(r["step_s"])
            res["runs"][name] = r
            RESULTS.mkdir(exist_ok=True)
            partial.write_text(json.dumps(res, indent=2))  # a long run can be resumed with --resume
            print(f"  {name}: {r['median_step_s']:.2f} s/step (steps {[round(t, 2) for t in r['step_s']]}), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, losses {[round(x, 4) for x in r['losses']]}", flush=True)
    b, runs, lines = res["batch"], res["runs"], []
    for obj, ntok in (("mntp", b["mntp_tokens"]), ("simcse", 2 * b["simcse_real_tokens"])):
        for ck in ("", "_ckpt"):
            peer = runs.get(f"{obj}_peer_fp32{ck}")
            for variant in ("fp32", "autocast", "bf16w"):
                r = runs.get(f"{obj}_l2v_{variant}{ck}")
                if r is None:
                    continue
                p = peer and ntok / peer["median_step_s"]
                lines.append(line(f"{obj}{ck} {variant} tokens/s vs upstream fp32{ck}", ntok / r["median_step_s"], p, "tok/s"))
                lines.append(line(f"{obj}{ck} {variant} peak RSS", r["peak_rss_mb"], peer and peer["peak_rss_mb"], "MB",
                                  higher_is_better=False))
    print("\n".join(lines))
    res["lines"] = lines
    print("wrote", save_results("train_step", res))


if __name__ == "__main__":
    main()
