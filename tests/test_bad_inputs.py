"""Bad inputs, one table: every kind of mistake a hostile user or a damaged file makes (issue #25), fed
through train.py, encode.py, eval.py (in-process) and the Python API.

A case is (id, kind, cli, argv or callable, expect, words). "error": the run ends with exit status 2 and
ONE stderr line `<script>: error: ...` holding every word (the file, flag or key at fault; the API: an
exception of a user-error type whose message holds them), before anything is written unless the case is
`late`; "ok": the run succeeds and `check` holds. Files a case names in `protect` must survive it byte
for byte. A failure says which verdict the case got: traceback, silent-wrong (an error accepted, or a
wrong result), unclear (not one line, or not naming the cause), late (refused after writing the output
folder), refused (a valid input refused), data-loss (a protected file changed).

Fixtures are built once per module: the tiny model and its broken copies, a finished 6-step run (its
final/ is the good adapter, broken copies derive from it), data files, evaluation folders.
"""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import ROOT, save_tiny, tiny_model
from safetensors.torch import load_file, save_file

import encode
import eval as eval_cli
import train
from l2v.cli import USER_ERRORS

MAINS = {"train": train.main, "encode": encode.main, "eval": eval_cli.main}
UNWRITABLE = "/proc/l2v-test/out"  # root may write anywhere else, but never under /proc
KINDS = {  # kind: what it covers (issue #25's numbers)
    "loss": "1 nothing lost: the run's own files, one run per folder, atomic writes, a full disk",
    "values": "2 numbers, types and choices from flags and --config files",
    "model": "3 model folders: config.json fields, tokenizer files, weights, JSON encodings",
    "adapter": "3 adapter folders: adapter_config.json fields, weights",
    "text": "4 input text and training data: encodings, line endings, JSON, record fields",
    "eval": "5 eval.py data: STS and retrieval files, metrics that cannot be computed",
    "resume": "6 resume: settings, damaged checkpoints, changed data",
    "api": "7 devices and the Python API",
    "boundary": "8 errors found late (after the model loads) are one line; --debug shows the traceback",
    "output": "output paths that cannot be written",
}


class Case(NamedTuple):
    id: str
    kind: str
    cli: str  # train | encode | eval | api
    argv: list | Callable  # CLI: argv with {placeholders}; api: a callable(ctx)
    expect: str  # error | ok
    words: tuple = ()  # all must be in the error line
    setup: Callable | None = None  # setup(ctx) before the run: files in ctx.tmp, monkeypatches
    check: Callable | None = None  # check(ctx, result, stdout) for "ok": raises AssertionError
    protect: tuple = ()  # paths (with placeholders) whose files must survive unchanged
    late: bool = False  # an error that may come after train.py wrote into its output folder


# ----------------------------------------------------------------------------- fixtures' contents

STS_ROWS = [
    (5.0, "A man is playing a guitar.", "A man plays the guitar."),
    (0.4, "A woman is slicing an onion.", "A dog runs across the field."),
    (3.8, "Two children are playing in the park.", "Kids play outside in a park."),
    (1.2, "The stock market fell sharply today.", "A cat sleeps on the sofa."),
    (4.6, "A plane is taking off.", "An airplane is departing."),
    (2.5, "A man is eating pasta.", "A man is eating a sandwich."),
    (0.0, "The sun is bright.", "Quantum fields are quantised."),
    (4.2, "Someone is cooking rice.", "A person cooks some rice."),
]


def sts_text(rows) -> str:
    rows = enumerate(rows)
    return "".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in rows)


def sick_text(rows) -> str:
    head = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    return head + "".join(f"{i}\t{a}\t{b}\t{1 + s * 0.8:.1f}\tNEUTRAL\n" for i, (s, a, b) in enumerate(rows))


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


TRIPLES = [
    {"query": f"what is {w}?", "positive": f"{w} is a thing number {i}.", "negative": f"nothing {i}."}
    for i, w in enumerate(["cats", "dogs", "rivers", "planes"] * 2)
]
CORPUS = [
    {"_id": f"d{i}", "title": "", "text": f"Document {i} is about {w}."}
    for i, w in enumerate(["cats", "dogs", "rivers", "planes", "songs", "books"])
]
QUERIES = [
    {"_id": f"q{i}", "text": f"Which document is about {w}?"} for i, w in enumerate(["cats", "dogs", "songs"])
]
QRELS = "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td4\t1\n"
DEEP = "[" * 100_000 + "]" * 100_000

FILES = {  # name in {d}: content (str: UTF-8; bytes as is; None: a folder)
    "empty.txt": "",
    "blank.txt": "\n  \n\t\n\n",
    "folder": None,
    "file": "not a folder",
    "latin1.txt": "caf\xe9 au lait\nna\xefve\n".encode("latin-1"),
    "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"),
    "utf16.txt": "A cat sits.\nA dog runs.\n".encode("utf-16"),
    "surrogate-utf8.txt": b"A cat \xed\xa0\x80 sits.\n",  # a surrogate's UTF-8 form: not valid UTF-8
    "x.csv": "text\na cat\na dog\n",
    "bad.jsonl": '{"text": "ok"}\n{"text": broken}\n',
    "notext.jsonl": '{"body": "no text"}\n',
    "blanktext.jsonl": '{"text": "a cat"}\n{"text": "   "}\n',
    "num.jsonl": '{"text": 42}\n',
    "inst-list.jsonl": '{"text": "a cat", "instruction": ["x"]}\n',
    "list-record.jsonl": '["a cat"]\n',
    "surrogate.jsonl": '{"text": "a cat"}\n{"text": "caf\\ud800"}\n',
    "surrogate-inst.jsonl": '{"text": "a cat", "instruction": "\\udfff"}\n',
    "deep.jsonl": '{"text": "a cat"}\n' + DEEP + "\n",
    "deep.json": DEEP,
    "nan-text.jsonl": '{"text": NaN}\n',
    "bom.txt": "\ufeffA cat sits.\nA cat sits.\n".encode(),
    "crlf.txt": b"A cat sits.\r\nA dog runs.\r\n",
    "cr.txt": b"A cat sits.\rA dog runs.\rA bird sings.\r",
    "mixed-endings.txt": b"A cat sits.\rA dog runs.\nA bird sings.\r\nA fish swims.",
    "ok.jsonl": jsonl({"text": f"text {i}", "instruction": "Retrieve it:"} for i in range(20)),
    "many.txt": "".join(f"line {i}\n" for i in range(20)),
    "long-line.txt": "short line\n" + "word " * 400 + "\n",  # over MAX_LINE_BYTES once a case lowers it
    "tiny.txt": "one short line\n",
    "missing-field.jsonl": '{"query": "q", "positive": "p"}\n',
    "one-triple.jsonl": jsonl([TRIPLES[0]]),
    "triples.csv": "query,positive,negative\n" + "".join(f"q{i},p{i},n{i}\n" for i in range(16)),
    "dataset-list.jsonl": jsonl({**t, "dataset": ["a"]} for t in TRIPLES),
    "dataset-number.jsonl": jsonl({**t, "dataset": 3} for t in TRIPLES),
    "long-instruction.jsonl": jsonl({**t, "instruction": "word " * 60} for t in TRIPLES),
    "pairs.txt": "a cat\ta dog\t3.5\n" * 8,
    "pairs-bad-score.jsonl": jsonl(
        [{"sentence1": "a", "sentence2": "b", "score": 1}] * 8
        + [{"sentence1": "a", "sentence2": "b", "score": "high"}]
    ),
    "pairs-bool-score.jsonl": jsonl([{"sentence1": "a", "sentence2": "b", "score": True}] * 8),
    "sts-bad.csv": "only\tthree\tfields\n",
    "bad-sts.csv": "score\tsentence one\tsentence two\n4.0\tA cat.\tA dog.\n",
    "latin1-sts.csv": sts_text(STS_ROWS[:3]).replace("A man", "Caf\xe9").encode("latin-1"),
    "list.json": "[1, 2]",
    "malformed.json": "{not json",
    "unknown-key.json": '{"learning_rate": 1}',
    "wrong-type.json": '{"warmup_steps": "2"}',
    "objective-mlm.json": '{"objective": "mlm"}',
    "objective-list.json": '{"objective": ["mntp"]}',
    "lr-inf.json": '{"lr": Infinity}',
    "lr-1e400.json": '{"lr": 1e400}',
    "lr-nan.json": '{"lr": NaN}',
    "lr-string.json": '{"lr": "1e-3"}',
    "steps-bool.json": '{"max_steps": true}',
    "batch-float.json": '{"batch_size": 4.0}',
    "alpha-inf.json": '{"lora_alpha": Infinity}',
    "layers-true.json": '{"lora_layers": [true]}',
    "layers-float.json": '{"lora_layers": [1.0]}',
    "layers-int.json": '{"lora_layers": 1}',
    "targets-empty.json": '{"lora_targets": []}',
    "targets-blank.json": '{"lora_targets": ["q_proj", " "]}',
    "init-adapter-str.json": '{"init_adapter": "x"}',
    "prompt-number.json": '{"prompt": 5}',
    "seed-null.json": '{"seed": null}',
    "cfg-deep.json": DEEP,
    "cfg-latin1.json": '{"prompt": "caf\xe9 {text}"}'.encode("latin-1"),
    "cfg-bom.json": '\ufeff{"lr": 0.001}'.encode(),
    "cfg-utf16.json": '{"lr": 0.001}'.encode("utf-16"),
    "cfg-utf32.json": '{"lr": 0.001}'.encode("utf-32"),
    "cfg-dup-key.json": '{"lr": 0.5, "lr": 0.001}',
    "cfg-objective-null.json": '{"objective": null}',
    # valid UTF-8 with a NUL every second byte
    "utf16le-no-bom.txt": "A cat sits.\nA dog runs.\n".encode("utf-16-le"),
    "nul.txt": b"A cat sits.\nA dog\x00 runs.\n",
    "text-null.jsonl": '{"text": "a cat"}\n{"text": null}\n',
    "inst-null.jsonl": '{"text": "A cat.", "instruction": null}\n{"text": "A dog."}\n',
    "pairs-one-score.jsonl": jsonl(
        {"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 2} for i in range(8)
    ),
}


def own(path: Path) -> Path:
    """A symlinked file becomes a copy, to edit without touching what it pointed to."""
    if path.is_symlink():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    return path


def truncate(path: Path) -> None:
    data = own(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_json(name: str, drop=(), **updates):
    def edit(folder: Path):
        cfg = json.loads((folder / name).read_text())
        cfg = {k: v for k, v in {**cfg, **updates}.items() if k not in drop}
        (folder / name).write_text(json.dumps(cfg, indent=2))

    return edit


def write(name: str, content):
    return lambda folder: (
        own(folder / name).write_bytes(content)
        if isinstance(content, bytes)
        else own(folder / name).write_text(content)
    )


def reencode(name: str, encoding: str):
    return lambda folder: own(folder / name).write_bytes((folder / name).read_text().encode(encoding))


def edit_tensors(change, name="model.safetensors"):
    def edit(folder: Path):
        t = load_file(folder / name)
        t = change(t) or t
        save_file(t, own(folder / name), metadata={"format": "pt"})

    return edit


def int_norm(t):
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)


def nan_lora(t):
    t[sorted(k for k in t if "lora_B" in k)[0]][0, 0] = float("nan")


