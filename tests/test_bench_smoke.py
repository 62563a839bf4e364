"""Smoke test of bench/: the dry-run modes of bench/run.py (a tiny random model, tiny inputs, the l2v side
only: no upstream environment, no GPU needed). It measures nothing; it checks that every figure and check
the report needs comes out, in the table and in the JSON."""

import json
import math
import shutil
import sys

import pytest
from conftest import DEMO_MODEL, REF_TOKENIZER, ROOT, TOKENIZER_FILES

sys.path.insert(0, str(ROOT / "bench"))
import run  # noqa: E402

SPEED = {
    "encode_sts": "texts/s",
    "encode_msmarco": "texts/s",
    "mntp": "tokens/s",
    "mntp_ckpt": "tokens/s",
    "simcse": "sent/s",
    "matmul": "TFLOP/s",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A --data folder as bench/pack_inputs.sh writes it, with small made-up files."""
    tokenizer = next((d for d in (REF_TOKENIZER, DEMO_MODEL) if (d / "tokenizer.json").is_file()), None)
    if tokenizer is None:
        pytest.skip("no tokenizer files (../shared/reference or the demo model)")
    d = tmp_path_factory.mktemp("bench-data")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, d / name)
    words = ["cats", "rivers", "songs", "planes", "books", "mountains"]
    (d / "sts-test.csv").write_text(
        "".join(
            f'main\tMSRvid\t2012\t{i}\t{i % 5}.0\tA "quoted" {w} number {i}.\tAnother {w}, {i}!\n'
            for i, w in enumerate(words * 5)
        )
    )
    (d / "wiki1m.txt").write_text(
        "".join(f"Sentence {i} is about {w} and the {i % 7} green {w}.\n" for i, w in enumerate(words * 40))
    )
    (d / "msmarco-corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": str(i), "title": "", "text": f"{w} " * (5 + i)}) + "\n"
            for i, w in enumerate(words * 2)
        )
    )
    return d


def check_figures(result: dict, steps: int) -> None:
    rows = {r["figure"]: r for r in result["rows"]}
    for fig, unit in SPEED.items():
        speed = [r for r in result["rows"] if r["fig"] == fig and r["unit"] == unit]
        assert speed and all(isinstance(r["l2v"], float) and r["l2v"] > 0 for r in speed), (fig, speed)
        assert all(r["upstream"] == "-" and r["ratio"] is None for r in speed)  # upstream not run
    for label in ("load time", "load peak memory"):
        assert rows[label]["l2v"] > 0
    mfu = [r for r in result["rows"] if r["figure"].endswith(": MFU")]
    assert len(mfu) == 2 and all(0 < r["l2v"] < math.inf and r["target"] for r in mfu)
    assert rows[[k for k in rows if k.startswith("encode STS-B")][0]]["target"]
    l2v = result["results"]["l2v"]
    for fig in ("mntp", "mntp_ckpt", "simcse"):
        assert len(l2v[fig]["times"]) == steps and all(math.isfinite(x) for x in l2v[fig]["losses"])
        assert l2v[fig]["peak_mem_mb"] > 0
    assert "not_run" in result["results"]["upstream"]
    assert result["inputs"]["counts"] == {"sts": 24, "msmarco": 6, "simcse": 4}
    assert all(not v.startswith("made up") for v in result["inputs"]["files"].values())


def test_dry_run(data, tmp_path, capsys):
    out = tmp_path / "dry.json"
    result = run.main(
        ["--dry-run", "--data", str(data), "--threads", "1", "--peer-python", "none", "--out", str(out)]
    )
    check_figures(result, run.SIZES["dry"]["steps"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["mode"] in ("cpu", "cuda")
    assert "| figure | l2v | upstream | ratio | target | met |" in capsys.readouterr().out


def test_gpu_check_dry_run(data, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = run.main(
        [
            "--gpu",
            "--dry-run",
            "--data",
            str(data),
            "--threads",
            "1",
            "--peer-python",
            "none",
            "--out",
            str(out),
        ]
    )
    checks = result["checks"]
    assert [k.split(" cpu vs")[0] for k in checks] == [
        "parity",
        "random model",
        "train.py mntp",
        "train.py simcse",
        "encode.py",
    ]
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["random model"]["shards"] > 1  # written sharded, as the 8B model is
    assert len(checks["train.py mntp"]["losses"]) == 3
    check_figures(result, run.SIZES["dry"]["steps"])
    assert [r["met"] for r in result["rows"][:5]] == [True] * 5
    printed = capsys.readouterr().out
    assert "| figure | l2v | upstream | ratio | MFU | peak memory | card |" in printed
    assert json.loads(out.read_text())["mode"] == "gpu"


def test_against_alternates_and_reports(tmp_path, monkeypatch):
    """--against's bookkeeping, with the two processes it starts per round replaced by stand-ins."""
    calls = []
    other = tmp_path.resolve()
    speed = {run.ROOT: 1.0, other: 2.0}  # the other checkout is twice as slow

    def train_py(checkout, args, threads):
        calls.append(("train", checkout))
        assert args["autocast"] == "none" and args["objective"] == "simcse" and args["log_every"] == 1
        return {"times": [9.0] + [speed[checkout]] * 3, "losses": [1.0] * 4}

    def run_side(script, spec, python, pythonpath, tag):
        calls.append(("encode", pythonpath[0]))
        return {"encode_sts": {"times": [speed[pythonpath[0]]], "n": 10}}

    monkeypatch.setattr(run, "prepare_inputs", lambda *a: {"counts": {"sts": 10}})
    monkeypatch.setattr(run, "train_py", train_py)
    monkeypatch.setattr(run, "run_side", run_side)
    result = run.against(tmp_path, tmp_path, tmp_path / "model", None, dict(run.SIZES["cpu"], warmup=1), 1, 2)
    this, that = [("train", run.ROOT), ("encode", run.ROOT)], [("train", other), ("encode", other)]
    assert calls == that + this + this + that  # the order alternates between rounds
    simcse, encode = result["rows"]
    assert simcse["ratio"] == pytest.approx(2.0) and simcse["met"] and simcse["target"] == "ratio >= 1.5"
    assert encode["ratio"] == pytest.approx(2.0) and len(result["results"]["this"]["simcse"]["times"]) == 6


def test_attention_paths_smoke(tmp_path, capsys):
    """bench/attention_paths.py runs: tiny shapes, the paths that need no compiler."""
    import attention_paths

    attention_paths.main(
        [
            "--tokens",
            "16",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "8",
            "--window",
            "4",
            "--reps",
            "1",
            "--paths",
            "sdpa,math",
            "--json",
            str(tmp_path / "a.json"),
        ]
    )
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert len(rows) == 8 and all("forward_backward_ms" in r for r in rows)
    assert "| math | causal | bfloat16 |" in capsys.readouterr().out
