"""Evaluate an l2v / LLM2Vec encoder on local STS and retrieval files (see l2v/evaluate.py).

Examples:
    python eval.py --model models/smollm2-135m-instruct --causal --tasks stsb-dev
    python eval.py --model models/smollm2-135m-instruct --adapter runs/mntp --adapter runs/simcse --tasks sts
    python eval.py --model DIR --tasks dev,cranfield --out out/dev.json

Tasks: stsb-dev stsb-test sick-r-trial sick-r-test sts12..sts16 cranfield msmarco-subset dbpedia-subset;
groups: sts (test sets + average), dev (stsb-dev, sick-r-trial), retrieval. Use dev sets for choices.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from l2v.evaluate import GROUPS, STS_INSTRUCTION, resolve_tasks, run_task

ROOT = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--model", required=True, help="HF-layout model folder")
    p.add_argument("--adapter", action="append", default=[], help="PEFT adapter folder, merged in order; repeatable")
    p.add_argument("--pooling", default=None, help="mean|weighted_mean|eos_token|last_token|bos_token "
                                                     "(default: llm2vec_config.json, else mean)")
    p.add_argument("--causal", action="store_true", help="keep causal attention (default: bidirectional)")
    p.add_argument("--dtype", default="float32", help="weights dtype: float32 | bfloat16")
    p.add_argument("--autocast", default=None, help="bfloat16: float32 weights, bf16 matmuls (faster on AMX CPUs)")
    p.add_argument("--max-length", type=int, default=None, help="default: llm2vec_config.json, else 512")
    p.add_argument("--chat-template", default=None, help="wrap inputs in a chat template: 'auto' or a name from l2v.encoder.CHAT_TEMPLATES")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # evaluation
    p.add_argument("--tasks", default="dev", help=f"comma-separated tasks or groups ({', '.join(GROUPS)})")
    p.add_argument("--sts-instruction", default=STS_INSTRUCTION, help="'' for none")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default="out/eval_results.json", help="JSON file for the results (out/ is git-ignored)")
    args = p.parse_args(argv)
    tasks = resolve_tasks(args.tasks)  # fail on a typo before loading the model

    from l2v.encoder import Encoder
    t0 = time.perf_counter()
    encoder = Encoder.from_pretrained(args.model, adapters=args.adapter, is_causal=args.causal, dtype=args.dtype,
                                      pooling=args.pooling, max_length=args.max_length,
                                      chat_template=args.chat_template, device=args.device,
                                      autocast=args.autocast)
    print(f"loaded {args.model} (+{len(args.adapter)} adapters, {'causal' if args.causal else 'bidirectional'}, "
          f"pooling={encoder.pooling}) in {time.perf_counter() - t0:.1f}s")

    results = []
    for name in tasks:
        r = run_task(encoder, name, args.data_dir, sts_instruction=args.sts_instruction or None,
                     batch_size=args.batch_size)
        print(f"{name}: " + ", ".join(f"{m} {v:.2f}" for m, v in r["scores"].items()) + f" ({r['seconds']:.0f}s)")
        results.append(r)
    sts = [r["scores"]["spearman"] for r in results if r["kind"] == "sts"]
    if len(sts) > 1:
        results.append({"task": "sts-avg", "kind": "average", "n": len(sts), "seconds": 0.0,
                        "scores": {"spearman": sum(sts) / len(sts)}})

    print(f"\n{'task':<16}{'metric':<12}{'score':>8}{'n':>8}{'seconds':>9}")
    for r in results:
        for metric, score in r["scores"].items():
            print(f"{r['task']:<16}{metric:<12}{score:>8.2f}{r['n']:>8}{r['seconds']:>9.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
