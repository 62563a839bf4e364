"""The results table of docs/results.md and the README's summary, from the evaluation JSON files.

    python scripts/results_table.py          # rewrites both tables in place from docs/results/*.json

`scripts/ablation.sh ROW` writes docs/results/ROW.json (eval.py's output); a row may also have more
files (ROW.<anything>.json, e.g. dev-only runs), merged in name order. Rows missing files are skipped.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (row, label, shown in the README summary); the order of the tables.
ROWS = [
    ("uni", "Uni: causal, mean (untrained)", True),
    ("uni-weighted", "Uni: causal, weighted mean (untrained)", True),
    ("bi", "Bi: bidirectional, mean (untrained)", True),
    ("prompteol", "PromptEOL: causal, prompt, last token (untrained)", True),
    ("prompt-ke", "KE prompt (PromptEOL + a knowledge-enhancement prefix), last token (untrained)", True),
    ("bi-mntp-lr1e-3", "Bi+MNTP, mean (MNTP at lr 1e-3, its step 40)", False),
    ("bi-mntp-lr1e-3-simcse", "Bi+MNTP+SimCSE, mean (80 x 64 at 32 tokens)", True),
    (
        "paper",
        "Bi+MNTP+SimCSE, mean (the paper's recipe at a CPU budget: MNTP 60 x 16 x 128, SimCSE 50 x 32)",
        True,
    ),
    ("paper-weighted", "Bi+MNTP+SimCSE, weighted mean (the paper's recipe at a CPU budget)", False),
    (
        "paper-gpu",
        "Bi+MNTP+SimCSE, mean (the paper's budget on a GPU: MNTP 1000 x 32 x 512, SimCSE 1000 x 128)",
        True,
    ),
    ("paper-gpu-weighted", "Bi+MNTP+SimCSE, weighted mean (the paper's budget on a GPU)", False),
    ("prompteol-simcse", "Causal+PromptEOL+SimCSE, last token", True),
    (
        "prompteol-simcse-instruction",
        "Causal+PromptEOL+SimCSE trained and evaluated with the STS instruction",
        False,
    ),
    ("supervised-sick", "Supervised: KE prompt + SICK-train triples (in-domain for SICK-R)", True),
    (
        "supervised-sick-cosent",
        "Supervised: the same, then CoSENT on SICK-train's scores (in-domain for SICK-R)",
        True,
    ),
    (
        "supervised-sick-b256",
        "Supervised: KE prompt + SICK-train triples at batch 256, 2 epochs "
        "(trained on a GPU; in-domain for SICK-R)",
        True,
    ),
    (
        "supervised-sick-b256-cpu",
        "Supervised: the same at batch 256 in cached micro-batches of 32 "
        "(trained on a 2-core CPU; in-domain for SICK-R)",
        True,
    ),
    ("supervised-sick-eol", "Supervised: PromptEOL + SICK-train triples (in-domain for SICK-R)", False),
    (
        "supervised-sick-548",
        "Supervised, the first set: 548 SICK-train triples, r16, 2 epochs (in-domain for SICK-R)",
        False,
    ),
    ("uni-simcse", "Uni+SimCSE, mean (ablation: SimCSE 60 x 32 at 32 tokens, lr 2e-4)", False),
    ("bi-simcse", "Bi+SimCSE, no MNTP (ablation: SimCSE 60 x 32 at 32 tokens, lr 2e-4)", False),
]
STS_TEST = ["stsb-test", "sick-r-test", "sts12", "sts13", "sts14", "sts15", "sts16"]
FULL = (
    [("stsb-dev", "spearman"), ("sick-r-trial", "spearman")]
    + [(t, "spearman") for t in STS_TEST]
    + [("cranfield", "ndcg@10"), ("cranfield", "recall@100")]
)
SUMMARY = [("stsb-dev", "spearman"), ("stsb-test", "spearman"), ("sick-r-test", "spearman")]


def load(folder: Path) -> dict:
    scores = {}
    for path in sorted(folder.glob("*.json")):
        row = path.name.split(".")[0]
        for r in json.loads(path.read_text())["results"]:
            for metric, value in r["scores"].items():
                scores.setdefault(row, {})[(r["task"], metric)] = value
    return scores


def table(scores: dict, columns, summary: bool) -> str:
    head = [t if m == "spearman" else f"{t} {m}" for t, m in columns]
    lines = [
        "| row | " + " | ".join(head) + " | STS avg (7 test sets) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for row, label, in_summary in ROWS:
        if row not in scores or (summary and not in_summary):
            continue
        got = scores[row]
        cells = [f"{got[c]:.1f}" if got.get(c) is not None else "–" for c in columns]
        sts = [got.get((t, "spearman")) for t in STS_TEST]
        cells.append(f"{sum(sts) / len(sts):.1f}" if None not in sts else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace(path: Path, name: str, text: str) -> None:
    """Put text between the file's <!-- name --> and <!-- /name --> markers."""
    src = path.read_text()
    pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
    if not pattern.search(src):
        sys.exit(f"results_table.py: error: {path}: no <!-- {name} --> ... <!-- /{name} --> markers")
    path.write_text(pattern.sub(lambda m: m[1] + text + "\n" + m[2], src))


def main():
    scores = load(ROOT / "docs" / "results")
    replace(ROOT / "docs" / "results.md", "table", table(scores, FULL, summary=False))
    replace(ROOT / "README.md", "results", table(scores, SUMMARY, summary=True))
    print(f"tables rewritten from {len(scores)} rows")


if __name__ == "__main__":
    main()
