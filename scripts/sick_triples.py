"""Supervised triples from SICK's training split: (premise, a positive, a hard negative); or its graded pairs.

    python scripts/sick_triples.py            # SICK_train.txt -> data/sick-train-triples.jsonl
    python scripts/sick_triples.py --split SICK_trial.txt --out data/sick-trial-triples.jsonl
    python scripts/sick_triples.py --pairs    # -> data/sick-train-pairs.jsonl, for --objective cosent
    python scripts/sick_triples.py --setup    # both defaults; without the data, one line and exit 0

Pairs are read both ways (A with B, B with A). The default set (`--negatives any --min-related 4`,
3,224 triples): each premise's positives are its ENTAILMENT partners and its NEUTRAL partners rated at
least 4 for relatedness; a positive's hard negative is one of the premise's CONTRADICTION partners in
turn, else its least related other non-entailed partner, else a seeded random sentence of the split.
`--negatives contradiction --min-related 0` gives the first set (548 triples: premises with both an
entailed and a contradicted partner, entailed partners only). `--pairs` writes every pair once as
{sentence1, sentence2, score} with its relatedness score (1-5). The data stays outside the repository
(SICK is CC BY-NC-SA); `data/` is git-ignored.
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from l2v.cli import DATA_DIR  # noqa: E402
from l2v.files import write_text  # noqa: E402


def triples(path: Path, instruction: str, negatives: str = "any", min_related: float = 4.0) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    a, b, score, label = (
        header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")
    )
    partners: dict[str, list[tuple[str, str, float]]] = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) > label:
            for x, y in ((f[a].strip(), f[b].strip()), (f[b].strip(), f[a].strip())):
                partners.setdefault(x, []).append((y, f[label], float(f[score])))
    sentences, rng, out = sorted(partners), random.Random(0), []
    for premise, group in partners.items():
        positive = [
            lab == "ENTAILMENT" or (min_related and lab == "NEUTRAL" and s >= min_related)
            for _, lab, s in group
        ]
        pos = [y for (y, _, _), keep in zip(group, positive) if keep]
        neg = [y for y, lab, _ in group if lab == "CONTRADICTION"]
        if negatives == "any" and not neg:  # pairs, not sentences: SICK rates a few pairs twice
            others = sorted(
                (s, y) for (y, lab, s), keep in zip(group, positive) if lab == "NEUTRAL" and not keep
            )
            neg = [others[0][1]] if others else []
        for i, p in enumerate(pos):
            if neg or negatives == "any":
                n = neg[i % len(neg)] if neg else rng.choice(sentences)
                while n in (premise, p):
                    n = rng.choice(sentences)
                out.append({"query": premise, "positive": p, "negative": n, "instruction": instruction})
    return out


def pairs(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    a, b, score = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
    return [
        {"sentence1": f[a].strip(), "sentence2": f[b].strip(), "score": float(f[score])}
        for f in (line.split("\t") for line in lines[1:])
        if len(f) > score
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--split", default="SICK_train.txt")
    p.add_argument("--instruction", default="", help="instruction for the queries (default none)")
    p.add_argument(
        "--negatives",
        choices=("contradiction", "any"),
        default="any",
        help="contradiction: only premises with a contradicted partner (see above)",
    )
    p.add_argument(
        "--min-related",
        type=float,
        default=4.0,
        help="NEUTRAL partners rated at least this are positives too (0 = entailed only)",
    )
    p.add_argument(
        "--pairs", action="store_true", help="write the graded pairs (for --objective cosent) instead"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="default data/sick-train-triples.jsonl (--pairs: data/sick-train-pairs.jsonl)",
    )
    p.add_argument(
        "--setup",
        action="store_true",
        help="make setup: the default triples and pairs, when the data is there",
    )
    args = p.parse_args(argv)
    if args.setup:
        if not (args.data_dir / "sick" / args.split).is_file():
            print(
                f"sick_triples.py: skipped: no {args.data_dir / 'sick' / args.split} "
                "(the supervised and cosent "
                "demo presets need it; everything else works without)"
            )
            return
        main([a for a in argv or sys.argv[1:] if a != "--setup"])
        return main([a for a in argv or sys.argv[1:] if a != "--setup"] + ["--pairs"])
    args.out = args.out or ROOT / "data" / f"sick-train-{'pairs' if args.pairs else 'triples'}.jsonl"
    src = args.data_dir / "sick" / args.split
    if not src.is_file():
        sys.exit(f"sick_triples.py: error: {src}: file not found (pass --data-dir)")
    if not 0 <= args.min_related <= 5:
        sys.exit(
            f"sick_triples.py: error: --min-related {args.min_related}: SICK rates relatedness 1-5 (0 = off)"
        )
    if args.out.is_dir():
        sys.exit(f"sick_triples.py: error: --out {args.out}: is a folder, expected a .jsonl file path")
    try:
        rows = pairs(src) if args.pairs else triples(src, args.instruction, args.negatives, args.min_related)
    except (ValueError, IndexError, UnicodeDecodeError) as e:  # empty, a missing column, a score not a number
        sys.exit(f"sick_triples.py: error: {src}: not a SICK file with a header ({e})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.out}: {len(rows)} {'pairs' if args.pairs else 'triples'} from {src}")


if __name__ == "__main__":
    main()