MODELS = {  # name in {m}: edit of a copy of the tiny model (weights symlinked until edited)
    "list-config": write("config.json", "[]"),
    "config-malformed": write("config.json", '{"model_type": "llama",'),
    "config-missing-key": set_json("config.json", drop=("hidden_size",)),
    "type-gpt2": set_json("config.json", model_type="gpt2"),
    "type-list": set_json("config.json", model_type=["llama"]),
    "gemma-relu": set_json("config.json", model_type="gemma2", hidden_activation="relu"),
    "no-tokenizer": lambda m: (m / "tokenizer.json").unlink(),
    "tokenizer-garbage": write("tokenizer.json", "{not json"),
    "no-weights": lambda m: (m / "model.safetensors").unlink(),
    "truncated": lambda m: truncate(m / "model.safetensors"),
    "weights-empty": write("model.safetensors", b""),
    "pickle-only": lambda m: (
        (m / "model.safetensors").unlink(),
        (m / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00."),
    ),
    "empty-folder": lambda m: [p.unlink() for p in list(m.iterdir())],
    # config.json's fields
    "hidden-size-0": set_json("config.json", hidden_size=0),
    "hidden-size-str": set_json("config.json", hidden_size="64"),
    "hidden-size-float": set_json("config.json", hidden_size=64.5),
    "layers-bool": set_json("config.json", num_hidden_layers=True),
    "heads-0": set_json("config.json", num_attention_heads=0, head_dim=None),
    "kv-heads-3": set_json("config.json", num_key_value_heads=3),
    "vocab-negative": set_json("config.json", vocab_size=-5),
    "intermediate-null": set_json("config.json", intermediate_size=None),
    "head-dim-odd": set_json("config.json", head_dim=15),
    "eps-string": set_json("config.json", rms_norm_eps="1e-5"),
    "eps-0": set_json("config.json", rms_norm_eps=0),
    "eps-inf": write(
        "config.json",
        '{"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
        '"head_dim": 16, "intermediate_size": 128, "rms_norm_eps": Infinity, '
        '"tie_word_embeddings": true}',
    ),
    "theta-string": set_json("config.json", rope_theta="abc"),
    "theta-0": set_json("config.json", rope_theta=0),
    "theta-negative": set_json("config.json", rope_theta=-10000.0),
    "llama3-missing-keys": set_json("config.json", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    "llama3-low-above-high": set_json(
        "config.json",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 4.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "linear-no-factor": set_json("config.json", rope_scaling={"type": "linear"}),
    "linear-factor-0": set_json("config.json", rope_scaling={"type": "linear", "factor": 0}),
    "rope-scaling-string": set_json("config.json", rope_scaling="linear"),
    "rope-dynamic": set_json("config.json", rope_scaling={"type": "dynamic", "factor": 2.0}),
    "max-positions-0": set_json("config.json", max_position_embeddings=0),
    "window-float": set_json("config.json", model_type="mistral", sliding_window=4096.5),
    "window-0": set_json("config.json", model_type="mistral", sliding_window=0),
    "tie-string": set_json("config.json", tie_word_embeddings="false"),
    "bias-string": set_json("config.json", attention_bias="no"),
    "attention-dropout-string": set_json("config.json", attention_dropout="x"),
    "attention-dropout-1": set_json("config.json", attention_dropout=1.0),
    # other files
    "int-weights": edit_tensors(int_norm),
    "special-map-list": write("special_tokens_map.json", "[]"),
    "special-map-int": set_json("special_tokens_map.json", bos_token=5),
    "special-map-content-list": set_json("special_tokens_map.json", eos_token={"content": ["<|im_end|>"]}),
    "tokenizer-config-int": set_json("tokenizer_config.json", pad_token=7),
    "config-utf16": reencode("config.json", "utf-16"),
    "config-utf8-bom": reencode("config.json", "utf-8-sig"),
    "tokenizer-utf8-bom": reencode("tokenizer.json", "utf-8-sig"),
    "config-latin1": lambda m: own(m / "config.json").write_bytes(
        (m / "config.json").read_text().replace('"llama"', '"llama", "name": "caf\xe9"').encode("latin-1")
    ),
    "config-deep": write("config.json", DEEP),
    # an untied base model saved alone (Qwen3-Embedding-8B): no lm_head.weight
    "untied-no-lm-head": set_json("config.json", tie_word_embeddings=False),
    "vocab-huge": set_json("config.json", vocab_size=10**20),  # torch's error: a C++ stack dump
    "index-and-single": lambda m: (  # a stale index beside model.safetensors (or the other way round)
        shutil.copy(m / "model.safetensors", m / "model-00001-of-00001.safetensors"),
        (m / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}})
        ),
    ),
    # older Llama checkpoints saved RoPE's frequencies; transformers ignores them
    "rotary-inv-freq": edit_tensors(
        lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    ),
    "index-bad-value": lambda m: (
        (m / "model.safetensors").unlink(),
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 5}})),
    ),
}

ADAPTERS = {  # name in {a}: edit of a copy of the finished run's final/
    "good": lambda a: None,
    "truncated": lambda a: truncate(a / "adapter_model.safetensors"),
    "nan": edit_tensors(nan_lora, "adapter_model.safetensors"),
    "no-weights": lambda a: (a / "adapter_model.safetensors").unlink(),
    "config-malformed": write("adapter_config.json", '{"r": 4, "lora_alpha":'),
    "config-list": write("adapter_config.json", "[]"),
    "config-utf16": reencode("adapter_config.json", "utf-16"),
    "dora": set_json("adapter_config.json", use_dora=True),
    "target-wq": set_json("adapter_config.json", target_modules=["q_proj", "wq"]),
    "target-c-attn": set_json("adapter_config.json", target_modules=["c_attn"]),
    "pattern-blocks": set_json("adapter_config.json", layers_pattern="blocks"),
    "layers-0": set_json("adapter_config.json", layers_to_transform=[0]),
    "rank-8": set_json("adapter_config.json", r=8),
    "not-lora": set_json("adapter_config.json", peft_type="IA3"),
    "foreign-keys": edit_tensors(
        lambda t: {k.replace("layers.", "blocks."): v for k, v in t.items()}, "adapter_model.safetensors"
    ),
    "r-0": set_json("adapter_config.json", r=0),
    "r-float": set_json("adapter_config.json", r=4.5),
    "r-bool": set_json("adapter_config.json", r=True),
    "alpha-inf": write("adapter_config.json", '{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity}'),
    "alpha-negative": set_json("adapter_config.json", lora_alpha=-8),
    "dropout-string": set_json("adapter_config.json", lora_dropout="x"),
    "rank-pattern-list": set_json("adapter_config.json", rank_pattern=["q_proj"]),
    "rslora-string": set_json("adapter_config.json", use_rslora="yes"),
}


def evaldata(edit=None):
    """An evaluation data folder: STS-B dev, SICK trial and a small BEIR set (as msmarco-subset)."""

    def build(e: Path):
        (e / "stsbenchmark").mkdir(parents=True)
        (e / "stsbenchmark" / "sts-dev.csv").write_text(sts_text(STS_ROWS))
        (e / "sick").mkdir()
        (e / "sick" / "SICK_trial.txt").write_text(sick_text(STS_ROWS))
        beir = e / "retrieval" / "agentset_msmarco_subset"
        (beir / "qrels").mkdir(parents=True)
        (beir / "corpus.jsonl").write_text(jsonl(CORPUS))
        (beir / "queries.jsonl").write_text(jsonl(QUERIES))
        (beir / "qrels" / "test.tsv").write_text(QRELS)
        if edit:
            edit(e)

    return build


STSB, SICK, BEIR = "stsbenchmark/sts-dev.csv", "sick/SICK_trial.txt", "retrieval/agentset_msmarco_subset"
EVALDATA = {  # name in {ev}: an evaluation folder, as built or edited
    "good": evaldata(),
    "no-sick": evaldata(lambda e: shutil.rmtree(e / "sick")),
    "sts-malformed": evaldata(write(STSB, "A cat.\tA dog.\t4.0\n")),
    "sts-latin1": evaldata(write(STSB, sts_text(STS_ROWS).replace("A man", "Caf\xe9").encode("latin-1"))),
    "sts-constant-gold": evaldata(write(STSB, sts_text([(3.0, a, b) for _, a, b in STS_ROWS]))),
    "sts-blank-sentence": evaldata(write(STSB, sts_text(STS_ROWS[:3] + [(2.0, "  ", "A cat.")]))),
    "sts-gold-nan": evaldata(write(STSB, sts_text(STS_ROWS[:3] + [("nan", "A cat.", "A dog.")]))),
    "sts-gold-inf": evaldata(write(STSB, sts_text(STS_ROWS[:3] + [("inf", "A cat.", "A dog.")]))),
    "sts-gold-text": evaldata(write(STSB, sts_text(STS_ROWS[:3] + [("high", "A cat.", "A dog.")]))),
    "sts-empty": evaldata(write(STSB, "")),
    "sts-one-pair": evaldata(write(STSB, sts_text(STS_ROWS[:1]))),
    "sts-cr": evaldata(write(STSB, sts_text(STS_ROWS).replace("\n", "\r").encode())),
    "sick-blank-sentence": evaldata(write(SICK, sick_text(STS_ROWS[:3] + [(2.0, "A cat.", " ")]))),
    "sick-no-header": evaldata(write(SICK, sick_text(STS_ROWS).split("\n", 1)[1])),
    "sick-empty": evaldata(write(SICK, "")),
    "qrels-unknown-doc": evaldata(write(f"{BEIR}/qrels/test.tsv", QRELS + "q0\tnope\t1\n")),
    "qrels-unknown-query": evaldata(write(f"{BEIR}/qrels/test.tsv", QRELS + "q9\td0\t1\n")),
    "qrels-no-relevant": evaldata(write(f"{BEIR}/qrels/test.tsv", "q0\td0\t0\n")),
    "qrels-bad-score": evaldata(write(f"{BEIR}/qrels/test.tsv", QRELS + "q0\td1\tx\n")),
    "qrels-empty": evaldata(write(f"{BEIR}/qrels/test.tsv", "")),
    "corpus-text-number": evaldata(write(f"{BEIR}/corpus.jsonl", jsonl(CORPUS + [{"_id": "d9", "text": 5}]))),
    "corpus-duplicate-id": evaldata(
        write(f"{BEIR}/corpus.jsonl", jsonl(CORPUS + [{"_id": "d0", "text": "x"}]))
    ),
    "corpus-all-empty": evaldata(write(f"{BEIR}/corpus.jsonl", jsonl({**c, "text": " "} for c in CORPUS))),
    "queries-missing": evaldata(lambda e: (e / BEIR / "queries.jsonl").unlink()),
    "query-blank": evaldata(write(f"{BEIR}/queries.jsonl", jsonl(QUERIES + [{"_id": "q5", "text": " "}]))),
    "sts-nul": evaldata(write(STSB, sts_text(STS_ROWS).replace("guitar.", "guitar\x00."))),
    "sts-gold-underscore": evaldata(write(STSB, sts_text(STS_ROWS[:3] + [("4_5", "A cat.", "A dog.")]))),
    "corpus-title-number": evaldata(
        write(f"{BEIR}/corpus.jsonl", jsonl(CORPUS + [{"_id": "d9", "title": 5, "text": "x"}]))
    ),
    "corpus-id-null": evaldata(write(f"{BEIR}/corpus.jsonl", jsonl(CORPUS + [{"_id": None, "text": "x"}]))),
    "qrels-one-float-score": evaldata(write(f"{BEIR}/qrels/test.tsv", "q0\td0\t1.0\n")),
}


# ----------------------------------------------------------------------------- argv helpers


def T(out="{tmp}/out", steps=2, objective="mntp", train_file=None, save_every=0):
    """train.py on the tiny model: a 2-step run into a fresh folder unless told otherwise."""
    train_file = train_file or {"supervised": "{triples}", "cosent": "{pairs}"}.get(objective, "{sents}")
    return [
        "--objective",
        objective,
        "--model",
        "{tiny}",
        "--train_file",
        train_file,
        "--output_dir",
        out,
        "--max_steps",
        str(steps),
        "--batch_size",
        "4",
        "--max_seq_length",
        "32",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--autocast",
        "none",
        "--progress",
        "false",
        "--log_every",
        "1",
    ] + (["--save_every", str(save_every)] if save_every else [])


