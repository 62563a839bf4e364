"""Collect runs/ablation/eval/*.json (written by scripts/ablation.sh) into one markdown table.

    python scripts/results_table.py [runs/ablation/eval]
"""
import json
import sys
from pathlib import Path

# The reported rows first (second attempt for the trained bidirectional rows, chosen on STS-B dev),
# then the earlier attempts, kept as negative results.
ROWS = ["uni", "uni-weighted", "bi", "bi-mntp-lr1e-3", "bi-mntp-lr1e-3-simcse", "uni-simcse", "bi-simcse",
        "bi-mntp", "bi-mntp-simcse", "bi-mntp-simcse-lowlr"]
LABELS = {"uni": "Uni (causal, mean)", "uni-weighted": "Uni (causal, weighted mean)", "bi": "Bi (mean)",
          "bi-mntp-lr1e-3": "Bi+MNTP", "bi-mntp-lr1e-3-simcse": "Bi+MNTP+SimCSE",
          "uni-simcse": "Uni+SimCSE (ablation)", "bi-simcse": "Bi+SimCSE, no MNTP (ablation)",
          "bi-mntp": "1st try: Bi+MNTP (lr 2e-4, step 120)",
          "bi-mntp-simcse": "1st try: Bi+MNTP+SimCSE (lr 2e-4, bf16 weights)",
          "bi-mntp-simcse-lowlr": "1st try: Bi+MNTP+SimCSE (lr 5e-5, fp32 weights)"}
COLUMNS = [("stsb-dev", "spearman"), ("stsb-test", "spearman"), ("sick-r-test", "spearman"),
           ("sts12", "spearman"), ("sts13", "spearman"), ("sts14", "spearman"), ("sts15", "spearman"),
           ("sts16", "spearman"), ("cranfield", "ndcg@10"), ("cranfield", "recall@100")]
STS_TEST = ["stsb-test", "sick-r-test", "sts12", "sts13", "sts14", "sts15", "sts16"]


def main(folder="runs/ablation/eval"):
    scores = {}
    for path in sorted(Path(folder).glob("*.json")):
        row = path.name.split(".")[0]
        for r in json.loads(path.read_text())["results"]:
            for metric, value in r["scores"].items():
                scores.setdefault(row, {})[(r["task"], metric)] = value
    columns = [c for c in COLUMNS if any(c in v for v in scores.values())]  # drop unmeasured tasks
    head = [f"{t} {'' if m == 'spearman' else m}".strip() for t, m in columns]
    print("| row | " + " | ".join(head) + " | STS avg (7 test sets) |")
    print("|---|" + "---|" * (len(columns) + 1))
    for row in ROWS:
        if row in scores:
            cells = [f"{scores[row][c]:.1f}" if c in scores[row] else "–" for c in columns]
            sts = [scores[row].get((t, "spearman")) for t in STS_TEST]
            cells.append(f"{sum(sts) / len(sts):.1f}" if None not in sts else "–")
            print(f"| {LABELS[row]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
