"""A newcomer's first hour: bare commands, the defaults in force, adapter chains, blank lines, --help,
progress,
and `import l2v` from anywhere."""

import argparse
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, ROOT, needs_data

import encode
import eval as eval_cli
import train
from l2v.cli import add_encoder_args
from l2v.config import parse_config
from l2v.encoder import Encoder
from l2v.progress import progress

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("train.py: error:")]


@needs_data
@pytest.mark.parametrize("objective", ["mntp", "simcse"])
def test_bare_train_takes_the_objective_demo_preset(objective, capsys):
    cfg = parse_config([] if objective == "mntp" else ["--objective", objective])
    preset = json.loads((ROOT / "configs" / objective / "smollm2-135m.json").read_text())
    assert (cfg.objective, cfg.train_file, cfg.model) == (objective, preset["train_file"], preset["model"])
    assert f"the demo preset configs/{objective}/smollm2-135m.json" in capsys.readouterr().out


@needs_data
def test_the_demo_preset_is_announced_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert parse_config([]).objective == "mntp" and capsys.readouterr().out == ""


def test_bare_train_without_data_is_one_line_from_rank_0(tmp_path):
    env = {**ENV, "L2V_SHARED": str(tmp_path / "no-shared")}
    res = subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert (
        "--train_file: required" in res.stderr
        and "python train.py --objective mntp --train_file" in res.stderr
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        "--objective",
        "simcse",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and len(error_lines(res.stderr)) == 1, res.stderr[-2000:]
    assert "--objective simcse --train_file" in error_lines(res.stderr)[0]


def test_an_objective_against_its_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(
            ["--objective", "simcse", "--config", str(ROOT / "configs" / "mntp" / "smollm2-135m.json")]
        )
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--objective simcse" in err[0] and "'mntp'" in err[0]


def test_the_api_defaults_are_the_command_lines():
    p = argparse.ArgumentParser()
    add_encoder_args(p)
    cli = vars(p.parse_args([]))
    api = inspect.signature(Encoder.from_pretrained).parameters
    assert (
        api["device"].default == cli["device"] == "auto"
        and api["autocast"].default == cli["autocast"] == "auto"
    )
    assert (
        api["dtype"].default == cli["dtype"]
        and api["check_adapters"].default == cli["check_adapters"] is True
    )


def test_adapter_chains_are_checked(tiny_dir, text_files, tmp_path, capsys):
    common = [
        "--model",
        str(tiny_dir),
        "--max_steps",
        "1",
        "--batch_size",
        "4",
        "--max_seq_length",
        "32",
        "--lora_r",
        "4",
        "--autocast",
        "none",
        "--progress",
        "false",
    ]
    train.main(
        common
        + [
            "--objective",
            "mntp",
            "--train_file",
            str(text_files / "sents.txt"),
            "--output_dir",
            str(tmp_path / "mntp"),
        ]
    )
    mntp, simcse = tmp_path / "mntp" / "final", tmp_path / "simcse" / "final"
    train.main(
        common
        + [
            "--objective",
            "simcse",
            "--train_file",
            str(text_files / "sents.txt"),
            "--init_adapter",
            str(mntp),
            "--output_dir",
            str(tmp_path / "simcse"),
        ]
    )
    Encoder.from_pretrained(tiny_dir, adapters=[mntp, simcse], device="cpu")  # the order they were trained in
    for wrong in ([simcse], [simcse, mntp]):
        with pytest.raises(ValueError, match=rf"{simcse}: trained on top of \[{mntp}\]"):
            Encoder.from_pretrained(tiny_dir, adapters=wrong)
    Encoder.from_pretrained(tiny_dir, adapters=[simcse], check_adapters=False)
    with pytest.raises(SystemExit):
        encode.main(["--model", str(tiny_dir), "--adapter", str(simcse), "--text", "a cat"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "trained on top of" in err[0] and str(mntp) in err[0]
    encode.main(
        ["--model", str(tiny_dir), "--adapter", str(simcse), "--no-check-adapters", "--text", "a cat"]
    )
    moved = tmp_path / "moved-mntp"  # an adapter is known by its weights, not by where it lies
    moved.mkdir()
    for f in mntp.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    Encoder.from_pretrained(tiny_dir, adapters=[moved, simcse])


def test_blank_lines_are_counted_and_can_keep_rows_aligned(tiny_dir, tmp_path, capsys):
    f = tmp_path / "texts.txt"
    f.write_text("a cat sits\n\na dog runs\n   \nthe end\n")
    out = tmp_path / "e.npy"
    emb = encode.main(["--model", str(tiny_dir), "--file", str(f), "--out", str(out), "--autocast", "none"])
    assert emb.shape[0] == 3 and "2 blank line(s) skipped" in capsys.readouterr().out
    kept = encode.main(
        [
            "--model",
            str(tiny_dir),
            "--file",
            str(f),
            "--out",
            str(out),
            "--autocast",
            "none",
            "--keep-blank-lines",
        ]
    )
    assert "kept as zero rows" in capsys.readouterr().out
    assert kept.shape[0] == 5 and not kept[1].any() and not kept[3].any()
    np.testing.assert_allclose(kept[[0, 2, 4]], emb, atol=1e-6)
    np.testing.assert_array_equal(np.load(out), kept)


@pytest.mark.parametrize(
    "script,flags",
    [
        (encode, ["--dtype", "--autocast", "--device", "--pooling"]),
        (eval_cli, ["--tasks", "--sts-instruction", "--out", "--data-dir"]),
        (train, ["--lr", "--objective", "--pooling", "--contrastive_batch"]),
    ],
)
def test_help_shows_defaults_and_choices(script, flags, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    out = capsys.readouterr().out
    entries = {}  # each option's help entry: from its line to the next option's
    options = out.split("options:", 1)[1].split("\n\n", 1)[0]
    for line in options.splitlines():
        if line.lstrip().startswith("--"):
            entries[line.split()[0].split("=")[0]] = line
        elif entries and line.startswith(" " * 6):
            entries[list(entries)[-1]] += " " + line.strip()
    for flag in flags:
        assert "default" in entries.get(flag, ""), (flag, entries.get(flag))
    text = " ".join(out.split())
    if script is eval_cli:
        assert "Retrieve semantically similar text." in text and "a new file per run" in text
    if script is train:
        assert "one of mntp, simcse, supervised, cosent" in text


def test_progress_prints_periodic_lines_outside_a_terminal(capsys):
    assert list(progress(range(3), desc="work", unit="items", every_s=0.0)) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [e for e in err[:3] if e.startswith("work: ")] and "3/3 (100%)" in err[2]
    assert err[-1].startswith("work: 3 items in ")
    assert (
        list(progress(range(3), desc="short")) == [0, 1, 2] and capsys.readouterr().err == ""
    )  # short: silent


def test_import_l2v_from_anywhere(tmp_path):
    try:
        importlib.metadata.distribution("l2v")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("l2v is not installed (make setup runs `pip install -e .`)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", "import l2v.encoder, l2v; print(l2v.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and res.stdout.strip() == str(ROOT / "l2v" / "__init__.py"), res.stderr


def test_eval_without_data_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--data-dir", str(tmp_path / "none"), "--tasks", "stsb-dev"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--data-dir" in err[0] and "none" in err[0]
    assert DATA.name == "data"