def RUN6(out="{tmp}/run"):
    """The finished run's own arguments (6 steps, checkpoints at 2 and 4), for resuming a copy of it."""
    return T(out, steps=6, save_every=2) + ["--lr", "1e-3"]


SIMCSE = [
    "--config",
    "{repo}/configs/simcse/smollm2-135m.json",
    "--model",
    "{tiny}",  # the demo preset
    "--train_file",
    "{sents}",
    "--output_dir",
    "{tmp}/out",
    "--init_adapter",
    "{a}/good",
    "--max_steps",
    "2",
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
    "--eval_every",
    "1",
    "--save_every",
    "1",
]


def E(*argv, model="{tiny}"):
    return ["--model", model, "--autocast", "none", *argv]


def V(*argv, data="good", tasks="stsb-dev"):
    return [
        "--model",
        "{tiny}",
        "--data-dir",
        "{ev}/" + data,
        "--tasks",
        tasks,
        "--out",
        "{tmp}/res.json",
        "--autocast",
        "none",
        "--max-batch-tokens",
        "1024",
        *argv,
    ]


def texts(n):
    return [a for i in range(n) for a in ("--text", f"text number {i}")]


# ----------------------------------------------------------------------------- setups and checks


def copy_run(src="{run}", rel="run", edit=None):
    def setup(ctx):
        shutil.copytree(ctx.fill(src), ctx.tmp / rel)
        if edit:
            edit(ctx.tmp / rel)

    return setup


def in_tmp(name, content):
    def setup(ctx):
        p = ctx.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)

    return setup


def chain(*setups):
    def setup(ctx):
        for s in setups:
            s(ctx)

    return setup


def hold_lock(rel="out"):
    """What a running train.py holds: an exclusive lock on <output_dir>/.lock (released at teardown)."""

    def setup(ctx):
        (ctx.tmp / rel).mkdir(parents=True, exist_ok=True)
        f = open(ctx.tmp / rel / ".lock", "a")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ctx.cleanup.append(f.close)

    return setup


def full_disk(method: str, when: str):
    """A disk that fills up while a file whose path holds `when` is written by Path.<method> (or by torch.save
    straight to the file: torch reports that as a RuntimeError of its own)."""

    def setup(ctx):
        real, real_save = getattr(Path, method), torch.save

        def fake(self, data, *a, **k):
            if when in str(self):
                real(self, data[: len(data) // 2], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data, *a, **k)

        def fake_save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and when.replace("/.", "/") in str(f):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return real_save(obj, f, *a, **k)

        ctx.monkeypatch.setattr(Path, method, fake)
        ctx.monkeypatch.setattr(torch, "save", fake_save)

    return setup


def full_disk_npy(ctx):
    def fake(f, array, *a, **k):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.monkeypatch.setattr(np, "save", fake)


def full_disk_safetensors(when: str):
    """A disk that fills up while safetensors writes a file whose path holds `when`: its own error type."""

    def setup(ctx):
        import safetensors.torch
        from safetensors import SafetensorError

        import l2v.adapters
        import l2v.checkpoint

        real = safetensors.torch.save_file

        def fake(tensors, path, metadata=None):
            if when not in str(path):
                return real(tensors, path, metadata=metadata)
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        for module in (safetensors.torch, l2v.checkpoint, l2v.adapters):  # wherever it was imported to
            ctx.monkeypatch.setattr(module, "save_file", fake, raising=False)

    return setup


def full_disk_log(ctx):
    import builtins

    import l2v.files

    def fake(path, mode="r", *a, **k):
        if str(path).endswith("log.jsonl") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)

    for module in (l2v.files, train):  # where a log line is written
        ctx.monkeypatch.setattr(module, "open", fake, raising=False)


def lower_line_limit(ctx):
    import l2v.data

    ctx.monkeypatch.setattr(l2v.data, "MAX_LINE_BYTES", 1000)


def npy(rel="{tmp}/emb.npy", rows=None, distinct=False, equal=None, unit=False):
    def check(ctx, result, out):
        a = np.load(ctx.fill(rel))
        assert a.ndim == 2 and (rows is None or a.shape[0] == rows), f"{rel}: {a.shape}, not {rows} rows"
        assert np.isfinite(a).all(), f"{rel}: non-finite values"
        if distinct:
            assert not np.allclose(a[0], a[1:], atol=1e-6), f"{rel}: every row is the same vector"
        if equal:
            assert np.allclose(a[equal[0]], a[equal[1]], atol=1e-5), f"{rel}: rows {equal} differ (same text)"
        if unit:
            assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4), f"{rel}: rows not unit-norm"

    return check


def run_done(rel="{tmp}/out", resumed_from=None, max_steps=None, log_key=None):
    def check(ctx, result, out):
        folder = Path(ctx.fill(rel))
        assert (folder / "final" / "adapter_model.safetensors").is_file(), f"{rel}/final not saved"
        if resumed_from:
            assert f"resumed from {folder / resumed_from} at step" in out, f"not resumed from {resumed_from}"
        if max_steps:
            assert json.loads((folder / "final" / "train_config.json").read_text())["max_steps"] == max_steps
        if log_key:
            recs = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
            assert [r[log_key] for r in recs if log_key in r], f"log.jsonl has no {log_key}"

    return check


