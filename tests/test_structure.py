"""The layout's rules, read from the code: who imports whom, what train.py may know, the reader's path; and
that an objective defined outside the library trains through train.py without touching it."""

import ast
import json
import sys

import pytest
import torch.nn.functional as F
from conftest import ROOT

import train

RUNTIME = {"torch", "numpy", "safetensors", "tokenizers", "einops", "tqdm"}
OPTIONAL = {"huggingface_hub", "mteb"}  # imported lazily, inside functions, with a hint when missing
SCRIPTS = {"train", "encode", "eval"}
OBJECTIVE_NAMES = {"mntp", "simcse", "supervised", "cosent"}


def imports(path):
    """(module, at top level) for every absolute import of a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, id(node) in top) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, id(node) in top


def python_files(*folders):
    return [p for f in folders for p in sorted((ROOT / f).glob("*.py"))]


def test_the_library_imports_nothing_outside_itself():
    for path in python_files("l2v"):
        for module, at_top in imports(path):
            name = module.split(".")[0]
            assert name in RUNTIME | OPTIONAL or name in sys.stdlib_module_names, (
                f"{path.name} imports {module}"
            )
            assert name not in OPTIONAL or not at_top, f"{path.name} imports the optional {module} eagerly"


def test_scripts_import_the_library_never_each_other():
    for path in [ROOT / f"{s}.py" for s in SCRIPTS] + python_files("bench", "scripts"):
        for module, _ in imports(path):
            name = module.split(".")[0]
            assert name not in SCRIPTS, f"{path.relative_to(ROOT)} imports the script {module}"
            assert name not in {"bench", "scripts", "tests"}, f"{path.relative_to(ROOT)} imports {module}"


def test_train_py_never_asks_which_objective_it_runs():
    tree = ast.parse((ROOT / "train.py").read_text())
    body = tree.body[1:]  # the module docstring's usage lines may name objectives
    names = {n.value for n in ast.walk(ast.Module(body=body, type_ignores=[])) if isinstance(n, ast.Constant)}
    assert not names & OBJECTIVE_NAMES


def test_line_budgets():
    lines = {p: len(p.read_text().splitlines()) for p in [ROOT / "train.py"] + python_files("l2v")}
    assert lines[ROOT / "train.py"] <= 350
    reader = [ROOT / "train.py"] + [
        ROOT / "l2v" / f for f in ("model.py", "lora.py", "encoder.py", "objectives.py")
    ]
    assert sum(lines[p] for p in reader) <= 1700, {p.name: lines[p] for p in reader}


# ---- a new objective, defined here, registered with one entry, trained through train.py's main


def triplet_objective():
    from l2v.data import read_examples
    from l2v.objectives import Contrastive

    class Triplet(Contrastive):
        """Margin ranking on (query, positive, negative): the positive's cosine must beat the negative's."""

        defaults = dict(lr=1e-3, batch_size=8, scale=0.2)  # scale: the margin here
        views = 3

        def read(self, path):
            return read_examples(path)

        def texts(self, rows):
            return [(r["instruction"], r["query"]) for r in rows] + [
                r[k] for k in ("positive", "negative") for r in rows
            ]

        def view_loss(self, views, targets):
            q, p, n = (F.normalize(v.float(), dim=-1) for v in views)
            return F.relu(self.cfg.scale - (q * p).sum(-1) + (q * n).sum(-1)).mean()

    return Triplet


def test_a_new_objective_trains_through_train_py_untouched(
    tiny_dir, text_files, tmp_path, monkeypatch, capsys
):
    from l2v.objectives import OBJECTIVES

    monkeypatch.setitem(OBJECTIVES, "triplet", triplet_objective())
    out = tmp_path / "triplet"
    train.main(
        [
            "--objective",
            "triplet",
            "--model",
            str(tiny_dir),
            "--train_file",
            str(text_files / "triples.jsonl"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--max_seq_length",
            "32",
            "--lora_r",
            "4",
            "--autocast",
            "none",
            "--progress",
            "false",
            "--log_every",
            "1",
            "--micro_batch_size",
            "4",
        ]
    )
    cfg = json.loads((out / "final" / "train_config.json").read_text())
    assert (cfg["objective"], cfg["lr"], cfg["batch_size"], cfg["scale"]) == (
        "triplet",
        1e-3,
        8,
        0.2,
    )  # its defaults
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(
        r["loss"] > 0 for r in log if "loss" in r
    )
    from safetensors.torch import load_file

    b = [t for k, t in load_file(out / "final" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert max(t.abs().max().item() for t in b) > 0  # it trained
    start = json.loads(next(x for x in capsys.readouterr().out.splitlines() if '"event": "start"' in x))
    assert (start["objective"], start["accum"], start["negatives_per_example"]) == ("triplet", 2, 15)


def test_an_unregistered_objective_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train.main(["--objective", "triplet", "--train_file", "x.txt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--objective" in err[0] and "triplet" in err[0] and "mntp" in err[0]
