"""Hub ids resolved from a local cache in the hub's layout (a temp HF_HOME, HF_HUB_OFFLINE=1): the APIs and
every command line that takes a model or adapter folder. Nothing is downloaded."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_model

import encode
import eval as eval_cli
import train
from l2v import LLM2Vec
from l2v.adapters import save_adapter
from l2v.encoder import Encoder
from l2v.hub import resolve, resolve_model
from l2v.lora import add_lora

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["A cat sits on the mat.", "summit define"]


def cache_repo(hub: Path, repo_id: str, files: dict) -> None:
    """A repository in huggingface_hub's cache layout: blobs by hash, a snapshot of links, refs/main."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, src in files.items():
        data = src.read_bytes() if hasattr(src, "read_bytes") else src.encode()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tiny_dir):
    """HF_HOME with three repositories: l2v-test/tiny (a model), l2v-test/tiny-lora (an adapter on it) and
    l2v-test/tiny-mntp (an adapter repository with config and tokenizer, as upstream's `...-mntp`)."""
    home = tmp_path_factory.mktemp("hf")
    model = tiny_model()
    add_lora(model, r=4, targets=("q_proj", "v_proj"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(1))
    adapter = save_adapter(model, home / "adapter-src", base_model_name_or_path="l2v-test/tiny")
    tokenizer = {f.name: f for f in tiny_dir.iterdir() if f.name.startswith(("tokenizer", "special"))}
    hub = home / "hub"
    cache_repo(hub, "l2v-test/tiny", {f.name: f for f in tiny_dir.iterdir()})
    cache_repo(hub, "l2v-test/tiny-lora", {f.name: f for f in adapter.iterdir()})
    settings = json.dumps({"pooling_mode": "weighted_mean"})
    cache_repo(
        hub,
        "l2v-test/tiny-mntp",
        {
            **{f.name: f for f in adapter.iterdir()},
            **tokenizer,
            "config.json": tiny_dir / "config.json",
            "llm2vec_config.json": settings,
        },
    )
    return home


@pytest.fixture
def offline(hub_home, monkeypatch):
    """The cache, offline; set after huggingface_hub may have been imported (l2v reads both at call time)."""
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return hub_home / "hub"


def test_resolve(offline, tmp_path, monkeypatch, tiny_dir):
    snap = offline / "models--l2v-test--tiny" / "snapshots" / COMMIT
    assert resolve("l2v-test/tiny") == snap and resolve(f"l2v-test/tiny@{COMMIT}") == snap
    base, adapters, tok = resolve_model("l2v-test/tiny-mntp", ["l2v-test/tiny-lora"])
    assert base == snap and tok.parent.parent.name == "models--l2v-test--tiny-mntp"
    assert [a.parent.parent.name for a in adapters] == [
        "models--l2v-test--tiny-mntp",
        "models--l2v-test--tiny-lora",
    ]
    with pytest.raises(OSError) as e:
        resolve("l2v-test/missing", "adapter")
    message = str(e.value)
    assert "l2v-test/missing" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    # a local folder wins, and a path whose first part is a local folder is never looked up
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "l2v-test" / "tiny")
    for name in ("l2v-test/tiny", "l2v-test/typo", "/abs/x", "plain"):
        assert resolve(name) == Path(name)


def test_missing_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(OSError, match=r"l2v-test/tiny: .*pip install huggingface_hub"):
        Encoder.from_pretrained("l2v-test/tiny")
    with pytest.raises(OSError, match="pip install huggingface_hub"):
        LLM2Vec.from_pretrained("l2v-test/tiny")


def test_apis_resolve_ids(offline, tiny_dir):
    lora = offline / "models--l2v-test--tiny-lora" / "snapshots" / COMMIT
    want = Encoder.from_pretrained(tiny_dir, adapters=[lora], autocast="none").encode(TEXTS)
    got = Encoder.from_pretrained("l2v-test/tiny", adapters=["l2v-test/tiny-lora"], autocast="none")
    np.testing.assert_array_equal(got.encode(TEXTS), want)
    # an adapter repository as the model: its base model from the cache, itself merged first
    np.testing.assert_array_equal(
        Encoder.from_pretrained("l2v-test/tiny-mntp", autocast="none", pooling="mean").encode(TEXTS), want
    )
    l2v = LLM2Vec.from_pretrained("l2v-test/tiny-mntp", pooling_mode="mean")
    np.testing.assert_allclose(l2v.encode(TEXTS, convert_to_numpy=True), want, rtol=0, atol=1e-6)
    assert LLM2Vec.from_pretrained("l2v-test/tiny-mntp").pooling_mode == "weighted_mean"
    same = LLM2Vec.from_pretrained(
        "l2v-test/tiny", peft_model_name_or_path="l2v-test/tiny-lora", revision=COMMIT
    )
    np.testing.assert_allclose(same.encode(TEXTS, convert_to_numpy=True), want, rtol=0, atol=1e-6)


def test_command_lines_resolve_ids(offline, tmp_path, text_files, capsys):
    emb = encode.main(
        [
            "--model",
            "l2v-test/tiny",
            "--adapter",
            "l2v-test/tiny-lora",
            "--text",
            TEXTS[0],
            "--text",
            TEXTS[1],
            "--autocast",
            "none",
        ]
    )
    assert emb.shape == (2, 64)
    (tmp_path / "data" / "stsbenchmark").mkdir(parents=True)
    shutil.copy(text_files / "sts-dev.csv", tmp_path / "data" / "stsbenchmark" / "sts-dev.csv")
    res = eval_cli.main(
        [
            "--model",
            "l2v-test/tiny-mntp",
            "--tasks",
            "stsb-dev",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert res[0]["task"] == "stsb-dev"
    out = tmp_path / "run"
    train.main(
        [
            "--objective",
            "simcse",
            "--model",
            "l2v-test/tiny",
            "--init_adapter",
            "l2v-test/tiny-lora",
            "--train_file",
            str(text_files / "sents.txt"),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--batch_size",
            "4",
            "--max_seq_length",
            "16",
            "--lora_r",
            "2",
            "--autocast",
            "none",
            "--progress",
            "false",
        ]
    )
    cfg = json.loads((out / "final" / "train_config.json").read_text())
    assert cfg["model"].endswith(f"models--l2v-test--tiny/snapshots/{COMMIT}")
    assert cfg["init_adapter"][0].endswith(f"models--l2v-test--tiny-lora/snapshots/{COMMIT}")
    for flag in ("--model", "--adapter"):
        argv = [flag, "l2v-test/missing", "--text", "a"]
        with pytest.raises(SystemExit):
            encode.main(argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("encode.py: error: l2v-test/missing: ") and "HF_HUB_OFFLINE" in err
        assert "\n" not in err


def test_environment_before_import(hub_home, tmp_path):
    """The usual way: the variables set before the process starts."""
    env = {**os.environ, "HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "encode.py"),
        "--model",
        "l2v-test/tiny",
        "--text",
        "a cat",
        "--out",
        str(tmp_path / "e.npy"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "e.npy").shape == (1, 64)
