"""Collect runs/ablation/eval/*.json (written by scripts/ablation.sh) into one markdown table.

    python scripts/results_table.py [runs/ablation/eval]
"""
import json
import sys
from pathlib import Path

ROWS = ["uni", "uni-weighted", "bi", "bi-mntp", "bi-mntp-simcse", "bi-mntp-simcse-lowlr", "bi-mntp-lr1e-3",
        "bi-mntp-lr1e-3-simcse", "uni-simcse", "bi-simcse"]
LABELS = {"uni": "Uni (causal, mean)", "uni-weighted": "Uni (causal, weighted mean)", "bi": "Bi (mean)",
          "bi-mntp": "Bi+MNTP", "bi-mntp-simcse": "Bi+MNTP+SimCSE (lr 2e-4, bf16 weights)",
          "bi-mntp-simcse-lowlr": "Bi+MNTP+SimCSE (lr 5e-5, fp32 weights)",
          "bi-mntp-lr1e-3": "Bi+MNTP (2nd try: lr 1e-3)", "bi-mntp-lr1e-3-simcse": "Bi+MNTP+SimCSE (2nd try: batch 64, lr 1e-4)", "uni-simcse": "Uni+SimCSE (ablation)",
          "bi-simcse": "Bi+SimCSE, no MNTP (ablation)"}
COLUMNS = [("stsb-dev", "spearman"), ("stsb-test", "spearman"), ("sick-r-test", "spearman"),
           ("sts12", "spearman"), ("sts13", "spearman"), ("sts14", "spearman"), ("sts15", "spearman"),
           ("sts16", "spearman"), ("cranfield", "ndcg@10"), ("cranfield", "recall@100")]


def main(folder="runs/ablation/eval"):
    scores = {}
    for path in sorted(Path(folder).glob("*.json")):
        row = path.name.split(".")[0]
        for r in json.loads(path.read_text())["results"]:
            for metric, value in r["scores"].items():
                scores.setdefault(row, {})[(r["task"], metric)] = value
    columns = [c for c in COLUMNS if any(c in v for v in scores.values())]  # drop unmeasured tasks
    head = [f"{t} {'' if m == 'spearman' else m}".strip() for t, m in columns]
    print("| row | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(columns))
    for row in ROWS:
        if row in scores:
            cells = [f"{scores[row][c]:.1f}" if c in scores[row] else "–" for c in columns]
            print(f"| {LABELS[row]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
