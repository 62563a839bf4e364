"""Every user mistake ends in ONE line `<script>: error: <file or flag>: <problem>`, exit status 2,
before any work, and nothing a user made is changed. Table-driven, in-process, on the tiny model."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA, save_tiny, tiny_model
from safetensors.torch import load_file, save_file

import encode
import eval as eval_cli
import train
from l2v.adapters import save_adapter
from l2v.lora import add_lora

UNWRITABLE = "/proc/l2v-test/out"  # root may write anywhere else, but never under /proc


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir, text_files):
    """Bad inputs of every kind, a good adapter and its broken variants, a finished training run."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n  \n\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "x.csv").write_text("a,b\n")
    (d / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    (d / "notext.jsonl").write_text('{"body": "no text"}\n')
    (d / "blanktext.jsonl").write_text('{"text": "   "}\n')
    (d / "missing-field.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    (d / "pairs.txt").write_text("a cat\ta dog\t3.5\n" * 8)
    (d / "pairs-bad-score.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n' * 8
                                             + '{"sentence1": "a", "sentence2": "b", "score": "high"}\n')
    (d / "folder").mkdir()
    (d / "file").write_text("not a folder")
    (d / "list.json").write_text("[1, 2]")
    (d / "malformed.json").write_text("{not json")
    (d / "unknown-key.json").write_text('{"learning_rate": 1}')
    (d / "wrong-type.json").write_text('{"warmup_steps": "2"}')
    (d / "sts-bad.csv").write_text("only\tthree\tfields\n")
    models = {}
    for name, change in {"list-config": lambda m: (m / "config.json").write_text("[]"),
                         "no-tokenizer": lambda m: (m / "tokenizer.json").unlink(),
                         "no-weights": lambda m: (m / "model.safetensors").unlink(),
                         "truncated": lambda m: truncate(m / "model.safetensors"),
                         "gemma-relu": lambda m: (m / "config.json").write_text(json.dumps(
                             {**json.loads((m / "config.json").read_text()), "model_type": "gemma2",
                              "hidden_activation": "relu"}))}.items():
        models[name] = shutil.copytree(tiny_dir, d / f"model-{name}")
        change(models[name])
    model = tiny_model()
    add_lora(model, r=4, alpha=8)
    for lora in model.modules():
        if hasattr(lora, "lora_B"):
            torch.nn.init.normal_(lora.lora_B.weight)
    good = save_adapter(model, d / "adapter-good")
    adapters = {}
    for name in ("truncated", "nan", "dora", "target", "pattern"):
        adapters[name] = shutil.copytree(good, d / f"adapter-{name}")
    truncate(adapters["truncated"] / "adapter_model.safetensors")
    w = load_file(adapters["nan"] / "adapter_model.safetensors")
    next(iter(w.values()))[0, 0] = float("nan")
    save_file(w, adapters["nan"] / "adapter_model.safetensors")
    for name, key, value in (("dora", "use_dora", True), ("target", "target_modules", ["q_proj", "wq"]),
                             ("pattern", "layers_pattern", "blocks")):
        cfg = json.loads((adapters[name] / "adapter_config.json").read_text())
        cfg[key] = value
        (adapters[name] / "adapter_config.json").write_text(json.dumps(cfg))
    run = d / "finished"
    train.main(base_args(tiny_dir, text_files, run) + ["--save_every", "1", "--max_steps", "3"])
    merged = d / "merged"
    merged.mkdir()
    (merged / "keep.txt").write_text("a user's file")
    return dict(d=d, models=models, adapters=adapters, good=good, run=run, merged=merged,
                tiny=tiny_dir, sents=text_files / "sents.txt", triples=text_files / "triples.jsonl",
                sts=text_files / "sts-dev.csv")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def base_args(model, data, out):
    return ["--objective", "mntp", "--model", str(model), "--train_file", str(data / "sents.txt"),
            "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4", "--max_seq_length", "32",
            "--lora_r", "4", "--autocast", "none", "--progress", "false", "--log_every", "1"]


def snapshot(folder: Path) -> dict:
    """Every file under folder: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, script: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "warning:" not in ln]
    assert len(err) == 1 and err[0].startswith(f"{script}: error: "), err
    return err[0]


ENCODE = [  # (argv after --model, words the message must contain)
    (["--text", "   "], ["--text #1", "empty"]),
    (["--text", "ok", "--text", ""], ["--text #2", "empty"]),
    (["--file", "{d}/nope.txt"], ["nope.txt", "not found"]),
    (["--file", "{d}/folder"], ["folder"]),
    (["--file", "{d}/empty.txt"], ["empty.txt", "no texts"]),
    (["--file", "{d}/blank.txt"], ["blank.txt", "no texts"]),
    (["--file", "{d}/latin1.txt"], ["latin1.txt:1", "UTF-8"]),
    (["--file", "{d}/bad.jsonl"], ["bad.jsonl:2", "malformed JSON"]),
    (["--file", "{d}/notext.jsonl"], ["notext.jsonl:1", "text"]),
    (["--file", "{d}/blanktext.jsonl"], ["blanktext.jsonl:1", "empty"]),
    (["--file", "{d}/x.csv"], ["--file", "x.csv"]),
    (["--text", "a", "--out", "{d}/folder"], ["--out", "folder"]),
    (["--text", "a", "--out", "{d}/emb.txt"], ["--out", ".npy"]),
    (["--text", "a", "--out", UNWRITABLE + ".npy"], ["--out", "writable"]),
    (["--text", "a", "--max-batch-tokens", "0"], ["--max-batch-tokens"]),
    (["--text", "a", "--max-length", "0"], ["--max-length"]),
    (["--text", "a", "--max-length", "-5"], ["--max-length"]),
    (["--text", "a", "--instruction", "one two three four five six seven eight", "--max-length", "6"], ["no room"]),
    (["--text", "a", "--prompt", "no slot"], ["prompt", "{text}"]),
    (["--text", "a", "--pooling", "max"], ["--pooling"]),
    (["--text", "a", "--dtype", "int8"], ["--dtype"]),
    (["--text", "a", "--device", "tpu"], ["tpu"]),
    (["--text", "a", "--adapter", "{d}/nope"], ["nope", "adapter_config.json"]),
    (["--text", "a", "--adapter", "{d}/adapter-truncated"], ["adapter-truncated", "adapter_model.safetensors"]),
    (["--text", "a", "--adapter", "{d}/adapter-nan"], ["adapter-nan", "NaN"]),
    (["--text", "a", "--adapter", "{d}/adapter-dora"], ["adapter-dora", "use_dora"]),
    (["--text", "a", "--adapter", "{d}/adapter-target"], ["adapter-target", "wq"]),
    (["--text", "a", "--adapter", "{d}/adapter-pattern"], ["adapter-pattern", "layers_pattern"]),
]
ENCODE_MODELS = [("{d}/no-such-model", ["no-such-model", "config.json"]), ("{d}/file", ["file", "config.json"]),
                 ("{d}/model-list-config", ["config.json", "object"]), ("{d}/model-no-tokenizer", ["tokenizer.json"]),
                 ("{d}/model-no-weights", ["model.safetensors"]), ("{d}/model-truncated", ["model.safetensors"])]
ENCODE_MODELS.append(("{d}/model-gemma-relu", ["config.json", "unsupported hidden_activation 'relu'"]))


@pytest.mark.parametrize("argv,words", ENCODE, ids=[" ".join(a)[:40] for a, _ in ENCODE])
def test_encode_errors(files, capsys, argv, words):
    argv = [a.format(d=files["d"]) for a in argv]
    with pytest.raises(SystemExit) as e:
        encode.main(["--model", str(files["tiny"])] + argv)
    assert e.value.code == 2
    line = one_error_line(capsys, "encode.py")
    assert all(w in line for w in words), line


@pytest.mark.parametrize("model,words", ENCODE_MODELS, ids=[m for m, _ in ENCODE_MODELS])
def test_encode_model_errors(files, capsys, model, words):
    with pytest.raises(SystemExit) as e:
        encode.main(["--model", model.format(d=files["d"]), "--text", "a"])
    assert e.value.code == 2
    line = one_error_line(capsys, "encode.py")
    assert all(w in line for w in words), line


def test_encode_api_refuses_a_bare_pair(tok):
    from l2v.encoder import Encoder
    with pytest.raises(TypeError, match="bare tuple"):
        Encoder(tiny_model(), tok).encode(("an instruction:", "a text"))


TRAIN = [  # (extra argv, words the message must contain); the finished run is passed as output_dir
    ([], ["--output_dir", "earlier run", "--resume"]),
    (["--output_dir", "{d}/file"], ["--output_dir", "not a folder"]),
    (["--output_dir", "{d}"], ["--output_dir", "not empty", "--overwrite"]),  # a user's folder, no run in it
    (["--output_dir", "{d}/fresh", "--resume", "true"], ["--resume", "checkpoint"]),
    (["--resume", "true", "--lr", "0.1"], ["--resume", "lr"]),
    (["--resume", "true", "--lora_r", "8"], ["--resume", "lora_r"]),
    (["--resume", "true", "--max_steps", "0"], ["--max_steps"]),
    (["--resume", "true", "--overwrite", "true"], ["--resume", "--overwrite"]),
    (["--eval_sts_file", "{d}/nope.csv"], ["nope.csv", "not found"]),
    (["--eval_sts_file", "{d}/sts-bad.csv"], ["sts-bad.csv:1"]),
    (["--eval_file", "{d}/nope.txt"], ["nope.txt"]),
    (["--eval_every", "1"], ["--eval_every"]),
    (["--train_file", "{d}/nope.txt"], ["nope.txt", "not found"]),
    (["--train_file", "{d}/empty.txt"], ["empty.txt", "no texts"]),
    (["--train_file", "{d}/latin1.txt"], ["latin1.txt:1", "UTF-8"]),
    (["--train_file", "{d}/x.csv"], ["x.csv", "file type"]),
    (["--objective", "supervised", "--train_file", "{d}/missing-field.jsonl"], ["missing-field.jsonl:1", "negative"]),
    (["--objective", "cosent", "--train_file", "{d}/pairs-bad-score.jsonl"], ["pairs-bad-score.jsonl:9", "score", "'high'"]),
    (["--objective", "cosent", "--train_file", "{d}/pairs.txt"], ["pairs.txt:1", "sentence1"]),  # text, not JSONL
    (["--max_steps", "-1"], ["--max_steps", ">=1"]),
    (["--batch_size", "0"], ["--batch_size"]),
    (["--micro_batch_size", "3"], ["--batch_size", "micro_batch_size"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr", "fast"], ["--lr", "float"]),
    (["--lora_r", "0"], ["--lora_r"]),
    (["--mask_probability", "1.5"], ["--mask_probability"]),
    (["--mask_probability", "0"], ["--mask_probability"]),
    (["--attention_dropout", "1.5"], ["--attention_dropout"]),
    (["--lora_dropout", "1"], ["--lora_dropout"]),
    (["--objective", "mlm"], ["--objective", "mlm"]),
    (["--pooling", "max"], ["--pooling"]),
    (["--weights_dtype", "int8"], ["--weights_dtype"]),
    (["--autocast", "fp8"], ["--autocast"]),
    (["--progress", "maybe"], ["--progress"]),
    (["--prompt", "no slot"], ["--prompt", "{text}"]),
    (["--lora_targets", "wq"], ["wq"]),
    (["--lora_layers", "[99]"], ["99"]),
    (["--learning_rate", "1"], ["--learning_rate"]),
    (["--config", "{d}/nope.json"], ["nope.json", "not found"]),
    (["--config", "{d}/malformed.json"], ["malformed.json", "malformed JSON"]),
    (["--config", "{d}/list.json"], ["list.json", "object"]),
    (["--config", "{d}/unknown-key.json"], ["unknown-key.json", "learning_rate"]),
    (["--config", "{d}/wrong-type.json"], ["wrong-type.json", "warmup_steps"]),
    (["--init_adapter", "{d}/nope"], ["nope"]),
    (["--init_adapter", "{d}/adapter-nan"], ["adapter-nan", "NaN"]),
    (["--init_adapter", "{d}/adapter-truncated"], ["adapter-truncated"]),
    (["--merge_out", "{merged}"], ["--merge_out", "not empty"]),
    (["--model", "{d}/model-list-config"], ["config.json"]),
    (["--model", "{d}/model-gemma-relu"], ["config.json", "hidden_activation 'relu'"]),
    (["--device", "cuda:7"], ["cuda"]),
]


@pytest.mark.parametrize("argv,words", TRAIN, ids=[" ".join(a)[:40] or "rerun" for a, _ in TRAIN])
def test_train_errors_keep_the_finished_run(files, capsys, argv, words):
    before = snapshot(files["run"]), snapshot(files["merged"])
    argv = [a.format(d=files["d"], merged=files["merged"]) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(base_args(files["tiny"], files["sents"].parent, files["run"]) + argv)
    assert e.value.code == 2
    line = one_error_line(capsys, "train.py")
    assert all(w in line for w in words), line
    assert (snapshot(files["run"]), snapshot(files["merged"])) == before  # nothing lost, nothing touched


EVAL = [
    (["--tasks", ""], ["--tasks"]),
    (["--tasks", "stsb"], ["--tasks", "stsb"]),
    (["--data-dir", "{d}/nope"], ["--data-dir", "nope"]),
    (["--model", "{d}/nope"], ["nope", "config.json"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--autocast", "fp8"], ["--autocast"]),
    (["--out", UNWRITABLE + ".json"], ["--out", "writable"]),
    (["--out", "{d}/folder"], ["--out", "folder"]),
    (["--out", "{d}/r.txt"], ["--out", ".json"]),
    (["--max-batch-tokens", "0"], ["--max-batch-tokens"]),
    (["--max-length", "0"], ["--max-length"]),
    (["--adapter", "{d}/adapter-nan"], ["adapter-nan", "NaN"]),
    (["--prompt", "no slot"], ["prompt", "{text}"]),
    (["--max-length", "8", "--sts-instruction", "word " * 20], ["--sts-instruction", "no room"]),
]


@pytest.mark.skipif(not (DATA / "stsbenchmark").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("argv,words", EVAL, ids=[" ".join(a)[:40] for a, _ in EVAL])
def test_eval_errors(files, capsys, argv, words):
    argv = [a.format(d=files["d"]) for a in argv]
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--model", str(files["tiny"]), "--tasks", "stsb-dev", "--data-dir", str(DATA)] + argv)
    assert e.value.code == 2
    line = one_error_line(capsys, "eval.py")
    assert all(w in line for w in words), line


def test_resume_skips_a_damaged_checkpoint(files, tmp_path, capsys):
    run = shutil.copytree(files["run"], tmp_path / "run")
    shutil.rmtree(run / "final")
    truncate(run / "checkpoint-000002" / "adapter_model.safetensors")  # the newest of the two
    train.main(base_args(files["tiny"], files["sents"].parent, run) + ["--resume", "true", "--max_steps", "3"])
    captured = capsys.readouterr()
    assert "checkpoint-000002: damaged" in captured.err
    assert "resumed from" in captured.out and "checkpoint-000001 at step 1" in captured.out
    assert (run / "final" / "adapter_model.safetensors").is_file()
    (run / "checkpoint-000001" / "trainer_state.pt").write_bytes(b"garbage")  # now none is intact
    shutil.rmtree(run / "final")
    with pytest.raises(SystemExit):
        train.main(base_args(files["tiny"], files["sents"].parent, run) + ["--resume", "true", "--max_steps", "3"])
    line = one_error_line(capsys, "train.py")  # one line naming every damaged checkpoint
    assert "no intact checkpoint" in line and "checkpoint-000001: damaged" in line and "checkpoint-000002" in line


def test_evaluation_failure_never_loses_the_adapter(files, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("evaluation broke")
    monkeypatch.setattr(train, "evaluate_sts", broken)
    out = tmp_path / "run"
    train.main(base_args(files["tiny"], files["sents"].parent, out) + ["--eval_sts_file", str(files["sts"]),
                                                                       "--eval_every", "1"])
    assert (out / "final" / "adapter_model.safetensors").is_file()
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert any("evaluation broke" in r.get("eval_error", "") for r in log)


def test_overwrite_replaces_only_the_runs_files(files, tmp_path):
    run = shutil.copytree(files["run"], tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    train.main(base_args(files["tiny"], files["sents"].parent, run) + ["--overwrite", "true", "--max_steps", "1"])
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoint-000001").exists()  # the old run's checkpoints are gone with it
    assert json.loads((run / "final" / "train_config.json").read_text())["max_steps"] == 1
