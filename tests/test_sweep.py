"""scripts/sweep.py on the tiny model: variants side by side, the choice on dev, test sets only past the
bar."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from l2v.config import DEFAULTS, parse_config

spec_ = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
sweep_script = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(sweep_script)


def sweep(tmp_path, tiny_dir, text_files, name, bar, variants, run=True):
    cfg = {
        "objective": "supervised",
        "model": str(tiny_dir),
        "train_file": str(text_files / "triples.jsonl"),
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "lora_r": 4,
        "lora_alpha": 8.0,
        "max_seq_length": 32,
        "is_causal": True,
        "pooling": "last_token",
        "prompt": 'In one word, "{text}" means:',
        "autocast": "none",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    data = tmp_path / "data" / "stsbenchmark"
    data.mkdir(parents=True, exist_ok=True)
    (data / "sts-dev.csv").write_text((text_files / "sts-dev.csv").read_text())
    spec = {
        "config": str(tmp_path / "cfg.json"),
        "dev": str(text_files / "sts-dev.csv"),
        "variants": variants,
        "reference": {"variant": variants[0]["name"] if variants else "a", "step": 1},
        "bar": bar,
        "eval_tasks": "stsb-dev",
        "eval_args": ["--data-dir", str(tmp_path / "data"), "--sts-instruction", ""],
        "parallel": 2,
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    if not run:
        return tmp_path / f"{name}.json", tmp_path / name
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "sweep.py"),
            str(tmp_path / f"{name}.json"),
            "--out",
            str(tmp_path / name),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return res, tmp_path / name


def test_sweep_chooses_on_dev_and_reads_test_sets_only_past_the_bar(tmp_path, tiny_dir, text_files):
    variants = [
        {"name": "a", "eval_every": 1, "stop": 2},
        {"name": "b", "eval_every": 1, "stop": 2, "set": {"lr": 0.01, "lora_layers": [1]}},
    ]
    res, out = sweep(tmp_path, tiny_dir, text_files, "past", -100, variants)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads((out / "sweep.json").read_text())
    assert got["status"] == {"a": "ok", "b": "ok"}
    assert all(sorted(map(int, got["curves"][n])) == [1, 2] for n in "ab")
    assert json.loads((out / "b" / "checkpoint-000001" / "train_config.json").read_text())["lora_layers"] == [
        1
    ]
    best = got["best"]
    assert best["dev"] == max(x for c in got["curves"].values() for x in c.values())
    assert got["reference"] == got["curves"]["a"]["1"]
    # The chosen checkpoint (or final/ at the last step) through eval.py scores what training measured.
    assert got["evaluated"]["exit"] == 0
    assert got["evaluated"]["adapter"].endswith(
        "final" if best["step"] == 2 else f"checkpoint-{best['step']:06d}"
    )
    score = json.loads((out / "best.json").read_text())["results"][0]["scores"]["spearman"]
    assert abs(score - best["dev"]) < 1e-6
    # Below the bar nothing is evaluated; an used --out is refused before any work.
    res, out = sweep(tmp_path, tiny_dir, text_files, "below", 100, variants[:1])
    assert res.returncode == 0 and "no test set read" in res.stdout
    assert (
        json.loads((out / "sweep.json").read_text())["evaluated"] is None and not (out / "best.json").exists()
    )
    res, _ = sweep(tmp_path, tiny_dir, text_files, "below", 100, variants[:1])
    assert res.returncode == 2 and "not an empty folder" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "variants, message",
    [
        (
            [{"name": "a", "eval_every": 1, "stop": 2, "set": {"lrr": 1}}],
            "variant a: unknown config key(s) ['lrr']",
        ),
        ([{"name": "a", "eval_every": 1, "stop": 2, "set": {"lr": -1}}], "variant a: --lr: must be >0"),
        ([{"name": "a", "eval_every": 0, "stop": 2}], "variant a: eval_every and stop must be integers >= 1"),
        ([{"name": "a", "eval_every": 1, "stop": 2}] * 2, "variant names must be unique"),
        ([], "variants must be a non-empty list of objects"),
    ],
)
def test_sweep_refuses_a_bad_file_before_any_work(tmp_path, tiny_dir, text_files, variants, message, capsys):
    path, out = sweep(tmp_path, tiny_dir, text_files, "bad", 0, variants, run=False)
    with pytest.raises(SystemExit) as e:
        sweep_script.main([str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_sweep_file_missing_or_not_json(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in (
        (tmp_path / "none.json", "No such file"),
        (tmp_path / "bad.json", "Expecting property name"),
    ):
        with pytest.raises(SystemExit) as e:
            sweep_script.main([str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("path", sorted((ROOT / "scripts" / "sweeps").glob("*.json")), ids=lambda p: p.name)
def test_committed_sweeps_name_real_configs_and_keys(path):
    spec = json.loads(path.read_text())
    parse_config(["--config", str(ROOT / spec["config"])])
    names = [v["name"] for v in spec["variants"]]
    assert len(set(names)) == len(names) and spec["reference"]["variant"] in names
    for v in spec["variants"]:
        assert set(v["set"]) <= set(DEFAULTS), v
        assert v["stop"] >= spec["reference"]["step"] or v["name"] != spec["reference"]["variant"]