def results_json(n):
    def check(ctx, result, out):
        obj = json.loads((ctx.tmp / "res.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
        scores = [v for r in obj["results"] for v in r["scores"].values()]
        assert len(obj["results"]) == n and None not in scores, obj["results"]

    return check


def same_as_good(ctx, result, out):
    """Embeddings equal to the unchanged model's (the file was read, not misread)."""
    from l2v.encoder import Encoder

    want = Encoder.from_pretrained(ctx.fill("{tiny}"), autocast="none").encode(["A cat.", "A dog."])
    assert np.allclose(np.load(ctx.tmp / "emb.npy"), want, atol=1e-5), "differs from the good model's"


def merge_failed_cleanly(ctx, result, out):
    assert (ctx.tmp / "out" / "final" / "adapter_model.safetensors").is_file(), "final/ lost"
    assert not (ctx.tmp / "merged").exists() and not (ctx.tmp / ".tmp-merged").exists(), "half merged"


def merged_folder(ctx, result, out):
    m = ctx.tmp / "merged"
    assert (m / "model.safetensors").is_file() and (m / "tokenizer.json").is_file(), "no merged folder"


def merged_through_link(ctx, result, out):
    assert (ctx.tmp / "link").is_symlink(), "the link was replaced"
    assert (ctx.tmp / "empty" / "model.safetensors").is_file(), "the folder it points to was not filled"


def user_files_kept(ctx, result, out):
    run = ctx.tmp / "run"
    assert (run / "notes.txt").read_text() == "mine" and not (run / "checkpoint-000004").exists()
    assert json.loads((run / "final" / "train_config.json").read_text())["max_steps"] == 2


def checkpoint_kept(rel, step):
    def check(ctx, result, out):
        state = torch.load(ctx.tmp / rel / f"checkpoint-{step:06d}" / "trainer_state.pt", weights_only=True)
        assert state["step"] == step
        assert not list((ctx.tmp / rel).glob(".tmp-*")), "a temporary folder was left behind"

    return check


# --- the Python API


def api_encode(*args, **kw):
    return lambda ctx: ctx.encoder().encode(*args, **kw)


def api_load(model="{tiny}", **kw):
    def load(ctx):
        from l2v import Encoder

        fill = lambda v: [ctx.fill(x) for x in v] if isinstance(v, list) else ctx.fill(v)  # noqa: E731
        return Encoder.from_pretrained(fill(model), **{k: fill(v) for k, v in kw.items()})

    return load


def api_llm2vec(*sentences, model="{tiny}", **kw):
    """LLM2Vec.from_pretrained(model, **kw), then .encode(sentences[0]) if given."""

    def call(ctx):
        from l2v import LLM2Vec

        m = LLM2Vec.from_pretrained(ctx.fill(model), **kw)
        return m.encode(sentences[0], show_progress_bar=False) if sentences else m

    return call


def api_mteb(**kw):
    def call(ctx):
        pytest.importorskip("mteb")
        from l2v.mteb import MTEBModel

        return MTEBModel(ctx.fill("{tiny}"), autocast="none", **kw)

    return call


def shape(rows):
    def check(ctx, result, out):
        assert isinstance(result, np.ndarray) and result.shape == (rows, 64) and np.isfinite(result).all()

    return check


# ----------------------------------------------------------------------------- the table

NOT_A_RUN = ("--output_dir", "earlier run", "--resume")
CASES = [
    # ================================================================ 1 nothing lost
    Case(
        "train/rerun-into-finished-run",
        "loss",
        "train",
        RUN6(),
        "error",
        NOT_A_RUN + ("--overwrite",),
        setup=copy_run(),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/new-run-into-finished-run",
        "loss",
        "train",
        T("{tmp}/run") + ["--lr", "5e-3"],
        "error",
        NOT_A_RUN,
        setup=copy_run(),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/output-dir-holds-user-files",
        "loss",
        "train",
        T("{tmp}/notes"),
        "error",
        ("--output_dir", "not empty", "--overwrite"),
        setup=in_tmp("notes/README.txt", "my notes"),
        protect=("{tmp}/notes",),
    ),
    Case(
        "train/output-dir-is-file",
        "loss",
        "train",
        T("{d}/file"),
        "error",
        ("--output_dir", "not a folder"),
        protect=("{d}/file",),
    ),
    Case(
        "train/output-dir-under-file",
        "loss",
        "train",
        T("{d}/file/out"),
        "error",
        ("--output_dir", "file"),
        protect=("{d}/file",),
    ),
    Case(
        "train/overwrite-init-adapter-own-final",
        "loss",
        "train",
        T("{tmp}/run") + ["--overwrite", "true", "--init_adapter", "{tmp}/run/final"],
        "error",
        ("--init_adapter", "final", "rewritten"),
        setup=copy_run(),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/overwrite-init-adapter-own-checkpoint",
        "loss",
        "train",
        T("{tmp}/run") + ["--overwrite", "true", "--init_adapter", "{tmp}/run/checkpoint-000004"],
        "error",
        ("--init_adapter", "checkpoint-000004"),
        setup=copy_run(),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/overwrite-init-adapter-is-output-dir",
        "loss",
        "train",
        T("{tmp}/ad") + ["--overwrite", "true", "--init_adapter", "{tmp}/ad"],
        "error",
        ("--init_adapter", "--output_dir"),
        setup=copy_run("{a}/good", "ad"),
        protect=("{tmp}/ad",),
    ),
    Case(
        "train/overwrite-train-file-in-own-final",
        "loss",
        "train",
        T("{tmp}/run", train_file="{tmp}/run/final/sents.txt") + ["--overwrite", "true"],
        "error",
        ("--train_file", "rewritten"),
        protect=("{tmp}/run",),
        setup=copy_run(edit=lambda r: (r / "final" / "sents.txt").write_text(" ".join(["word"] * 2000))),
    ),
    Case(
        "train/merge-out-own-final",
        "loss",
        "train",
        T("{tmp}/run") + ["--overwrite", "true", "--merge_out", "{tmp}/run/final"],
        "error",
        ("--merge_out", "final"),
        setup=copy_run(),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/merge-out-is-output-dir",
        "loss",
        "train",
        T() + ["--merge_out", "{tmp}/out"],
        "error",
        ("--merge_out", "--output_dir"),
    ),
    Case(
        "train/merge-out-holds-output-dir",
        "loss",
        "train",
        T("{tmp}/m/out") + ["--merge_out", "{tmp}/m"],
        "error",
        ("--merge_out", "--output_dir"),
    ),
    Case(
        "train/merge-out-existing-model",
        "loss",
        "train",
        T() + ["--merge_out", "{tiny}"],
        "error",
        ("--merge_out", "not empty"),
        protect=("{tiny}",),
    ),
    Case(
        "train/merge-out-is-file",
        "loss",
        "train",
        T() + ["--merge_out", "{d}/file"],
        "error",
        ("--merge_out", "file"),
        protect=("{d}/file",),
    ),
    Case(
        "train/merge-out-ok",
        "loss",
        "train",
        T() + ["--merge_out", "{tmp}/merged"],
        "ok",
        check=merged_folder,
    ),
    Case(
        "train/overwrite-keeps-user-files",
        "loss",
        "train",
        T("{tmp}/run") + ["--overwrite", "true"],
        "ok",
        setup=copy_run(edit=lambda r: (r / "notes.txt").write_text("mine")),
        check=user_files_kept,
    ),
    Case(
        "train/second-run-on-locked-folder",
        "loss",
        "train",
        T(),
        "error",
        ("--output_dir", "another train.py"),
        setup=hold_lock(),
    ),
    Case(
        "train/second-run-resuming-locked-folder",
        "loss",
        "train",
        RUN6() + ["--resume", "true"],
        "error",
        ("--output_dir", "another train.py"),
        setup=chain(copy_run(), hold_lock("run")),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/stale-lock-of-a-killed-run",
        "loss",
        "train",
        T(),
        "ok",
        setup=in_tmp("out/.lock", ""),
        check=run_done(),
    ),
    Case(
        "train/full-disk-at-a-checkpoint",
        "loss",
        "train",
        T(steps=6, save_every=2),
        "error",
        ("checkpoint-000004", "no space left"),
        late=True,
        setup=full_disk_safetensors(".tmp-checkpoint-000004"),
        check=checkpoint_kept("out", 2),
    ),
    Case(
        "train/full-disk-at-trainer-state",
        "loss",
        "train",
        T(steps=6, save_every=2),
        "error",
        ("checkpoint-000004", "no space left"),
        late=True,
        setup=full_disk("write_bytes", ".tmp-checkpoint-000004/.trainer_state"),
        check=checkpoint_kept("out", 2),
    ),
    Case(
        "train/full-disk-at-final",
        "loss",
        "train",
        T(steps=4, save_every=2),
        "error",
        ("final", "no space left"),
        late=True,
        setup=full_disk_safetensors(".tmp-final"),
        check=checkpoint_kept("out", 2),
    ),
    Case(
        "train/full-disk-at-the-log",
        "loss",
        "train",
        T(),
        "error",
        ("log.jsonl", "no space left"),
        late=True,
        setup=full_disk_log,
    ),
    Case(
        "train/full-disk-at-merge",
        "loss",
        "train",
        T() + ["--merge_out", "{tmp}/merged"],
        "error",
        ("merged", "no space left"),
        late=True,
        setup=full_disk_safetensors(".tmp-merged"),
        check=merge_failed_cleanly,
    ),
    Case(
        "encode/full-disk-keeps-earlier-npy",
        "loss",
        "encode",
        E("--text", "A cat.", "--out", "{tmp}/emb.npy"),
        "error",
        ("emb.npy", "no space left"),
        protect=("{tmp}/emb.npy",),
        setup=chain(in_tmp("emb.npy", b"an earlier result"), full_disk_npy),
    ),
    Case(
        "eval/full-disk-keeps-earlier-json",
        "loss",
        "eval",
        V(),
        "error",
        ("res.json", "no space left"),
        protect=("{tmp}/res.json",),
        setup=chain(in_tmp("res.json", '{"earlier": 1}'), full_disk("write_text", ".res.json.tmp")),
    ),
    Case(  # a model's config.json is a .json file too
        "eval/out-is-a-model-file",
        "loss",
        "eval",
        V("--model", "{tmp}/model", "--out", "{tmp}/model/config.json"),
        "error",
        ("--out", "config.json", "--model"),
        setup=lambda ctx: shutil.copytree(ctx.fill("{tiny}"), ctx.tmp / "model"),
        protect=("{tmp}/model",),
    ),
    Case(
        "eval/out-is-an-adapter-file",
        "loss",
        "eval",
        V("--adapter", "{tmp}/adapter", "--out", "{tmp}/adapter/adapter_config.json"),
        "error",
        ("--out", "adapter_config.json", "--adapter"),
        setup=lambda ctx: shutil.copytree(ctx.fill("{a}/good"), ctx.tmp / "adapter"),
        protect=("{tmp}/adapter",),
    ),
    Case(  # "" is Path("."): the current folder
        "train/output-dir-empty-string",
        "loss",
        "train",
        T(""),
        "error",
        ("--output_dir", "required"),
    ),
    Case(
        "train/merge-out-link-to-empty-folder-ok",
        "loss",
        "train",
        T() + ["--merge_out", "{tmp}/link"],
        "ok",
        setup=lambda ctx: ((ctx.tmp / "empty").mkdir(), (ctx.tmp / "link").symlink_to(ctx.tmp / "empty")),
        check=merged_through_link,
    ),
    # ================================================================ 2 numbers, types, choices
    *[
        Case(f"train/{flag.strip('-')}-{raw}", "values", "train", T() + [flag, raw], "error", (flag,) + w)
        for flag, raw, w in [
            ("--max_steps", "0", (">=1",)),
            ("--max_steps", "-1", (">=1",)),
            ("--max_steps", "1e3", ("int",)),
            ("--batch_size", "0", ()),
            ("--batch_size", "-4", ()),
            ("--batch_size", "4.0", ("int",)),
            ("--micro_batch_size", "3", ("--batch_size",)),
            ("--lr", "-1", ()),
            ("--lr", "fast", ("float",)),
            ("--lr", "inf", ("finite",)),
            ("--lr", "nan", ("finite",)),
            ("--lr", "0", ()),
            ("--lora_alpha", "inf", ("finite",)),
            ("--lora_alpha", "0", ()),
            ("--scale", "inf", ("finite",)),
            ("--scale", "-1", ()),
            ("--grad_clip", "inf", ("finite",)),
            ("--weight_decay", "nan", ("finite",)),
            ("--seed", "-1", (">=0",)),
            ("--seed", str(2**64), ("2**32",)),  # torch's generators overflow: not one line naming --seed
            ("--lr", "1_0", ("cannot read",)),  # float("1_0") is 10
            ("--lora_r", "0", ()),
            ("--lora_r", "2.5", ()),
            ("--mask_probability", "1.5", ()),
            ("--mask_probability", "0", ()),
            ("--attention_dropout", "1.5", ()),
            ("--lora_dropout", "1", ()),
            ("--max_seq_length", "0", ()),
            ("--max_seq_length", "1", ()),
            ("--keep_checkpoints", "0", ()),
            ("--eval_every", "-1", ()),
            ("--lora_targets", "", ("at least one",)),
            ("--lora_targets", ",", ("at least one",)),
            ("--lora_targets", "wq", ("wq",)),
            ("--lora_targets", "q_proj,v_porj", ("v_porj",)),
            ("--lora_targets", "q_proj,q_proj", ("repeated",)),
            ("--lora_layers", "[99]", ("99",)),
            ("--lora_layers", "-1", ("-1",)),
            ("--lora_layers", "1.5", ()),
            ("--lora_layers", "[1.5]", ("1.5",)),
            ("--lora_layers", "[true]", ("True",)),
            ("--objective", "mlm", ("mlm",)),
            ("--pooling", "max", ()),
            ("--mask_token", "mask", ()),
            ("--weights_dtype", "int8", ()),
            ("--weights_dtype", "float64", ()),
            ("--autocast", "fp8", ()),
            ("--resume", "maybe", ()),
            ("--progress", "maybe", ()),
            ("--prompt", "no slot", ("{text}",)),
            ("--eval_every", "1", ("--eval_file",)),
        ]
    ],
    Case(
        "train/unknown-flag",
        "values",
        "train",
        T() + ["--learning_rate", "1e-3"],
        "error",
        ("--learning_rate",),
    ),
    Case(
        "train/resume-and-overwrite",
        "values",
        "train",
        T() + ["--resume", "true", "--overwrite", "true"],
        "error",
        ("--resume", "--overwrite"),
    ),
    Case(
        "train/train-file-not-given",
        "values",
        "train",
        T()[:4] + T()[6:],
        "error",
        ("--train_file", "required"),
        setup=lambda ctx: ctx.monkeypatch.setattr("l2v.config.DATA_DIR", ctx.tmp / "no-data"),
    ),
    *[
        Case(
            f"train/config-{name.removesuffix('.json')}",
            "values",
            "train",
            T() + ["--config", "{d}/" + name],
            "error",
            (name,) + w,
        )
        for name, w in [
            ("list.json", ("object",)),
            ("malformed.json", ("malformed JSON",)),
            ("unknown-key.json", ("learning_rate",)),
            ("wrong-type.json", ("warmup_steps",)),
            ("lr-inf.json", ("lr", "finite")),
            ("lr-1e400.json", ("lr", "finite")),
            ("lr-nan.json", ("lr", "finite")),
            ("lr-string.json", ("lr",)),
            ("steps-bool.json", ("max_steps",)),
            ("batch-float.json", ("batch_size",)),
            ("alpha-inf.json", ("lora_alpha", "finite")),
            ("layers-true.json", ("lora_layers", "True")),
            ("layers-float.json", ("lora_layers", "1.0")),
            ("layers-int.json", ("lora_layers", "list")),
            ("targets-empty.json", ("lora_targets",)),
            ("targets-blank.json", ("lora_targets",)),
            ("init-adapter-str.json", ("init_adapter",)),
            ("prompt-number.json", ("prompt",)),
            ("seed-null.json", ("seed",)),
            ("cfg-deep.json", ("nested",)),
            ("cfg-latin1.json", ("UTF",)),
        ]
    ],
    Case(
        "train/config-missing",
        "values",
        "train",
        T() + ["--config", "{d}/nope.json"],
        "error",
        ("nope.json", "not found"),
    ),
    Case(
        "train/config-objective-unknown",
        "values",
        "train",
        T()[2:] + ["--config", "{d}/objective-mlm.json"],
        "error",
        ("objective-mlm.json", "objective", "mlm"),
    ),
    Case(
        "train/config-objective-list",
        "values",
        "train",
        T()[2:] + ["--config", "{d}/objective-list.json"],
        "error",
        ("objective-list.json", "objective"),
    ),
    Case(
        "train/config-objective-null",
        "values",
        "train",
        T()[2:] + ["--config", "{d}/cfg-objective-null.json"],
        "error",
        ("cfg-objective-null.json", "objective", "None"),
    ),
    *[
        Case(
            f"train/config-{enc}-ok",
            "values",
            "train",
            T() + ["--config", f"{{d}}/cfg-{enc}.json"],
            "ok",
            check=run_done(),
        )
        for enc in ("bom", "utf16", "utf32", "dup-key")
    ],
    *[
        Case(
            f"{cli}/{flag.strip('-')}-{raw or 'empty'}",
            "values",
            cli,
            (E if cli == "encode" else V)(*(["--text", "A cat."] if cli == "encode" else []), flag, raw),
            "error",
            w,
        )
        for cli, flag, raw, w in [
            ("encode", "--max-batch-tokens", "0", ("--max-batch-tokens",)),
            ("encode", "--max-batch-tokens", "-1", ("--max-batch-tokens",)),
            ("encode", "--max-batch-tokens", "many", ("--max-batch-tokens",)),
            ("encode", "--max-length", "0", ("--max-length",)),
            ("encode", "--max-length", "-5", ("--max-length",)),
            ("encode", "--max-length", "1e3", ("--max-length",)),
            ("encode", "--pooling", "max", ("--pooling",)),
            ("encode", "--dtype", "float64", ("--dtype",)),
            ("encode", "--dtype", "int8", ("--dtype",)),
            ("encode", "--autocast", "fp8", ("--autocast",)),
            ("encode", "--chat-template", "chatgpt", ("--chat-template",)),
            ("encode", "--prompt", "no slot", ("prompt", "{text}")),
            ("encode", "--normalise", "", ("--normalise",)),
            ("eval", "--tasks", "", ("--tasks",)),
            ("eval", "--tasks", ",,", ("--tasks",)),
            ("eval", "--tasks", "stsb-devv", ("--tasks", "stsb-devv")),
            ("eval", "--tasks", "stsb", ("--tasks", "stsb")),
            ("eval", "--dtype", "float64", ("--dtype",)),
            ("eval", "--autocast", "yes", ("--autocast",)),
            ("eval", "--pooling", "max", ("--pooling",)),
            ("eval", "--chat-template", "chatgpt", ("--chat-template",)),
            ("eval", "--max-batch-tokens", "0", ("--max-batch-tokens",)),
            ("eval", "--max-batch-tokens", "-8", ("--max-batch-tokens",)),
            ("eval", "--max-length", "0", ("--max-length",)),
            ("eval", "--prompt", "no slot", ("prompt", "{text}")),
            ("eval", "--normalise", "", ("--normalise",)),
        ]
    ],
    Case(
        "encode/pooling-bos-token-without-bos",
        "values",
        "encode",
        E("--text", "A cat.", "--pooling", "bos_token"),
        "error",
        ("bos_token", "BOS"),
    ),
    Case(
        "encode/chat-template-foreign",
        "values",
        "encode",
        E("--text", "A cat.", "--chat-template", "llama3"),
        "error",
        ("llama3",),
    ),
    Case(
        "encode/instruction-fills-max-length",
        "values",
        "encode",
        E("--instruction", "word " * 700, "--text", "A cat.", "--out", "{tmp}/emb.npy"),
        "error",
        ("--instruction", "--max-length", "no room"),
    ),
    Case(
        "encode/instruction-fills-small-max-length",
        "values",
        "encode",
        E("--max-length", "6", "--instruction", "one two three four five six seven eight", "--text", "a"),
        "error",
        ("no room",),
    ),
    Case(
        "encode/max-length-1",
        "values",
        "encode",
        E("--text", "A cat sits.", "--max-length", "1", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=1),
    ),
    Case(
        "eval/sts-instruction-fills-max-length",
        "values",
        "eval",
        V("--max-length", "8", "--sts-instruction", "word " * 20),
        "error",
        ("--sts-instruction", "no room"),
    ),
    # ================================================================ 3 model folders
    *[
        Case(f"{cli}/model-{name}", "model", cli, args, "error", words)
        for name, words in [
            ("list-config", ("config.json", "object")),
            ("config-malformed", ("config.json", "malformed JSON")),
            ("config-missing-key", ("config.json", "hidden_size")),
            ("type-gpt2", ("config.json", "gpt2")),
            ("type-list", ("config.json", "model_type")),
            ("gemma-relu", ("config.json", "unsupported hidden_activation 'relu'")),
            ("no-tokenizer", ("tokenizer.json",)),
            ("tokenizer-garbage", ("tokenizer.json",)),
            ("no-weights", ("model.safetensors",)),
            ("truncated", ("model.safetensors",)),
            ("weights-empty", ("model.safetensors",)),
            ("pickle-only", ("pickle",)),
            ("empty-folder", ("config.json",)),
            ("hidden-size-0", ("config.json", "hidden_size")),
            ("hidden-size-str", ("config.json", "hidden_size")),
            ("hidden-size-float", ("config.json", "hidden_size")),
            ("layers-bool", ("config.json", "num_hidden_layers")),
            ("heads-0", ("config.json", "num_attention_heads")),
            ("kv-heads-3", ("config.json", "num_key_value_heads")),
            ("vocab-negative", ("config.json", "vocab_size")),
            ("intermediate-null", ("config.json", "intermediate_size")),
            ("head-dim-odd", ("config.json", "head_dim")),
            ("eps-string", ("config.json", "rms_norm_eps")),
            ("eps-0", ("config.json", "rms_norm_eps")),
            ("eps-inf", ("config.json", "rms_norm_eps")),
            ("theta-string", ("config.json", "rope_theta")),
            ("theta-0", ("config.json", "rope_theta")),
            ("theta-negative", ("config.json", "rope_theta")),
            ("llama3-missing-keys", ("config.json", "rope_scaling", "low_freq_factor")),
            ("llama3-low-above-high", ("config.json", "rope_scaling", "low_freq_factor")),
            ("linear-no-factor", ("config.json", "rope_scaling", "factor")),
            ("linear-factor-0", ("config.json", "rope_scaling", "factor")),
            ("rope-scaling-string", ("config.json", "rope_scaling")),
            ("rope-dynamic", ("config.json", "dynamic")),
            ("max-positions-0", ("config.json", "max_position_embeddings")),
            ("window-float", ("config.json", "sliding_window")),
            ("window-0", ("config.json", "sliding_window")),
            ("tie-string", ("config.json", "tie_word_embeddings")),
            ("bias-string", ("config.json", "attention_bias")),
            ("attention-dropout-string", ("config.json", "attention_dropout")),
            ("attention-dropout-1", ("config.json", "attention_dropout")),
            ("int-weights", ("model.safetensors", "model.norm.weight", "int32")),
            ("special-map-list", ("special_tokens_map.json", "object")),
            ("special-map-int", ("special_tokens_map.json", "bos_token")),
            ("special-map-content-list", ("special_tokens_map.json", "eos_token")),
            ("tokenizer-config-int", ("tokenizer_config.json", "pad_token")),
            ("config-latin1", ("config.json", "UTF")),
            ("config-deep", ("config.json", "nested")),
            ("index-bad-value", ("model.safetensors.index.json", "model.norm.weight")),
        ]
        for cli, args in [
            ("encode", E("--text", "A cat.", model=f"{{m}}/{name}")),
            ("train", T() + ["--model", f"{{m}}/{name}"]),
        ]
        if cli == "encode"
        or name
        in (
            "hidden-size-0",
            "heads-0",
            "eps-string",
            "theta-string",
            "int-weights",
            "special-map-list",
            "llama3-missing-keys",
            "list-config",
            "gemma-relu",
            "no-tokenizer",
            "truncated",
        )
    ],
    Case(
        "eval/model-kv-heads-3",
        "model",
        "eval",
        V() + ["--model", "{m}/kv-heads-3"],
        "error",
        ("config.json", "num_key_value_heads"),
    ),
    Case(
        "encode/model-tokenizer-larger-than-vocab",
        "model",
        "encode",
        E("--text", "A cat.", model="{m}/vocab-1000"),
        "error",
        ("tokenizer.json", "vocab_size"),
    ),
    Case(
        "train/model-tokenizer-larger-than-vocab",
        "model",
        "train",
        T() + ["--model", "{m}/vocab-1000"],
        "error",
        ("tokenizer.json", "vocab_size"),
    ),
    Case(
        "encode/model-missing",
        "model",
        "encode",
        E("--text", "A cat.", model="{d}/nomodel"),
        "error",
        ("nomodel", "config.json"),
    ),
    Case(
        "encode/model-is-file",
        "model",
        "encode",
        E("--text", "A cat.", model="{d}/file"),
        "error",
        ("file", "config.json"),
    ),
    Case("train/model-missing", "model", "train", T() + ["--model", "{d}/nomodel"], "error", ("nomodel",)),
    Case(
        "eval/model-missing",
        "model",
        "eval",
        V("--model", "{d}/nomodel"),
        "error",
        ("nomodel", "config.json"),
    ),
    *[
        Case(
            f"encode/model-{name}-ok",
            "model",
            "encode",
            E("--text", "A cat.", "--text", "A dog.", "--out", "{tmp}/emb.npy", model=f"{{m}}/{name}"),
            "ok",
            check=same_as_good,
        )
        for name in ("config-utf16", "config-utf8-bom", "tokenizer-utf8-bom", "untied-no-lm-head")
    ],
    Case(
        "encode/model-vocab-huge",
        "model",
        "encode",
        E("--text", "A cat.", model="{m}/vocab-huge"),
        "error",
        ("config.json", "vocab_size", "2**31"),
    ),
    Case(
        "encode/model-index-and-single",
        "model",
        "encode",
        E("--text", "A cat.", model="{m}/index-and-single"),
        "error",
        ("index-and-single", "model.safetensors.index.json", "stale"),
    ),
    Case(
        "encode/model-rotary-inv-freq-ok",
        "model",
        "encode",
        E("--text", "A cat.", "--text", "A dog.", "--out", "{tmp}/emb.npy", model="{m}/rotary-inv-freq"),
        "ok",
        check=same_as_good,
    ),
    Case(
        "train/model-untied-no-lm-head-mntp",
        "model",
        "train",
        T() + ["--model", "{m}/untied-no-lm-head"],
        "error",
        ("--model", "untied-no-lm-head", "lm_head.weight", "mntp"),
    ),
    # ================================================================ 3 adapter folders
    *[
        Case(f"{cli}/adapter-{name}", "adapter", cli, args, "error", words)
        for name, words in [
            ("truncated", ("adapter_model.safetensors",)),
            ("nan", ("adapter_model.safetensors", "NaN")),
            ("no-weights", ("adapter_model.safetensors",)),
            ("config-malformed", ("adapter_config.json",)),
            ("config-list", ("adapter_config.json",)),
            ("dora", ("adapter_config.json", "use_dora")),
            ("target-wq", ("adapter_config.json", "wq")),
            ("target-c-attn", ("adapter_config.json", "c_attn")),
            ("pattern-blocks", ("adapter_config.json", "layers_pattern")),
            ("layers-0", ("adapter_model.safetensors", "layers_to_transform")),
            ("rank-8", ("adapter_model.safetensors", "r=8")),
            ("not-lora", ("adapter_config.json", "IA3")),
            ("foreign-keys", ("adapter_model.safetensors", "blocks")),
            ("r-0", ("adapter_config.json", "'r'")),
            ("r-float", ("adapter_config.json", "'r'")),
            ("r-bool", ("adapter_config.json", "'r'")),
            ("alpha-inf", ("adapter_config.json", "lora_alpha")),
            ("alpha-negative", ("adapter_config.json", "lora_alpha")),
            ("dropout-string", ("adapter_config.json", "lora_dropout")),
            ("rank-pattern-list", ("adapter_config.json", "rank_pattern")),
            ("rslora-string", ("adapter_config.json", "use_rslora")),
        ]
        for cli, args in [
            ("encode", E("--text", "A cat.", "--adapter", f"{{a}}/{name}")),
            ("train", T() + ["--init_adapter", f"{{a}}/{name}"]),
            ("eval", V("--adapter", f"{{a}}/{name}")),
        ]
        if cli == "encode" or name in ("truncated", "nan", "layers-0", "r-0", "alpha-inf")
    ],
    Case(
        "encode/adapter-missing",
        "adapter",
        "encode",
        E("--text", "A cat.", "--adapter", "{d}/nope"),
        "error",
        ("nope", "adapter_config.json"),
    ),
    Case(
        "encode/adapter-is-file",
        "adapter",
        "encode",
        E("--text", "A cat.", "--adapter", "{d}/file"),
        "error",
        ("file", "adapter_config.json"),
    ),
    Case(
        "train/init-adapter-missing",
        "adapter",
        "train",
        T() + ["--init_adapter", "{d}/nope"],
        "error",
        ("nope",),
    ),
    Case("eval/adapter-missing", "adapter", "eval", V("--adapter", "{d}/nope"), "error", ("nope",)),
    Case(
        "encode/adapter-ok",
        "adapter",
        "encode",
        E("--adapter", "{a}/good", "--text", "A cat.", "--text", "A dog.", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, distinct=True),
    ),
    Case(
        "encode/adapter-config-utf16-ok",
        "adapter",
        "encode",
        E("--adapter", "{a}/config-utf16", "--text", "A cat.", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=1),
    ),
    # ================================================================ 4 input text and training data
    Case("encode/text-empty", "text", "encode", E("--text", ""), "error", ("--text #1", "empty")),
    Case("encode/text-spaces", "text", "encode", E("--text", "   "), "error", ("--text #1", "empty")),
    Case("encode/text-tab-newline", "text", "encode", E("--text", "\t\n "), "error", ("--text #1", "empty")),
    Case(
        "encode/text-one-blank-among-good",
        "text",
        "encode",
        E("--text", "ok", "--text", ""),
        "error",
        ("--text #2", "empty"),
    ),
    Case(
        "encode/text-lone-surrogate",
        "text",
        "encode",
        E("--text", "ok", "--text", "caf\udce9"),
        "error",
        ("--text #2", "Unicode"),
    ),
    Case(
        "encode/instruction-lone-surrogate",
        "text",
        "encode",
        E("--text", "ok", "--instruction", "\ud800 x"),
        "error",
        ("--instruction", "Unicode"),
    ),
    Case(
        "encode/prompt-lone-surrogate",
        "text",
        "encode",
        E("--text", "ok", "--prompt", "\ud800 {text}"),
        "error",
        ("prompt", "Unicode"),
    ),
    Case(
        "encode/text-very-long",
        "text",
        "encode",
        E("--text", "word " * 6000, "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=1),
    ),
    Case(
        "encode/text-unicode",
        "text",
        "encode",
        E("--text", "Café ☕ 日本語のテキスト 🙂", "--text", "naïve façade", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, distinct=True),
    ),
    Case(
        "encode/text-emoji-only",
        "text",
        "encode",
        E("--text", "🙂🙂", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=1),
    ),
    Case("encode/17-texts-no-out", "text", "encode", E(*texts(17)), "error", ("--out",)),
    Case(
        "encode/dtype-bfloat16-ok",
        "text",
        "encode",
        E("--text", "A cat.", "--text", "A dog.", "--dtype", "bfloat16", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, distinct=True),
    ),
    Case(
        "encode/normalize-ok",
        "text",
        "encode",
        E("--text", "A cat.", "--text", "A dog.", "--normalize", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, unit=True),
    ),
    *[
        Case(
            f"encode/file-{name.replace('.', '-')}",
            "text",
            "encode",
            E("--file", "{d}/" + name, "--out", "{tmp}/emb.npy"),
            "error",
            (name,) + w,
        )
        for name, w in [
            ("nope.txt", ("not found",)),
            ("folder", ()),
            ("empty.txt", ("no texts",)),
            ("blank.txt", ("no texts",)),
            ("latin1.txt", (":1", "UTF-8")),
            ("latin1.jsonl", (":1", "UTF-8")),
            ("utf16.txt", (":1", "UTF-8")),
            ("surrogate-utf8.txt", (":1", "UTF-8")),
            ("bad.jsonl", (":2", "malformed JSON")),
            ("notext.jsonl", (":1", "text")),
            ("blanktext.jsonl", (":2", "empty")),
            ("num.jsonl", (":1", "text")),
            ("inst-list.jsonl", (":1", "instruction")),
            ("list-record.jsonl", (":1", "object")),
            ("surrogate.jsonl", (":2", "Unicode")),
            ("surrogate-inst.jsonl", (":1", "instruction", "Unicode")),
            ("deep.jsonl", (":2", "nested")),
            ("nan-text.jsonl", (":1", "text")),
            ("x.csv", ("--file",)),
            ("utf16le-no-bom.txt", (":1", "NUL", "UTF-16")),
            ("nul.txt", (":2", "NUL")),
            ("text-null.jsonl", (":2", '"text" is null')),
        ]
    ],
    Case(  # null for an optional field is as if it were left out
        "encode/file-inst-null-jsonl-ok",
        "text",
        "encode",
        E("--file", "{d}/inst-null.jsonl", "--out", "{tmp}/emb.npy"),
        "ok",
        check=same_as_good,
    ),
    Case(
        "encode/file-line-over-limit",
        "text",
        "encode",
        E("--file", "{d}/long-line.txt", "--out", "{tmp}/emb.npy"),
        "error",
        ("long-line.txt:2", "MiB"),
        setup=lower_line_limit,
    ),
    Case("encode/file-20-lines-no-out", "text", "encode", E("--file", "{d}/many.txt"), "error", ("--out",)),
    Case(
        "encode/file-utf8-bom",
        "text",
        "encode",
        E("--file", "{d}/bom.txt", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, equal=(0, 1)),
    ),
    Case(
        "encode/file-crlf",
        "text",
        "encode",
        E("--file", "{d}/crlf.txt", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2, distinct=True),
    ),
    Case(
        "encode/file-bare-cr",
        "text",
        "encode",
        E("--file", "{d}/cr.txt", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=3, distinct=True),
    ),
    Case(
        "encode/file-mixed-line-endings",
        "text",
        "encode",
        E("--file", "{d}/mixed-endings.txt", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=4, distinct=True),
    ),
    Case(
        "encode/file-jsonl-ok",
        "text",
        "encode",
        E("--file", "{d}/ok.jsonl", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=20),
    ),
    *[
        Case(
            f"train/train-file-{name.replace('.', '-')}",
            "text",
            "train",
            T(objective=obj, train_file="{d}/" + name),
            "error",
            (name,) + w,
        )
        for obj, name, w in [
            ("mntp", "nope.txt", ("not found",)),
            ("mntp", "folder", ()),
            ("mntp", "empty.txt", ("no texts",)),
            ("mntp", "latin1.txt", (":1", "UTF-8")),
            ("mntp", "x.csv", ("file type",)),
            ("mntp", "surrogate.jsonl", (":2", "Unicode")),
            ("mntp", "deep.json", ("nested",)),
            ("mntp", "tiny.txt", ("--max_seq_length",)),
            ("supervised", "triples.csv", ("file type",)),
            ("supervised", "missing-field.jsonl", (":1", "negative")),
            ("supervised", "one-triple.jsonl", ("--batch_size",)),
            ("supervised", "dataset-list.jsonl", (":1", "dataset")),
            ("supervised", "dataset-number.jsonl", (":1", "dataset")),
            ("supervised", "long-instruction.jsonl", ("instruction", "no room", "--max_seq_length")),
            ("cosent", "pairs-bad-score.jsonl", (":9", "score", "'high'")),
            ("cosent", "pairs.txt", (":1", "sentence1")),
            ("cosent", "pairs-bool-score.jsonl", (":1", "score")),
            ("cosent", "pairs-one-score.jsonl", ("score", "2", "no two pairs")),
            ("mntp", "nul.txt", (":2", "NUL")),
        ]
    ],
    Case(
        "train/train-file-line-over-limit",
        "text",
        "train",
        T(train_file="{d}/long-line.txt"),
        "error",
        ("long-line.txt:2", "MiB"),
        setup=lower_line_limit,
    ),
    Case(
        "train/simcse-instruction-fills-max-length",
        "text",
        "train",
        T(objective="simcse") + ["--instruction", "word " * 60],
        "error",
        ("--instruction", "--max_seq_length"),
    ),
    Case(
        "train/train-file-bare-cr-ok",
        "text",
        "train",
        T(train_file="{d}/cr.txt") + ["--max_seq_length", "4", "--batch_size", "2"],
        "ok",
        check=run_done(),
    ),
    Case("train/supervised-ok", "text", "train", T(objective="supervised"), "ok", check=run_done()),
    Case("train/mntp-ok", "text", "train", T(), "ok", check=run_done()),
    Case(
        "train/eval-sts-file-missing",
        "text",
        "train",
        T() + ["--eval_sts_file", "{d}/nope.csv"],
        "error",
        ("nope.csv", "not found"),
    ),
    Case(
        "train/eval-sts-file-malformed",
        "text",
        "train",
        T() + ["--eval_sts_file", "{d}/bad-sts.csv"],
        "error",
        ("bad-sts.csv:1",),
    ),
    Case(
        "train/eval-sts-file-three-fields",
        "text",
        "train",
        T() + ["--eval_sts_file", "{d}/sts-bad.csv"],
        "error",
        ("sts-bad.csv:1",),
    ),
    Case(
        "train/eval-sts-file-non-utf8",
        "text",
        "train",
        T() + ["--eval_sts_file", "{d}/latin1-sts.csv"],
        "error",
        ("latin1-sts.csv:1", "UTF-8"),
    ),
    Case(
        "train/eval-file-missing",
        "text",
        "train",
        T() + ["--eval_file", "{d}/nope.txt"],
        "error",
        ("nope.txt",),
    ),
    Case(
        "train/eval-file-empty",
        "text",
        "train",
        T() + ["--eval_file", "{d}/empty.txt"],
        "error",
        ("empty.txt",),
    ),
    Case(
        "train/simcse-with-sts-ok",
        "text",
        "train",
        T(objective="simcse")
        + ["--init_adapter", "{a}/good", "--eval_sts_file", "{ev}/good/" + STSB, "--eval_every", "1"],
        "ok",
        check=run_done(log_key="eval_sts_spearman"),
    ),
    Case(
        "train/simcse-preset-ok",
        "text",
        "train",
        SIMCSE + ["--eval_sts_file", "{ev}/good/" + STSB],
        "ok",
        check=run_done(log_key="eval_sts_spearman"),
    ),
    Case(
        "train/simcse-preset-sts-file-missing",
        "text",
        "train",
        SIMCSE,
        "error",
        ("sts-dev.csv", "not found"),
        setup=lambda ctx: ctx.monkeypatch.chdir(ctx.tmp),
    ),  # the preset's path is relative to ../shared
    # ================================================================ 5 eval.py data
    Case(
        "eval/ok",
        "eval",
        "eval",
        V(tasks="stsb-dev,sick-r-trial,msmarco-subset"),
        "ok",
        check=results_json(3),
    ),
    Case("eval/sts-cr-line-endings-ok", "eval", "eval", V(data="sts-cr"), "ok", check=results_json(1)),
    Case("eval/data-dir-missing", "eval", "eval", V(data="nope"), "error", ("--data-dir", "nope")),
    Case(
        "eval/data-dir-is-file",
        "eval",
        "eval",
        V() + ["--data-dir", "{d}/file"],
        "error",
        ("--data-dir", "file"),
    ),
    *[
        Case(f"eval/{name}", "eval", "eval", V(data=name, tasks=tasks), "error", words)
        for name, tasks, words in [
            ("no-sick", "dev", ("SICK_trial.txt", "not found")),
            ("sts-malformed", "stsb-dev", ("sts-dev.csv:1",)),
            ("sts-latin1", "stsb-dev", ("sts-dev.csv:1", "UTF-8")),
            ("sts-constant-gold", "stsb-dev", ("sts-dev.csv", "undefined")),
            ("sts-blank-sentence", "stsb-dev", ("sts-dev.csv:4", "empty")),
            ("sts-gold-nan", "stsb-dev", ("sts-dev.csv:4", "finite")),
            ("sts-gold-inf", "stsb-dev", ("sts-dev.csv:4",)),
            ("sts-gold-text", "stsb-dev", ("sts-dev.csv:4", "'high'")),
            ("sts-empty", "stsb-dev", ("sts-dev.csv", "no")),
            ("sts-one-pair", "stsb-dev", ("sts-dev.csv", "undefined")),
            ("sick-blank-sentence", "sick-r-trial", ("SICK_trial.txt:5", "empty")),
            ("sick-no-header", "sick-r-trial", ("SICK_trial.txt:1", "header")),
            ("sick-empty", "sick-r-trial", ("SICK_trial.txt", "empty")),
            ("qrels-unknown-doc", "msmarco-subset", ("test.tsv:5", "nope", "corpus.jsonl")),
            ("qrels-unknown-query", "msmarco-subset", ("test.tsv:5", "q9", "queries.jsonl")),
            ("qrels-no-relevant", "msmarco-subset", ("test.tsv", "no relevant")),
            ("qrels-bad-score", "msmarco-subset", ("test.tsv:5", "'x'")),
            ("qrels-empty", "msmarco-subset", ("test.tsv", "no relevant")),
            ("corpus-text-number", "msmarco-subset", ("corpus.jsonl:7", "text")),
            ("corpus-duplicate-id", "msmarco-subset", ("corpus.jsonl:7", "d0")),
            ("corpus-all-empty", "msmarco-subset", ("corpus.jsonl", "text")),
            ("queries-missing", "msmarco-subset", ("queries.jsonl", "not found")),
            ("query-blank", "msmarco-subset", ("queries.jsonl:4", "empty")),
            ("sts-nul", "stsb-dev", ("sts-dev.csv:1", "NUL")),
            ("sts-gold-underscore", "stsb-dev", ("sts-dev.csv:4", "'4_5'")),
            ("corpus-title-number", "msmarco-subset", ("corpus.jsonl:7", "title")),
            ("corpus-id-null", "msmarco-subset", ("corpus.jsonl:7", "_id")),
            ("qrels-one-float-score", "msmarco-subset", ("test.tsv:1", "'1.0'")),
        ]
    ],
    # ================================================================ 6 resume
    Case(
        "train/resume-no-checkpoint",
        "resume",
        "train",
        T() + ["--resume", "true"],
        "error",
        ("--resume", "checkpoint"),
    ),
    Case(
        "train/resume-ok",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run("{part}"),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000004"),
    ),
    Case(
        "train/resume-larger-max-steps",
        "resume",
        "train",
        T("{tmp}/run", 8, save_every=2) + ["--lr", "1e-3", "--resume", "true"],
        "ok",
        setup=copy_run("{part}"),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000004", max_steps=8),
    ),
    *[
        Case(
            f"train/resume-changed-{flag.strip('-')}",
            "resume",
            "train",
            RUN6() + ["--resume", "true", flag, v],
            "error",
            ("--resume", flag.strip("-")),
            setup=copy_run("{part}"),
            protect=("{tmp}/run",),
        )
        for flag, v in [("--lr", "5e-3"), ("--lora_r", "8"), ("--seed", "1"), ("--max_seq_length", "16")]
    ],
    Case(
        "train/resume-changed-objective",
        "resume",
        "train",
        RUN6() + ["--resume", "true", "--objective", "simcse"],
        "error",
        ("--resume", "objective"),
        setup=copy_run("{part}"),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/resume-max-steps-below-checkpoint",
        "resume",
        "train",
        T("{tmp}/run", 3, save_every=2) + ["--lr", "1e-3", "--resume", "true"],
        "error",
        ("--max_steps", "checkpoint-000004"),
        setup=copy_run("{part}"),
        protect=("{tmp}/run",),
    ),
    Case(
        "train/resume-newest-adapter-truncated",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run(
            "{part}", edit=lambda r: truncate(r / "checkpoint-000004" / "adapter_model.safetensors")
        ),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000002"),
    ),
    Case(
        "train/resume-newest-trainer-state-truncated",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run("{part}", edit=lambda r: truncate(r / "checkpoint-000004" / "trainer_state.pt")),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000002"),
    ),
    Case(
        "train/resume-newest-trainer-state-not-a-dict",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run(
            "{part}", edit=lambda r: torch.save([1, 2], r / "checkpoint-000004" / "trainer_state.pt")
        ),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000002"),
    ),
    Case(
        "train/resume-newest-trainer-state-no-step",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run(
            "{part}",
            edit=lambda r: torch.save({"optimizer": {}}, r / "checkpoint-000004" / "trainer_state.pt"),
        ),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000002"),
    ),
    Case(
        "train/resume-newest-config-a-list",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run(
            "{part}", edit=lambda r: (r / "checkpoint-000004" / "train_config.json").write_text("[]")
        ),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000002"),
    ),
    Case(
        "train/resume-only-checkpoint-damaged",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "error",
        ("no intact checkpoint", "checkpoint-000004", "trainer_state.pt"),
        setup=copy_run(
            "{part}",
            edit=lambda r: (
                shutil.rmtree(r / "checkpoint-000002"),
                truncate(r / "checkpoint-000004" / "trainer_state.pt"),
            ),
        ),
    ),
    Case(
        "train/resume-log-with-a-torn-line",
        "resume",
        "train",
        RUN6() + ["--resume", "true"],
        "ok",
        setup=copy_run("{part}", edit=lambda r: open(r / "log.jsonl", "a").write('{"step": 5, "lo')),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000004"),
    ),
    Case(
        "train/resume-on-changed-data",
        "resume",
        "train",
        RUN6() + ["--resume", "true", "--train_file", "{tmp}/sents.txt"],
        "error",
        ("--train_file", "sents.txt", "--resume_other_data"),
        protect=("{tmp}/run",),
        setup=chain(
            copy_run("{part}"),
            lambda ctx: (ctx.tmp / "sents.txt").write_text(
                Path(ctx.fill("{sents}")).read_text().replace("cats", "lions")
            ),
        ),
    ),
    Case(
        "train/resume-on-changed-data-forced",
        "resume",
        "train",
        RUN6() + ["--resume", "true", "--train_file", "{tmp}/sents.txt", "--resume_other_data", "true"],
        "ok",
        setup=chain(
            copy_run("{part}"),
            lambda ctx: (ctx.tmp / "sents.txt").write_text(
                Path(ctx.fill("{sents}")).read_text().replace("cats", "lions")
            ),
        ),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000004"),
    ),
    Case(
        "train/resume-same-data-moved",
        "resume",
        "train",
        RUN6() + ["--resume", "true", "--train_file", "{tmp}/moved.txt"],
        "ok",
        setup=chain(copy_run("{part}"), lambda ctx: shutil.copy(ctx.fill("{sents}"), ctx.tmp / "moved.txt")),
        check=run_done("{tmp}/run", resumed_from="checkpoint-000004"),
    ),
    # ================================================================ 7 devices and the Python API
    *[
        Case(
            f"{cli}/device-{dev.replace(':', '')}",
            "api",
            cli,
            args + ["--device", dev],
            "error",
            ("device", dev),
        )
        for dev in ("meta", "mps", "tpu", "xla", "cuda:x", "cuda:7", "")
        for cli, args in [("train", T()), ("encode", E("--text", "A cat.")), ("eval", V())]
        if cli == "encode" or dev in ("meta", "mps") or cli == "train" and dev == "cuda:7"
    ],
    Case(
        "api/bare-pair",
        "api",
        "api",
        api_encode(("Retrieve similar text.", "A cat sits.")),
        "error",
        ("tuple", "list"),
    ),
    Case("api/bytes", "api", "api", api_encode(b"A cat."), "error", ("bytes",)),
    Case("api/bytes-in-list", "api", "api", api_encode(["A cat.", b"A dog."]), "error", ("input 1", "bytes")),
    Case("api/dict", "api", "api", api_encode({"text": "A cat."}), "error", ("dict",)),
    Case("api/none", "api", "api", api_encode(None), "error", ("NoneType",)),
    Case("api/number", "api", "api", api_encode(5), "error", ("int",)),
    Case("api/pair-with-number", "api", "api", api_encode([("Retrieve:", 5)]), "error", ("input 0",)),
    Case("api/triple", "api", "api", api_encode([("a", "b", "c")]), "error", ("input 0", "length 3")),
    Case("api/empty-text", "api", "api", api_encode(["A cat.", " "]), "error", ("input 1", "empty")),
    Case(
        "api/lone-surrogate",
        "api",
        "api",
        api_encode(["A cat.", "caf\ud800"]),
        "error",
        ("input 1", "Unicode"),
    ),
    Case(
        "api/lone-surrogate-instruction",
        "api",
        "api",
        api_encode([("\udfff", "A cat.")]),
        "error",
        ("input 0", "instruction", "Unicode"),
    ),
    *[
        Case(
            f"api/max-batch-tokens-{v!r}",
            "api",
            "api",
            api_encode(["A cat."], max_batch_tokens=v),
            "error",
            ("max_batch_tokens", "positive integer"),
        )
        for v in (0, -1, 1.5, True, "64")
    ],
    Case(
        "api/normalize-string", "api", "api", api_encode(["A cat."], normalize="no"), "error", ("normalize",)
    ),
    *[
        Case(f"api/load-{name}", "api", "api", api_load(**kw), "error", words)
        for name, kw, words in [
            ("device-meta", dict(device="meta"), ("device", "meta")),
            ("device-mps", dict(device="mps"), ("device", "mps")),
            ("device-number", dict(device=5), ("device",)),
            ("max-length-0", dict(max_length=0), ("max_length",)),
            ("max-length-bool", dict(max_length=True), ("max_length",)),
            ("max-length-float", dict(max_length=8.0), ("max_length",)),
            ("pooling-max", dict(pooling="max"), ("pooling",)),
            ("dtype-int8", dict(dtype="int8"), ("dtype",)),
            ("autocast-yes", dict(autocast="yes"), ("autocast",)),
            ("is-causal-string", dict(is_causal="yes"), ("is_causal",)),
            ("model-missing", dict(model="{d}/nope"), ("nope",)),
            ("model-bytes", dict(model=b"models"), ("model",)),
            ("adapter-nan", dict(adapters=["{a}/nan"]), ("NaN",)),
            ("adapters-number", dict(adapters=5), ("adapters",)),
            ("adapters-bytes-in-list", dict(adapters=[b"x"]), ("adapters",)),
            ("prompt-no-slot", dict(prompt="no slot"), ("prompt", "{text}")),
            ("dtype-torch-float64", dict(dtype=torch.float64), ("dtype", "float64")),
            ("dtype-torch-int8", dict(dtype=torch.int8), ("dtype", "int8")),
            ("prompt-number", dict(prompt=3), ("prompt",)),
        ]
    ],
    Case(  # numpy integers are integers, as for max_batch_tokens
        "api/load-max-length-numpy-ok",
        "api",
        "api",
        lambda ctx: api_load(max_length=np.int64(16), autocast="none")(ctx).encode(["A cat."]),
        "ok",
        check=shape(1),
    ),
    *[
        Case(f"api/llm2vec-{name}", "api", "api", call, "error", words)
        for name, call, words in [
            ("encode-none", api_llm2vec(None), ("sentences", "NoneType")),
            ("encode-number", api_llm2vec(5), ("sentences", "int")),
            ("load-none", api_llm2vec(model=None), ("base_model_name_or_path",)),
            ("load-adapter-number", api_llm2vec(peft_model_name_or_path=3), ("peft_model_name_or_path",)),
            # "no" is truthy: it would load bidirectional
            ("load-bidirectional-string", api_llm2vec(enable_bidirectional="no"), ("enable_bidirectional",)),
        ]
    ],
    Case(
        "api/llm2vec-encode-numpy-ok",
        "api",
        "api",
        api_llm2vec(np.array(["A cat.", "A dog."])),
        "ok",
        check=lambda ctx, result, out: shape(2)(ctx, result.numpy(), out),
    ),
    *[
        Case(f"api/mteb-{name}", "api", "api", api_mteb(**kw), "error", words)
        for name, kw, words in [
            ("adapters-none", dict(adapters=None), ("adapters", "None")),
            ("instructions-list", dict(instructions=["STS12"]), ("instructions",)),
            ("max-batch-tokens-0", dict(max_batch_tokens=0), ("max_batch_tokens",)),
            ("name-number", dict(name=5), ("name",)),
        ]
    ],
    Case("api/string-ok", "api", "api", api_encode("A cat sits."), "ok", check=shape(1)),
    Case(
        "api/pair-list-ok",
        "api",
        "api",
        api_encode([("Retrieve similar text.", "A cat sits."), "A dog."]),
        "ok",
        check=shape(2),
    ),
    Case("api/generator-ok", "api", "api", api_encode(t for t in ["A cat.", "A dog."]), "ok", check=shape(2)),
    Case("api/empty-list-ok", "api", "api", api_encode([]), "ok", check=shape(0)),
    Case(
        "api/numpy-int-budget-ok",
        "api",
        "api",
        api_encode(["A cat."], max_batch_tokens=np.int64(256)),
        "ok",
        check=shape(1),
    ),
    # ================================================================ output paths
    *[
        Case(f"{cli}/out-{name}", "output", cli, args + ["--out", path], "error", words)
        for cli, args, suffix in [("encode", E("--text", "A cat."), ".npy"), ("eval", V(), ".json")]
        for name, path, words in [
            ("existing-folder", "{d}/folder", ("--out", "folder")),
            ("wrong-suffix", "{tmp}/res.txt", ("--out", suffix)),
            ("unwritable", UNWRITABLE + suffix, ("--out", "writable")),
            ("parent-is-file", "{d}/file/res" + suffix, ("--out", "file")),
        ]
    ],
    Case(
        "encode/out-parent-missing-ok",
        "output",
        "encode",
        E("--text", "A cat.", "--out", "{tmp}/new/sub/emb.npy"),
        "ok",
        check=npy("{tmp}/new/sub/emb.npy", rows=1),
    ),
    Case(
        "encode/out-replaces-earlier-ok",
        "output",
        "encode",
        E("--text", "A cat.", "--text", "A dog.", "--out", "{tmp}/emb.npy"),
        "ok",
        check=npy(rows=2),
        setup=in_tmp("emb.npy", b"an earlier result"),
    ),
    Case(
        "train/output-dir-unwritable", "output", "train", T(UNWRITABLE), "error", ("--output_dir", "writable")
    ),
    Case(
        "train/merge-out-unwritable",
        "output",
        "train",
        T() + ["--merge_out", UNWRITABLE],
        "error",
        ("--merge_out", "writable"),
    ),
    Case(
        "train/merge-out-under-file",
        "output",
        "train",
        T() + ["--merge_out", "{d}/file/merged"],
        "error",
        ("--merge_out", "file"),
    ),
    # ================================================================ 8 errors found late, --debug
    Case(
        "train/loss-diverges",
        "boundary",
        "train",
        T(steps=6, save_every=1) + ["--lr", "1e30", "--grad_clip", "0"],
        "error",
        ("diverged", "--lr"),
        late=True,
        check=checkpoint_kept("out", 1),
    ),
    Case(
        "encode/non-finite-embeddings",
        "boundary",
        "encode",
        E("--text", "A cat.", model="{m}/nan-weights"),
        "error",
        ("non-finite", "nan-weights"),
    ),
    Case(
        "eval/spearman-undefined-after-encoding",
        "boundary",
        "eval",
        V("--model", "{m}/zero-norm"),
        "error",
        ("stsb-dev", "Spearman", "undefined"),
    ),
]


def debug_cases():
    """--debug: the same mistakes, now as the exception itself (a traceback for the user)."""
    return [
        (T() + ["--lr", "-1", "--debug"], "train"),
        (E("--text", "", "--debug"), "encode"),
        (V("--tasks", "nope", "--debug"), "eval"),
    ]


# ----------------------------------------------------------------------------- running a case


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_dir, text_files):
    """Every fixture of the table, built once; the table's cases never change it (test_fixtures_unchanged)."""
    d = tmp_path_factory.mktemp("bad-inputs")
    for name, content in FILES.items():
        p = d / name
        if content is None:
            p.mkdir()
        else:
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    m = d / "models"
    for name, edit in MODELS.items():
        (m / name).mkdir(parents=True)
        for p in tiny_dir.iterdir():
            if p.name == "model.safetensors":
                (m / name / p.name).symlink_to(p)
            else:
                shutil.copy(p, m / name / p.name)
        edit(m / name)
    save_tiny(m / "vocab-1000", tiny_model(vocab_size=1000))  # the real tokenizer has 49152 ids
    nan_model = tiny_model()
    with torch.no_grad():
        nan_model.norm.weight[0] = float("nan")
    save_tiny(m / "nan-weights", nan_model)
    zero_model = tiny_model()  # every text gets the zero vector: every pair the same similarity
    with torch.no_grad():
        zero_model.norm.weight.zero_()
    save_tiny(m / "zero-norm", zero_model)
    sents, triples = text_files / "sents.txt", text_files / "triples.jsonl"
    pairs = text_files / "pairs.jsonl"
    run = d / "finished" / "run"  # 6 steps, checkpoints at 2 and 4: final/ is the good adapter
    paths = dict(
        tiny=tiny_dir,
        d=d,
        m=m,
        run=run,
        sents=sents,
        triples=triples,
        pairs=pairs,
        a=d / "adapters",
        ev=d / "evaldata",
        part=d / "partial" / "run",
        repo=ROOT,
    )
    fill = lambda s: filler(paths)(s)  # noqa: E731
    train.main([fill(a) for a in RUN6(str(run))])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    for name, edit in ADAPTERS.items():
        edit(shutil.copytree(run / "final", d / "adapters" / name))
    # "crashed after checkpoint 4": no final/, the log ends at step 4
    shutil.copytree(run, paths["part"], ignore=shutil.ignore_patterns("final"))
    log = paths["part"] / "log.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    log.write_text(jsonl(r for r in recs if "loss" in r and r["step"] <= 4))
    for name, build in EVALDATA.items():
        build(d / "evaldata" / name)
    return SimpleNamespace(paths=paths, snapshot=tree_hash(d), d=d)


def filler(paths: dict):
    def fill(s):
        if not isinstance(s, str):
            return s
        for k, v in paths.items():
            s = s.replace("{" + k + "}", str(v))
        return s

    return fill


def tree_hash(folder: Path) -> dict:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def snapshot(paths) -> dict:
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        out.update({str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files})
    return out


@pytest.fixture
def ctx(fx, tmp_path, monkeypatch):
    encoders = {}

    def encoder():
        if "e" not in encoders:
            from l2v.encoder import Encoder

            encoders["e"] = Encoder.from_pretrained(fx.paths["tiny"], autocast="none")
        return encoders["e"]

    c = SimpleNamespace(
        tmp=tmp_path,
        monkeypatch=monkeypatch,
        fill=filler({**fx.paths, "tmp": tmp_path}),
        cleanup=[],
        encoder=encoder,
    )
    yield c
    for f in c.cleanup:
        f()


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and ": warning: " not in ln]


def verdict(case: Case, ctx, capsys) -> tuple[str, str]:
    """(handled | traceback | silent-wrong | unclear | late | refused | data-loss, detail)."""
    argv = None if case.cli == "api" else [ctx.fill(a) for a in case.argv]
    if case.setup:
        case.setup(ctx)
    protect = [ctx.fill(p) for p in case.protect]
    before = snapshot(protect)
    out_dir = Path(argv[argv.index("--output_dir") + 1]) if argv and "--output_dir" in argv else None
    fresh = out_dir is not None and not out_dir.exists()
    result, code, error = None, None, None
    try:
        result = case.argv(ctx) if case.cli == "api" else MAINS[case.cli](argv)
    except SystemExit as e:
        code = e.code
        e.__context__ = None  # frees the failed run's frames (and the output folder's lock they hold)
    except USER_ERRORS as e:
        if case.cli != "api":
            return "traceback", f"{type(e).__name__}: {e}"
        error = e
    except Exception as e:
        return "traceback", f"{type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    if snapshot(protect) != before:
        return "data-loss", f"a protected file changed: {sorted(set(snapshot(protect)) ^ set(before))[:3]}"
    failed = code is not None or error is not None
    if case.expect == "ok":
        if failed:
            return "refused", str(error) if error else (error_lines(err) or [f"exit {code}"])[0]
        try:
            case.check(ctx, result, out)
        except (AssertionError, OSError, ValueError) as e:
            return "silent-wrong", f"the result is wrong: {e}"
        return "handled", ""
    if not failed:
        return "silent-wrong", "accepted: " + (out.strip().splitlines() or ["no output"])[0][:200]
    message = str(error) if error is not None else None
    if error is None:
        lines = error_lines(err)
        prefix = f"{case.cli}.py: error: "
        if code != 2 or len(lines) != 1 or not lines[0].startswith(prefix):
            return "unclear", f"exit {code}, stderr {lines[-3:]}"
        message = lines[0]
    missing = [w for w in case.words if ctx.fill(w) not in message]
    if missing:
        return "unclear", f"{message!r} lacks {missing}"
    if fresh and out_dir.exists() and not case.late:
        return "late", f"refused after writing {out_dir}: {message}"
    if case.check:
        try:
            case.check(ctx, result, out)
        except (AssertionError, OSError) as e:
            return "data-loss", f"refused, but {e}"
    return "handled", message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, ctx, capsys):
    got, detail = verdict(case, ctx, capsys)
    assert got == "handled", f"verdict={got} kind={case.kind}: {detail}"


