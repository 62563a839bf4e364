"""Supervised triples from SICK's training split: (premise, an entailed hypothesis, a contradicted one).

    python scripts/sick_triples.py                       # ../shared/data/sick/SICK_train.txt -> data/sick-train-triples.jsonl
    python scripts/sick_triples.py --split SICK_trial.txt --out data/sick-trial-triples.jsonl

Pairs are read both ways (A with B, B with A): a premise is any sentence with at least one ENTAILMENT
and one CONTRADICTION partner; each entailed partner becomes one triple, the contradicted partners taken
in turn as its hard negatives. The data stays outside the repository (SICK is CC BY-NC-SA); `data/` is
git-ignored.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def triples(path: Path, instruction: str) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    a, b, label = (header.index(c) for c in ("sentence_A", "sentence_B", "entailment_judgment"))
    by_premise: dict[str, dict[str, list[str]]] = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) > label:
            for x, y in ((f[a].strip(), f[b].strip()), (f[b].strip(), f[a].strip())):
                by_premise.setdefault(x, {}).setdefault(f[label], []).append(y)
    out = []
    for premise, groups in by_premise.items():
        pos, neg = groups.get("ENTAILMENT", []), groups.get("CONTRADICTION", [])
        out += [{"query": premise, "positive": p, "negative": neg[i % len(neg)], "instruction": instruction}
                for i, p in enumerate(pos) if neg]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--split", default="SICK_train.txt")
    p.add_argument("--instruction", default="", help="instruction for the queries (default none)")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "sick-train-triples.jsonl")
    args = p.parse_args(argv)
    src = args.data_dir / "sick" / args.split
    if not src.is_file():
        sys.exit(f"sick_triples.py: error: {src}: file not found (pass --data-dir)")
    rows = triples(src, args.instruction)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.out}: {len(rows)} triples from {src}")


if __name__ == "__main__":
    main()
