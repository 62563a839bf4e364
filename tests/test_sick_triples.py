"""scripts/sick_triples.py: which SICK pairs become supervised triples, on a hand-made file."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sick_triples.py"
spec = importlib.util.spec_from_file_location("sick_triples", SCRIPT)
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)

ROWS = [  # sentence_A, sentence_B, relatedness, judgment
    ("P", "ent1", 4.8, "ENTAILMENT"),
    ("P", "con1", 3.9, "CONTRADICTION"),
    ("P", "rel1", 4.2, "NEUTRAL"),  # related enough to be a positive by default
    ("Q", "ent2", 4.6, "ENTAILMENT"),  # Q has no contradiction: its least related neutral is the negative
    ("Q", "far", 1.5, "NEUTRAL"),
    ("Q", "near", 3.5, "NEUTRAL"),
    ("R", "ent3", 4.9, "ENTAILMENT"),  # R has no other partner: a random sentence of the split
]


def write(tmp_path):
    path = tmp_path / "SICK_train.txt"
    lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    lines += [f"{i}\t{a}\t{b}\t{s}\t{j}" for i, (a, b, s, j) in enumerate(ROWS, 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def by_query(rows):
    out = {}
    for r in rows:
        out.setdefault(r["query"], []).append((r["positive"], r["negative"]))
    return out


def test_default_set(tmp_path):
    rows = st.triples(write(tmp_path), "inst")
    got = by_query(rows)
    assert got["P"] == [("ent1", "con1"), ("rel1", "con1")]
    assert got["Q"] == [("ent2", "far")]
    ((pos, neg),) = got["ent1"]  # pairs are read both ways
    assert pos == "P" and neg not in ("P", "ent1")
    ((pos, neg),) = got["R"]
    assert pos == "ent3" and neg not in ("R", "ent3")
    assert all(r["instruction"] == "inst" for r in rows)
    assert "con1" not in got and "far" not in got  # no entailed or related partner: no triple


def test_first_set_needs_a_contradiction(tmp_path):
    rows = st.triples(write(tmp_path), "", negatives="contradiction", min_related=0)
    assert [(r["query"], r["positive"], r["negative"]) for r in rows] == [("P", "ent1", "con1")]


def test_deterministic(tmp_path):
    path = write(tmp_path)
    assert st.triples(path, "") == st.triples(path, "")