def test_case_ids_are_unique_and_kinds_known():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {c.kind for c in CASES} == set(KINDS)
    assert all(c.cli in ("train", "encode", "eval", "api") and c.expect in ("error", "ok") for c in CASES)
    for kind in ("loss", "values", "model", "text", "api"):  # these kinds reach every command line
        assert {c.cli for c in CASES if c.kind == kind} >= {"train", "encode"}, kind


@pytest.mark.parametrize("argv,script", debug_cases(), ids=["train", "encode", "eval"])
def test_debug_shows_the_traceback(fx, tmp_path, argv, script):
    fill = filler({**fx.paths, "tmp": tmp_path})
    with pytest.raises(ValueError):
        MAINS[script]([fill(a) for a in argv])


def test_a_failed_evaluation_never_loses_the_run(fx, tmp_path, monkeypatch):
    """An evaluation that breaks (a bug, not an input) is logged; the run goes on and saves final/."""

    def broken(*a, **k):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(train, "evaluate_sts", broken)
    fill = filler({**fx.paths, "tmp": tmp_path})
    train.main([fill(a) for a in T() + ["--eval_sts_file", "{ev}/good/" + STSB, "--eval_every", "1"]])
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    log = [json.loads(ln) for ln in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("evaluation broke" in r.get("eval_error", "") for r in log)


def test_fixtures_unchanged(fx):
    """No case changed a shared fixture (the model, the finished run, the adapters, the data)."""
    assert tree_hash(fx.d) == fx.snapshot


# ----------------------------------------------------------------------------- separate processes


def child(args, cwd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_two_processes_one_folder_and_a_killed_runs_lock(fx, tmp_path):
    """A second train.py on a folder in use is refused; SIGKILL the first: its lock goes with it, and the
    folder resumes."""
    fill = filler({**fx.paths, "tmp": tmp_path})
    args = [fill(a) for a in T(steps=400, save_every=1)]
    first = child(args, tmp_path)
    deadline = time.time() + 120
    while (
        not list((tmp_path / "out").glob("checkpoint-*")) and time.time() < deadline and first.poll() is None
    ):
        time.sleep(0.05)
    second = child(args + ["--resume", "true"], tmp_path)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and err.strip().endswith("another train.py is running in it"), err
    first.send_signal(signal.SIGKILL)
    first.communicate()
    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    third = child(args + ["--resume", "true", "--stop_after_n_steps", str(last + 2)], tmp_path)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0 and "resumed from" in out, err[-2000:]


@pytest.mark.slow
def test_invalid_utf8_in_argv_is_one_line(fx, tmp_path):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    model = str(fx.paths["tiny"]).encode()
    script = str(ROOT / "encode.py").encode()
    cmd = [sys.executable.encode(), script, b"--model", model, b"--text", b"caf\xe9"]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    err = res.stderr.decode(errors="replace").strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "--text #1" in err[0] and "Unicode" in err[0], err
