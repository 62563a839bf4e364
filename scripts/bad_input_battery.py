#!/usr/bin/env python
"""Bad-input battery for l2v's command-line scripts (issue #10): ~125 mistakes and edge inputs a new
user would try against encode.py, train.py and eval.py, each run in its own temp folder and classified.

    python scripts/bad_input_battery.py --repo PATH --out results.json [--only SUBSTR] [--jobs N]
        [--extended: ~45 more cases of the same kinds] [--list] [--keep] [--timeout 120]

It runs the CLIs of the checkout at PATH (`python PATH/<cli>.py ...`, cwd a fresh temp folder per case,
PYTHONPATH=PATH, OMP_NUM_THREADS=1) against a tiny random model it builds once with that checkout's own
`l2v.checkpoint.save_model` (vocab 49152, dim 64, 2 layers; the SmolLM2 tokenizer files), tiny data
files, and a finished 6-step MNTP run trained with the checkout's train.py (its `final/` is the valid
adapter from which broken variants are derived). Cases do not depend on each other.

Each case says what should happen: "error" (a user mistake: refuse it), "ok" (a legitimate edge input:
succeed, optionally with a check of the result) or "either" (a clear refusal or a correct result).
Verdicts, first match wins:
  data-loss     a protected file changed or vanished, or training ran and then crashed before saving
  hang          the case ran past --timeout
  traceback     rc != 0 and "Traceback (most recent call last)" in stderr
  silent-wrong  expected an error but rc == 0, or rc == 0 and the result check failed
  clear         rc != 0 and stderr (minus usage/warning/progress noise) is ONE line naming the file/flag
  unclear       rc != 0, no traceback, but not one line or not naming the offending file/flag
  refused       expected ok, but the input was refused (rc != 0)
  ok            expected ok (or either) and the result checked out
Python API cases (cli "python") raise by design: an exception whose message names the problem is clear.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VERDICTS = ("data-loss", "hang", "traceback", "silent-wrong", "unclear", "refused", "clear", "ok")

# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    cli: str  # encode | train | eval | python (argv = [code, *args])
    argv: list
    expect: str  # error | ok | either
    names: tuple = ()  # the error line must contain one of these (a flag name or a file)
    setup: Callable | None = None  # setup(d: Path) in the case folder, before the run
    check: Callable | None = None  # check(d: Path, res: dict) -> (passed, detail), for rc == 0
    protect: tuple = ()  # case-relative files/folders whose bytes + mtime must survive
    lost_work: str = ""  # output_dir: rc != 0 after training started and before final/ -> data-loss
    note: str = ""
    extra: bool = False  # only with --extended (the default battery is the ~125 cases of issue #10)


def flag(*keys: str) -> tuple:
    """--batch_size -> every spelling a message could use."""
    out = []
    for k in keys:
        k = k.lstrip("-")
        for v in (k.replace("-", "_"), k.replace("_", "-")):
            out += [v, "--" + v]
    return tuple(dict.fromkeys(out))


def names_match(line: str, names) -> bool:
    for n in names:
        n = str(n)
        if "/" in n or "." in n:
            if n in line or Path(n).name in line:
                return True
        elif re.search(r"(?<![\w-])" + re.escape(n) + r"(?![\w])", line):
            return True
    return False


# --- result checks (used when rc == 0)

def npy(path="emb.npy", rows=None, finite=True, distinct=False, equal=None, unit=False):
    def check(d: Path, res):
        import numpy as np
        p = d / path
        if not p.is_file():
            return False, f"{path} not written (stdout: {first_line(res['stdout'])})"
        a = np.load(p)
        if a.ndim != 2 or (rows is not None and a.shape[0] != rows):
            return False, f"{path} has shape {list(a.shape)}, expected [{rows}, dim]"
        if finite and not np.isfinite(a).all():
            return False, f"{path}: non-finite values"
        if distinct and len(a) > 1 and np.allclose(a[0], a[1:], atol=1e-6):
            return False, f"{path}: every row is the same vector"
        if equal is not None and not np.allclose(a[equal[0]], a[equal[1]], atol=1e-5):
            return False, f"{path}: rows {equal[0]} and {equal[1]} should be equal (same text) but differ"
        if unit and not np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4):
            return False, f"{path}: rows not unit-norm"
        return True, f"{path} {list(a.shape)}"
    return check


def wrote_what_it_says(d: Path, res):
    m = re.search(r"^wrote (\S+?):", res["stdout"], re.M)
    if not m:
        return False, "no 'wrote' line"
    p = d / m[1]
    if not p.is_file():
        return False, f"says 'wrote {m[1]}', but there is no file {m[1]}" + \
            (f" (it wrote {m[1]}.npy)" if Path(str(p) + ".npy").is_file() else "")
    return True, f"wrote {m[1]}"


def stdout_has(*needles):
    def check(d, res):
        missing = [n for n in needles if n not in res["stdout"]]
        return (not missing), ("stdout lacks " + ", ".join(map(repr, missing)) if missing else "ok")
    return check


def log_records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def run_done(out="out", resumed_from=None, mentions=(), max_steps=None, log_key=None, log_before=0):
    """A finished training run: final adapter saved, and optionally resumed from / reporting given paths.
    Where it resumed from: a "resum... checkpoint-N" line in the output, or else the first step logged
    after the `log_before` records the copied run folder already had."""
    def check(d: Path, res):
        final = d / out / "final" / "adapter_model.safetensors"
        if not final.is_file():
            return False, f"{out}/final/adapter_model.safetensors missing"
        text = res["stdout"] + res["stderr"]
        if resumed_from:
            said = re.findall(r"resum\w*\b[^\n]*?(checkpoint-\d+)", text)
            new = [r for r in log_records(d / out / "log.jsonl")[log_before:] if "step" in r and "loss" in r]
            want = int(resumed_from.rsplit("-", 1)[1])
            if resumed_from not in said and not (new and new[0]["step"] == want + 1):
                return False, (f"resumed from {said[0] if said else 'no checkpoint named'} (first new step "
                               f"{new[0]['step'] if new else None}), expected {resumed_from}")
        for s in mentions:
            if s not in text:
                return False, f"output never mentions {s}"
        if max_steps is not None:
            cfg = json.loads((d / out / "final" / "train_config.json").read_text())
            if cfg.get("max_steps") != max_steps:
                return False, f"final/train_config.json max_steps {cfg.get('max_steps')}, expected {max_steps}"
        if log_key:
            recs = [json.loads(x) for x in (d / out / "log.jsonl").read_text().splitlines() if x.strip()]
            vals = [r[log_key] for r in recs if log_key in r]
            if not vals or any(v != v for v in vals):
                return False, f"log.jsonl {log_key}: {vals}"
        return True, "final saved"
    return check


def strict_json(path="res.json", results=None):
    def check(d: Path, res):
        p = d / path
        if not p.is_file():
            return False, f"{path} not written"
        def bad_constant(c):
            raise ValueError(c)
        try:
            obj = json.loads(p.read_text(), parse_constant=bad_constant)
        except ValueError as e:
            return False, f"{path} is not strict JSON (bare {e})"
        n = len(obj.get("results", []))
        if results is not None and n != results:
            return False, f"{path}: {n} results, expected {results}"
        return True, f"{path}: {n} results"
    return check


# ----------------------------------------------------------------------------- fixtures

STS_ROWS = [
    (5.0, "A man is playing a guitar.", "A man plays the guitar."),
    (0.4, "A woman is slicing an onion.", "A dog runs across the field."),
    (3.8, "Two children are playing in the park.", "Kids play outside in a park."),
    (1.2, "The stock market fell sharply today.", "A cat sleeps on the sofa."),
    (4.6, "A plane is taking off.", "An airplane is departing."),
    (2.5, "A man is eating pasta.", "A man is eating a sandwich."),
    (0.0, "The sun is bright.", "Quantum fields are quantised."),
    (4.2, "Someone is cooking rice.", "A person cooks some rice."),
    (3.0, "A girl is riding a horse.", "A woman rides a pony on the beach."),
    (1.8, "He reads a book.", "She writes a letter to a friend."),
    (4.9, "The cat is on the mat.", "A cat sits on the mat."),
    (0.8, "Rain is falling in the city.", "A chef slices tomatoes."),
]


class Fixtures:
    def __init__(self, root: Path, repo: Path, tokenizer_dir: Path, log):
        self.root, self.repo = root, repo
        self.model = root / "model"
        self.data = root / "data"
        self.evald = root / "evaldata"
        self.build_dir = root / "build"
        self.fin = self.build_dir / "run"  # finished run: checkpoint-000002, checkpoint-000004, final/
        self.part = root / "partial" / "run"  # the same without final/: "crashed after step 4"
        self.adapter = self.fin / "final"
        self._make_model(tokenizer_dir)
        self._make_data()
        log("fixtures: training the 6-step reference run with the checkout's train.py ...")
        self._make_run()

    def _make_model(self, tokenizer_dir: Path):
        sys.path.insert(0, str(self.repo))
        sys.dont_write_bytecode = True  # leave no __pycache__ in the checkout under test
        import torch

        from l2v.checkpoint import save_model
        from l2v.model import ModelConfig, Transformer
        cfg = ModelConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          intermediate_size=128, tie_word_embeddings=True, rope_theta=10000.0)
        torch.manual_seed(0)
        model = Transformer(cfg)
        with torch.no_grad():
            model.embed_tokens.weight.mul_(0.02)
        save_model(model, self.model)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, self.model / name)

    def _make_data(self):
        d = self.data
        d.mkdir(parents=True)
        words = ["cats", "dogs", "rivers", "mountains", "planes", "songs", "books", "cars"]
        sents = [f"Sentence number {i} talks about {w} and the {i % 7} green {w}s." for i, w in enumerate(words * 8)]
        self.sents = d / "sents.txt"
        self.sents.write_text("\n".join(sents) + "\n")
        triples = [{"query": f"what is {w}?", "positive": f"{w} is a thing number {i}.",
                    "negative": f"nothing about item {i}.", "instruction": "Retrieve the answer:"}
                   for i, w in enumerate(["cats", "dogs", "rivers", "planes"] * 4)]
        self.triples = d / "triples.jsonl"
        self.triples.write_text("\n".join(json.dumps(t) for t in triples) + "\n")
        self.sts = d / "sts-dev.csv"
        self.sts.write_text(sts_text(STS_ROWS))
        (self.evald / "stsbenchmark").mkdir(parents=True)
        (self.evald / "sick").mkdir(parents=True)
        (self.evald / "stsbenchmark" / "sts-dev.csv").write_text(sts_text(STS_ROWS))
        sick = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
        sick += [f"{i}\t{a}\t{b}\t{1 + s * 0.8:.1f}\tNEUTRAL" for i, (s, a, b) in enumerate(STS_ROWS)]
        (self.evald / "sick" / "SICK_trial.txt").write_text("\n".join(sick) + "\n")

    def train_args(self, out="run", objective="mntp", steps=6, save_every=2):
        train_file = self.triples if objective == "supervised" else self.sents
        args = ["--objective", objective, "--model", str(self.model), "--train_file", str(train_file),
                "--output_dir", out, "--max_seq_length", "32", "--lora_r", "4", "--lora_alpha", "8",
                "--lora_dropout", "0", "--autocast", "none", "--progress", "false", "--log_every", "1",
                "--batch_size", "4", "--max_steps", str(steps), "--lr", "1e-3"]
        return args + (["--save_every", str(save_every)] if save_every else [])

    def _make_run(self):
        self.build_dir.mkdir()
        res = subprocess.run([sys.executable, str(self.repo / "train.py"), *self.train_args("run")],
                             cwd=self.build_dir, env=child_env(self.repo), capture_output=True, text=True,
                             timeout=600)
        if res.returncode != 0 or not (self.adapter / "adapter_model.safetensors").is_file():
            raise SystemExit("bad_input_battery: cannot build the reference run with the checkout's train.py:\n"
                             + res.stdout[-2000:] + res.stderr[-3000:])
        ckpts = sorted(p.name for p in self.fin.glob("checkpoint-*"))
        if ckpts != ["checkpoint-000002", "checkpoint-000004"]:
            raise SystemExit(f"bad_input_battery: the reference run has checkpoints {ckpts}, expected 2 and 4")
        # "crashed after checkpoint 4": no final/, and the log ends at step 4
        shutil.copytree(self.fin, self.part, ignore=shutil.ignore_patterns("final"))
        recs = [r for r in log_records(self.part / "log.jsonl") if "loss" in r and r.get("step", 99) <= 4]
        (self.part / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        self.part_log = len(recs)


def sts_text(rows) -> str:
    return "".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s:.3f}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(rows))


def child_env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(repo),
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return env


# --- setup helpers: everything is written inside the case folder d

def write(rel, content, binary=False):
    def setup(d: Path):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if binary else p.write_text(content)
    return setup


def mkdir(rel):
    return lambda d: (d / rel).mkdir(parents=True, exist_ok=True)


def chain(*fns):
    def setup(d):
        for f in fns:
            f(d)
    return setup


def truncate(path: Path, frac=0.5):
    data = path.read_bytes()
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data[: int(len(data) * frac)])


def model_copy(fx: Fixtures, rel="model", edit=None, drop=(), link_weights=True):
    """A copy of the tiny model (weights symlinked unless edited), then `edit(folder)`."""
    def setup(d: Path):
        m = d / rel
        m.mkdir(parents=True)
        for p in fx.model.iterdir():
            if p.name in drop:
                continue
            if p.name == "model.safetensors" and link_weights:
                (m / p.name).symlink_to(p)
            else:
                shutil.copy(p, m / p.name)
        if edit:
            edit(m)
    return setup


def adapter_copy(fx: Fixtures, rel="adapter", edit_config=None, edit_tensors=None, edit=None):
    """A copy of the valid adapter (the reference run's final/), optionally broken."""
    def setup(d: Path):
        a = d / rel
        shutil.copytree(fx.adapter, a)
        if edit_config:
            cfg = json.loads((a / "adapter_config.json").read_text())
            edit_config(cfg)
            (a / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        if edit_tensors:
            from safetensors.torch import load_file, save_file
            t = load_file(a / "adapter_model.safetensors")
            t = edit_tensors(t) or t
            save_file(t, a / "adapter_model.safetensors", metadata={"format": "pt"})
        if edit:
            edit(a)
    return setup


def run_copy(fx: Fixtures, src="part", rel="run", edit=None):
    def setup(d: Path):
        shutil.copytree(fx.part if src == "part" else fx.fin, d / rel)
        if edit:
            edit(d / rel)
    return setup


def evaldata_copy(fx: Fixtures, rel="evaldata", edit=None):
    def setup(d: Path):
        shutil.copytree(fx.evald, d / rel)
        if edit:
            edit(d / rel)
    return setup


def nan_tensors(t):
    k = sorted(k for k in t if "lora_B" in k)[0]
    t[k][0, 0] = float("nan")


def json_set(path_rel, **updates):
    def edit(folder: Path):
        p = folder / path_rel
        cfg = json.loads(p.read_text())
        cfg.update(updates)
        p.write_text(json.dumps(cfg, indent=2))
    return edit


def unwritable_out(name="emb.npy"):
    """A path whose folder exists but cannot be written (root ignores permissions: /sys then)."""
    if os.geteuid() == 0:
        return f"/sys/l2v-battery-{name}", lambda d: None
    return f"ro/{name}", lambda d: ((d / "ro").mkdir(), os.chmod(d / "ro", 0o555))


# ----------------------------------------------------------------------------- the battery

def batch_flag(repo: Path, script: str, raw: str) -> tuple[str, str]:
    """--batch-size N became --max-batch-tokens (texts are packed) after 0d6e964: the same case
    (a batch budget the user gets wrong) under the flag the checkout has; a valid N scales to tokens."""
    if "--max-batch-tokens" not in (repo / script).read_text():
        return "--batch-size", raw
    return "--max-batch-tokens", str(int(raw) * 128) if raw.isdigit() and int(raw) > 0 else raw


def build_cases(fx: Fixtures) -> list[Case]:
    M, A = str(fx.model), str(fx.adapter)
    cases: list[Case] = []

    def E(name, argv, expect, names=(), model=True, **kw):
        cases.append(Case(name, "encode", (["--model", M] if model else []) + argv, expect, names, **kw))

    def T(name, argv, expect, names=(), **kw):
        cases.append(Case(name, "train", argv, expect, names, **kw))

    def V(name, argv, expect, names=(), base=True, **kw):
        head = ["--model", M, "--data-dir", str(fx.evald), "--tasks", "stsb-dev", "--out", "res.json",
                *batch_flag(fx.repo, "eval.py", "8")] if base else []
        cases.append(Case(name, "eval", head + argv, expect, names, **kw))

    def P(name, code, expect, names=(), **kw):
        cases.append(Case(name, "python", [code, M], expect, names, **kw))

    # ================================================================= encode.py
    # --- texts
    E("encode/text-empty", ["--text", ""], "error", ("text", "--text"))
    E("encode/text-spaces", ["--text", "   "], "error", ("text", "--text"))
    E("encode/text-tab-newline", ["--text", "\t\n "], "error", ("text", "--text"))
    E("encode/text-one-blank-among-good", ["--text", "A cat sits.", "--text", "  ", "--out", "emb.npy"],
      "error", ("text", "--text", "input 1"))
    E("encode/text-very-long", ["--text", "word " * 6000, "--out", "emb.npy"], "ok", check=npy(rows=1))
    E("encode/text-unicode", ["--text", "Café ☕ 日本語のテキスト 🙂", "--text", "naïve façade", "--out", "emb.npy"],
      "ok", check=npy(rows=2, distinct=True))
    E("encode/text-emoji-only", ["--text", "🙂🙂", "--out", "emb.npy"], "ok", check=npy(rows=1))
    E("encode/instruction-fills-max-length",
      ["--instruction", " ".join(["word"] * 700), "--text", "A cat sits on the mat.", "--text",
       "Stock markets fell today.", "--out", "emb.npy"], "error", ("instruction", "--instruction", "max-length",
                                                                   "max_length", "--max-length"))
    E("encode/instruction-fills-small-max-length",
      ["--max-length", "8", "--instruction", "one two three four five six seven eight nine ten", "--text",
       "A cat.", "--text", "A dog.", "--out", "emb.npy"], "error", ("instruction", "--instruction", "max-length",
                                                                    "max_length", "--max-length"))
    E("encode/17-texts-no-out", sum([["--text", f"text {i}"] for i in range(17)], []), "error", flag("out"))
    E("encode/normalize-ok", ["--text", "A cat.", "--text", "A dog.", "--normalize", "--out", "emb.npy"], "ok",
      check=npy(rows=2, unit=True))
    # --- --file
    E("encode/file-missing", ["--file", "nope.txt"], "error", ("nope.txt",))
    E("encode/file-is-directory", ["--file", "texts.txt"], "error", ("texts.txt",), setup=mkdir("texts.txt"))
    E("encode/file-empty-txt", ["--file", "empty.txt", "--out", "emb.npy"], "error", ("empty.txt",),
      setup=write("empty.txt", ""))
    E("encode/file-blank-lines-only", ["--file", "blank.txt", "--out", "emb.npy"], "error", ("blank.txt",),
      setup=write("blank.txt", "\n   \n\t\n\n"))
    E("encode/file-non-utf8-txt", ["--file", "latin1.txt", "--out", "emb.npy"], "error", ("latin1.txt",),
      setup=write("latin1.txt", "caf\xe9 au lait\nna\xefve\n".encode("latin-1"), binary=True))
    E("encode/file-non-utf8-jsonl", ["--file", "latin1.jsonl", "--out", "emb.npy"], "error", ("latin1.jsonl",),
      setup=write("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), binary=True))
    E("encode/file-bad-jsonl-line", ["--file", "bad.jsonl"], "error", ("bad.jsonl",),
      setup=write("bad.jsonl", '{"text": "fine"}\n{"text": "broken\n'))
    E("encode/file-jsonl-no-text", ["--file", "notext.jsonl"], "error", ("notext.jsonl",),
      setup=write("notext.jsonl", '{"sentence": "a cat"}\n'))
    E("encode/file-jsonl-text-number", ["--file", "num.jsonl"], "error", ("num.jsonl",),
      setup=write("num.jsonl", '{"text": 42}\n'))
    E("encode/file-jsonl-instruction-list", ["--file", "inst.jsonl"], "error", ("inst.jsonl",),
      setup=write("inst.jsonl", '{"text": "a cat", "instruction": ["x"]}\n'))
    E("encode/file-jsonl-blank-text", ["--file", "blanktext.jsonl", "--out", "emb.npy"], "error",
      ("blanktext.jsonl",), setup=write("blanktext.jsonl", '{"text": "a cat"}\n{"text": "   "}\n'))
    E("encode/file-csv", ["--file", "texts.csv"], "error", ("texts.csv",),
      setup=write("texts.csv", "text\na cat\na dog\n"))
    E("encode/file-utf8-bom", ["--file", "bom.txt", "--out", "emb.npy"], "ok", check=npy(rows=2, equal=(0, 1)),
      setup=write("bom.txt", "\ufeffA cat sits.\nA cat sits.\n".encode("utf-8"), binary=True),
      note="a Windows-saved file: the BOM must not become part of the first text")
    E("encode/file-crlf", ["--file", "crlf.txt", "--out", "emb.npy"], "ok", check=npy(rows=2, distinct=True),
      setup=write("crlf.txt", b"A cat sits.\r\nA dog runs.\r\n", binary=True))
    E("encode/file-20-lines-no-out", ["--file", "many.txt"], "error", flag("out"),
      setup=write("many.txt", "".join(f"line {i}\n" for i in range(20))))
    E("encode/file-jsonl-ok", ["--file", "ok.jsonl", "--out", "emb.npy"], "ok", check=npy(rows=20),
      setup=write("ok.jsonl", "".join(json.dumps({"text": f"text {i}", "instruction": "Retrieve it:"}) + "\n"
                                      for i in range(20))))
    # --- --out
    E("encode/out-existing-folder", ["--text", "A cat.", "--out", "outdir"], "error", ("outdir",) + flag("out"),
      setup=mkdir("outdir"))
    E("encode/out-no-npy-suffix", ["--text", "A cat.", "--out", "emb"], "either", ("emb",) + flag("out"),
      check=wrote_what_it_says)
    ro, ro_setup = unwritable_out()
    E("encode/out-unwritable", ["--text", "A cat.", "--out", ro], "error", (ro,) + flag("out"), setup=ro_setup)
    E("encode/out-parent-is-file", ["--text", "A cat.", "--out", "afile/emb.npy"], "error",
      ("afile/emb.npy", "afile") + flag("out"), setup=write("afile", "x"))
    E("encode/out-parent-missing", ["--text", "A cat.", "--out", "new/sub/emb.npy"], "either",
      ("new/sub/emb.npy",) + flag("out"), check=npy("new/sub/emb.npy", rows=1))
    # --- numbers
    for name, raw in (("0", "0"), ("negative", "-1"), ("text", "many")):
        f, v = batch_flag(fx.repo, "encode.py", raw)
        E(f"encode/batch-size-{name}", ["--text", "A cat.", f, v], "error", flag(f.lstrip("-")))
    E("encode/max-length-0", ["--text", "A cat.", "--max-length", "0"], "error", flag("max-length"))
    E("encode/max-length-negative", ["--text", "A cat.", "--max-length", "-5"], "error", flag("max-length"))
    E("encode/max-length-1", ["--text", "A cat sits on the mat.", "--max-length", "1", "--out", "emb.npy"],
      "either", flag("max-length"), check=npy(rows=1))
    # --- --model
    E("encode/model-missing", ["--model", "nomodel", "--text", "A cat."], "error", ("nomodel",), model=False)
    E("encode/model-is-file", ["--model", "model.txt", "--text", "A cat."], "error", ("model.txt",), model=False,
      setup=write("model.txt", "x"))
    E("encode/model-empty-folder", ["--model", "emptymodel", "--text", "A cat."], "error", ("emptymodel",),
      model=False, setup=mkdir("emptymodel"))
    E("encode/model-config-json-list", ["--model", "model", "--text", "A cat."], "error", ("config.json", "model"),
      model=False, setup=model_copy(fx, edit=lambda m: (m / "config.json").write_text(
          "[" + (m / "config.json").read_text() + "]")))
    E("encode/model-config-malformed", ["--model", "model", "--text", "A cat."], "error", ("config.json",),
      model=False, setup=model_copy(fx, edit=lambda m: (m / "config.json").write_text('{"model_type": "llama",')))
    E("encode/model-config-missing-key", ["--model", "model", "--text", "A cat."], "error", ("config.json",),
      model=False, setup=model_copy(fx, edit=lambda m: (m / "config.json").write_text(json.dumps(
          {k: v for k, v in json.loads((m / "config.json").read_text()).items() if k != "hidden_size"}))))
    E("encode/model-type-unsupported", ["--model", "model", "--text", "A cat."], "error", ("config.json", "gpt2"),
      model=False, setup=model_copy(fx, edit=json_set("config.json", model_type="gpt2")))
    E("encode/model-no-tokenizer", ["--model", "model", "--text", "A cat."], "error", ("tokenizer.json",),
      model=False, setup=model_copy(fx, drop=("tokenizer.json",)))
    E("encode/model-tokenizer-garbage", ["--model", "model", "--text", "A cat."], "error", ("tokenizer.json",),
      model=False, setup=model_copy(fx, edit=lambda m: (m / "tokenizer.json").write_text("{not json")))
    E("encode/model-no-weights", ["--model", "model", "--text", "A cat."], "error", ("model", "model.safetensors"),
      model=False, setup=model_copy(fx, drop=("model.safetensors",)))
    E("encode/model-weights-truncated", ["--model", "model", "--text", "A cat."], "error", ("model.safetensors",),
      model=False, setup=model_copy(fx, edit=lambda m: truncate(m / "model.safetensors")))
    E("encode/model-weights-empty-file", ["--model", "model", "--text", "A cat."], "error", ("model.safetensors",),
      model=False, setup=model_copy(fx, edit=lambda m: (m / "model.safetensors").unlink() or
                                    (m / "model.safetensors").write_bytes(b"")))
    E("encode/model-pickle-only", ["--model", "model", "--text", "A cat."], "error", ("model", "pytorch_model.bin"),
      model=False, setup=model_copy(fx, drop=("model.safetensors",),
                                    edit=lambda m: (m / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")))
    # --- --adapter
    E("encode/adapter-ok", ["--adapter", "adapter", "--text", "A cat.", "--text", "A dog.", "--out", "emb.npy"],
      "ok", check=npy(rows=2, distinct=True), setup=adapter_copy(fx))
    E("encode/adapter-missing", ["--adapter", "noadapter", "--text", "A cat."], "error", ("noadapter",))
    E("encode/adapter-is-file", ["--adapter", "adapter.json", "--text", "A cat."], "error", ("adapter.json",),
      setup=write("adapter.json", "{}"))
    E("encode/adapter-config-malformed", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_config.json",), setup=adapter_copy(
          fx, edit=lambda a: (a / "adapter_config.json").write_text('{"r": 4, "lora_alpha":')))
    E("encode/adapter-config-list", ["--adapter", "adapter", "--text", "A cat."], "error", ("adapter_config.json",),
      setup=adapter_copy(fx, edit=lambda a: (a / "adapter_config.json").write_text(
          "[" + (a / "adapter_config.json").read_text() + "]")))
    E("encode/adapter-no-weights", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_model.safetensors",), setup=adapter_copy(fx, edit=lambda a: (a / "adapter_model.safetensors").unlink()))
    E("encode/adapter-weights-truncated", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_model.safetensors",), setup=adapter_copy(fx, edit=lambda a: truncate(a / "adapter_model.safetensors")))
    E("encode/adapter-nan-weights", ["--adapter", "adapter", "--text", "A cat.", "--out", "emb.npy"], "error",
      ("adapter_model.safetensors", "adapter"), setup=adapter_copy(fx, edit_tensors=nan_tensors))
    E("encode/adapter-layers-to-transform", ["--adapter", "adapter", "--text", "A cat.", "--out", "emb.npy"],
      "error", ("adapter_config.json", "layers_to_transform"),
      setup=adapter_copy(fx, edit_config=lambda c: c.update(layers_to_transform=[0])))
    E("encode/adapter-unknown-target-module", ["--adapter", "adapter", "--text", "A cat.", "--out", "emb.npy"],
      "error", ("adapter_config.json", "c_attn"),
      setup=adapter_copy(fx, edit_config=lambda c: c.update(target_modules=["c_attn"])))
    E("encode/adapter-use-dora", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_config.json", "use_dora"), setup=adapter_copy(fx, edit_config=lambda c: c.update(use_dora=True)))
    E("encode/adapter-rank-mismatch", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_model.safetensors", "adapter_config.json"), setup=adapter_copy(fx, edit_config=lambda c: c.update(r=8)))
    E("encode/adapter-foreign-keys", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_model.safetensors",), setup=adapter_copy(fx, edit_tensors=lambda t: {
          k.replace("layers.", "blocks."): v for k, v in t.items()}))
    E("encode/adapter-not-lora", ["--adapter", "adapter", "--text", "A cat."], "error",
      ("adapter_config.json", "IA3"), setup=adapter_copy(fx, edit_config=lambda c: c.update(peft_type="IA3")))
    # --- other options
    E("encode/pooling-bogus", ["--text", "A cat.", "--pooling", "max"], "error", flag("pooling"))
    E("encode/pooling-bos-token-no-bos", ["--text", "A cat.", "--pooling", "bos_token"], "error",
      flag("pooling") + ("bos_token", "BOS"))
    E("encode/dtype-bogus", ["--text", "A cat.", "--dtype", "float64"], "error", flag("dtype"))
    E("encode/dtype-bfloat16-ok", ["--text", "A cat.", "--text", "A dog.", "--dtype", "bfloat16", "--out", "emb.npy"],
      "ok", check=npy(rows=2))
    E("encode/chat-template-foreign", ["--text", "A cat.", "--chat-template", "llama3"], "error",
      flag("chat-template") + ("llama3",))
    E("encode/unknown-flag", ["--text", "A cat.", "--normalise"], "error", ("--normalise",))
    # --- the Python API
    P("encode/api-bare-pair",
      "import sys; from l2v.encoder import Encoder; e = Encoder.from_pretrained(sys.argv[1]); "
      "v = e.encode(('Retrieve similar text.', 'A cat sits.')); print(v.shape)",
      "error", ("pair", "tuple", "instruction"))
    P("encode/api-string-ok",
      "import sys; from l2v.encoder import Encoder; e = Encoder.from_pretrained(sys.argv[1]); "
      "v = e.encode('A cat sits.'); assert v.shape == (1, 64), v.shape; print(v.shape)", "ok")
    P("encode/api-pair-list-ok",
      "import sys, numpy as np; from l2v.encoder import Encoder; e = Encoder.from_pretrained(sys.argv[1]); "
      "v = e.encode([('Retrieve similar text.', 'A cat sits.'), 'A dog.']); "
      "assert v.shape == (2, 64) and np.isfinite(v).all(), v.shape; print(v.shape)", "ok")

    # ================================================================= train.py
    base = fx.train_args  # tiny MNTP run; args as the reference run (6 steps, checkpoints at 2 and 4)
    fin_protect = ("run/final", "run/checkpoint-000002", "run/checkpoint-000004")
    short = lambda out="out", objective="mntp": base(out, objective, steps=2, save_every=0)  # noqa: E731

    # --- output folder protection and resume
    T("train/rerun-into-finished-run", base("run"), "error", flag("output_dir", "resume", "overwrite") + ("run",),
      setup=run_copy(fx, "fin"), protect=fin_protect)
    T("train/new-run-into-finished-run", base("run", steps=2, save_every=1) + ["--lr", "5e-3"], "error",
      flag("output_dir", "resume", "overwrite") + ("run",), setup=run_copy(fx, "fin"), protect=fin_protect)
    T("train/output-dir-holds-other-files", short("notes"), "error", flag("output_dir", "overwrite") + ("notes",),
      setup=write("notes/README.txt", "my notes\n"), protect=("notes/README.txt",))
    T("train/output-dir-is-file", short("outfile"), "error", flag("output_dir") + ("outfile",),
      setup=write("outfile", "x"), protect=("outfile",))
    T("train/output-dir-under-file", short("afile/out"), "error", flag("output_dir") + ("afile/out", "afile"),
      setup=write("afile", "x"))
    T("train/resume-no-checkpoint", short("fresh") + ["--resume", "true"], "error", flag("resume") + ("fresh",))
    T("train/resume-ok", base("run") + ["--resume", "true"], "ok", setup=run_copy(fx),
      check=run_done("run", resumed_from="checkpoint-000004", log_before=fx.part_log))
    T("train/resume-larger-max-steps", base("run", steps=8) + ["--resume", "true"], "ok", setup=run_copy(fx),
      check=run_done("run", resumed_from="checkpoint-000004", max_steps=8, log_before=fx.part_log))
    T("train/resume-changed-lr", base("run") + ["--resume", "true", "--lr", "5e-3"], "error", flag("lr"),
      setup=run_copy(fx))
    T("train/resume-changed-lora-r", base("run") + ["--resume", "true", "--lora_r", "8"], "error", flag("lora_r"),
      setup=run_copy(fx))
    T("train/resume-changed-objective", base("run", "simcse") + ["--resume", "true"], "error", flag("objective"),
      setup=run_copy(fx))
    T("train/resume-max-steps-below-checkpoint", base("run", steps=3) + ["--resume", "true"], "error",
      flag("max_steps") + ("checkpoint-000004",), setup=run_copy(fx))
    T("train/resume-newest-adapter-truncated", base("run") + ["--resume", "true"], "ok",
      setup=run_copy(fx, edit=lambda r: truncate(r / "checkpoint-000004" / "adapter_model.safetensors")),
      check=run_done("run", resumed_from="checkpoint-000002", mentions=("checkpoint-000004",),
                     log_before=fx.part_log))
    T("train/resume-newest-trainer-state-truncated", base("run") + ["--resume", "true"], "ok",
      setup=run_copy(fx, edit=lambda r: truncate(r / "checkpoint-000004" / "trainer_state.pt")),
      check=run_done("run", resumed_from="checkpoint-000002", mentions=("checkpoint-000004",),
                     log_before=fx.part_log))
    T("train/resume-only-checkpoint-damaged", base("run") + ["--resume", "true"], "error",
      ("checkpoint-000004", "trainer_state.pt"),
      setup=run_copy(fx, edit=lambda r: (shutil.rmtree(r / "checkpoint-000002"),
                                         truncate(r / "checkpoint-000004" / "trainer_state.pt"))))
    # --- evaluation files (read late: the crash can cost the run)
    T("train/eval-sts-file-missing", short() + ["--eval_sts_file", "nope-sts.csv"], "error",
      ("nope-sts.csv",) + flag("eval_sts_file"), lost_work="out")
    T("train/eval-sts-file-malformed", short() + ["--eval_sts_file", "bad-sts.csv"], "error",
      ("bad-sts.csv",) + flag("eval_sts_file"), lost_work="out",
      setup=write("bad-sts.csv", "score\tsentence one\tsentence two\n4.0\tA cat.\tA dog.\n"))
    T("train/eval-sts-file-non-utf8", short() + ["--eval_sts_file", "latin1-sts.csv"], "error",
      ("latin1-sts.csv",) + flag("eval_sts_file"), lost_work="out",
      setup=write("latin1-sts.csv", sts_text(STS_ROWS[:3]).replace("A man", "Caf\xe9").encode("latin-1"), binary=True))
    simcse = ["--config", str(fx.repo / "configs" / "simcse" / "smollm2-135m.json"), "--model", M,
              "--train_file", str(fx.sents), "--output_dir", "out", "--init_adapter", A, "--max_steps", "2",
              "--batch_size", "4", "--max_seq_length", "32", "--lora_r", "4", "--autocast", "none",
              "--progress", "false", "--eval_every", "1", "--save_every", "1"]
    T("train/simcse-preset-ok", simcse + ["--eval_sts_file", str(fx.sts)], "ok",
      check=run_done("out", log_key="eval_sts_spearman"))
    T("train/simcse-preset-default-sts-missing", simcse, "error",
      flag("eval_sts_file") + ("sts-dev.csv",), lost_work="out",
      note="the preset's eval_sts_file is relative to ../shared, absent from this cwd")
    T("train/eval-file-missing", short() + ["--eval_file", "nope-eval.txt"], "error",
      ("nope-eval.txt",) + flag("eval_file"), lost_work="out")
    T("train/eval-file-empty", short() + ["--eval_file", "empty-eval.txt"], "error",
      ("empty-eval.txt",) + flag("eval_file"), lost_work="out", setup=write("empty-eval.txt", ""))
    # --- training data
    noargs = [a for a in short() if a not in ("--train_file", str(fx.sents))]
    T("train/train-file-not-given", noargs, "error", flag("train_file"))
    T("train/train-file-missing", short() + ["--train_file", "nope.txt"], "error", ("nope.txt",))
    T("train/train-file-directory", short() + ["--train_file", "textdir"], "error", ("textdir",),
      setup=mkdir("textdir"))
    T("train/train-file-empty", short() + ["--train_file", "empty.txt"], "error", ("empty.txt",),
      setup=write("empty.txt", ""))
    T("train/train-file-non-utf8", short() + ["--train_file", "latin1.txt"], "error", ("latin1.txt",),
      setup=write("latin1.txt", ("caf\xe9 au lait number one two three\n" * 80).encode("latin-1"), binary=True))
    T("train/train-file-csv-supervised", short("out", "supervised") + ["--train_file", "triples.csv"], "error",
      ("triples.csv",), setup=write("triples.csv", "query,positive,negative\n" +
                                    "".join(f"q{i},p{i},n{i}\n" for i in range(16))))
    T("train/train-file-too-small", short() + ["--train_file", "tiny.txt"], "error", ("tiny.txt",) + flag("batch_size"),
      setup=write("tiny.txt", "one short line\n"))
    T("train/supervised-missing-field", short("out", "supervised") + ["--train_file", "t.jsonl"], "error",
      ("t.jsonl",), setup=write("t.jsonl", "".join(json.dumps({"query": f"q {i}", "positive": f"p {i}"}) + "\n"
                                                   for i in range(8))))
    T("train/supervised-too-few-triples", short("out", "supervised") + ["--train_file", "t.jsonl"], "error",
      ("t.jsonl",) + flag("batch_size"),
      setup=write("t.jsonl", json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n"))
    T("train/supervised-ok", short("out", "supervised"), "ok", check=run_done("out"))
    T("train/mntp-ok", short(), "ok", check=run_done("out"))
    # --- numbers
    T("train/max-steps-0", short() + ["--max_steps", "0"], "error", flag("max_steps"))
    T("train/max-steps-negative", short() + ["--max_steps", "-1"], "error", flag("max_steps"))
    T("train/batch-size-0", short() + ["--batch_size", "0"], "error", flag("batch_size"))
    T("train/batch-size-negative", short() + ["--batch_size", "-4"], "error", flag("batch_size"))
    T("train/micro-batch-not-dividing", short() + ["--micro_batch_size", "3"], "error",
      flag("micro_batch_size", "batch_size"))
    T("train/lr-negative", short() + ["--lr", "-1"], "error", flag("lr"))
    T("train/lr-not-a-number", short() + ["--lr", "fast"], "error", flag("lr"))
    T("train/lora-r-0", short() + ["--lora_r", "0"], "error", flag("lora_r"))
    T("train/mask-probability-1.5", short() + ["--mask_probability", "1.5"], "error", flag("mask_probability"))
    T("train/mask-probability-0", short() + ["--mask_probability", "0"], "error", flag("mask_probability"))
    T("train/attention-dropout-1.5", short() + ["--attention_dropout", "1.5"], "error", flag("attention_dropout"))
    T("train/lora-dropout-1", short() + ["--lora_dropout", "1"], "error", flag("lora_dropout"))
    T("train/max-seq-length-0", short() + ["--max_seq_length", "0"], "error", flag("max_seq_length"))
    # --- names and types
    T("train/objective-unknown", short() + ["--objective", "contrastive"], "error", flag("objective"))
    T("train/pooling-unknown", short("out", "simcse") + ["--pooling", "max"], "error", flag("pooling"))
    T("train/mask-token-unknown", short() + ["--mask_token", "mask"], "error", flag("mask_token"))
    T("train/weights-dtype-bogus", short() + ["--weights_dtype", "float64"], "error", flag("weights_dtype"))
    T("train/autocast-bogus", short() + ["--autocast", "bf16x"], "error", flag("autocast"))
    T("train/bool-not-bool", short() + ["--resume", "maybe"], "error", flag("resume"))
    T("train/unknown-flag", short() + ["--learning_rate", "1e-3"], "error", ("--learning_rate",))
    # --- --config
    T("train/config-missing", short() + ["--config", "nocfg.json"], "error", ("nocfg.json",) + flag("config"))
    T("train/config-malformed", short() + ["--config", "cfg.json"], "error", ("cfg.json",),
      setup=write("cfg.json", '{"lr": 0.001,\n'))
    T("train/config-json-list", short() + ["--config", "cfg.json"], "error", ("cfg.json",),
      setup=write("cfg.json", '[{"lr": 0.001}]'))
    T("train/config-unknown-key", short() + ["--config", "cfg.json"], "error", ("cfg.json", "learning_rate"),
      setup=write("cfg.json", '{"learning_rate": 0.001}'))
    T("train/config-wrong-type", short() + ["--config", "cfg.json"], "error", ("cfg.json", "warmup_steps"),
      setup=write("cfg.json", '{"warmup_steps": "2"}'), note="a quoted number, in a key not also given as a flag")
    T("train/config-objective-unknown", short()[2:] + ["--config", "cfg.json"], "error", ("cfg.json",) + flag("objective"),
      setup=write("cfg.json", '{"objective": "mlm"}'))
    # --- adapters and outputs
    T("train/init-adapter-missing", short() + ["--init_adapter", "noadapter"], "error", ("noadapter",))
    T("train/init-adapter-truncated", short() + ["--init_adapter", "adapter"], "error", ("adapter_model.safetensors",),
      setup=adapter_copy(fx, edit=lambda a: truncate(a / "adapter_model.safetensors")))
    T("train/init-adapter-nan", short() + ["--init_adapter", "adapter"], "error", ("adapter_model.safetensors", "adapter"),
      setup=adapter_copy(fx, edit_tensors=nan_tensors))
    T("train/init-adapter-layers-to-transform", short() + ["--init_adapter", "adapter"], "error",
      ("adapter_config.json", "layers_to_transform"),
      setup=adapter_copy(fx, edit_config=lambda c: c.update(layers_to_transform=[1])))
    T("train/merge-out-existing-model", short() + ["--merge_out", "merged"], "error", ("merged",) + flag("merge_out"),
      setup=model_copy(fx, "merged", link_weights=False), protect=("merged",))
    T("train/merge-out-ok", short() + ["--merge_out", "merged"], "ok",
      check=lambda d, r: ((d / "merged" / "model.safetensors").is_file() and (d / "merged" / "tokenizer.json").is_file(),
                          "merged folder"))
    T("train/merge-out-is-file", short() + ["--merge_out", "merged"], "error", ("merged",) + flag("merge_out"),
      setup=write("merged", "x"), lost_work="out")
    T("train/lora-targets-match-nothing", short() + ["--lora_targets", "c_attn"], "error",
      flag("lora_targets") + ("c_attn",))
    T("train/lora-targets-one-unknown", short() + ["--lora_targets", "q_proj,v_porj"], "error",
      flag("lora_targets") + ("v_porj",))
    T("train/model-missing", short() + ["--model", "nomodel"], "error", ("nomodel",) + flag("model"))

    # ================================================================= eval.py
    V("eval/ok", [], "ok", check=strict_json(results=1))
    V("eval/tasks-empty", ["--tasks", ""], "error", flag("tasks"))
    V("eval/tasks-only-commas", ["--tasks", ",,"], "error", flag("tasks"))
    V("eval/tasks-unknown", ["--tasks", "stsb-devv"], "error", flag("tasks") + ("stsb-devv",))
    V("eval/data-dir-missing", ["--data-dir", "nodata"], "error", ("nodata",) + flag("data-dir"))
    V("eval/data-dir-is-file", ["--data-dir", "data.txt"], "error", ("data.txt",) + flag("data-dir"),
      setup=write("data.txt", "x"))
    V("eval/data-dir-lacks-second-task", ["--data-dir", "evaldata", "--tasks", "dev"], "error",
      ("SICK_trial.txt", "evaldata"), setup=evaldata_copy(fx, edit=lambda e: shutil.rmtree(e / "sick")))
    V("eval/sts-file-malformed", ["--data-dir", "evaldata"], "error", ("sts-dev.csv",),
      setup=evaldata_copy(fx, edit=lambda e: (e / "stsbenchmark" / "sts-dev.csv").write_text("A cat.\tA dog.\t4.0\n")))
    V("eval/sts-file-non-utf8", ["--data-dir", "evaldata"], "error", ("sts-dev.csv",),
      setup=evaldata_copy(fx, edit=lambda e: (e / "stsbenchmark" / "sts-dev.csv").write_bytes(
          sts_text(STS_ROWS).replace("A man", "Caf\xe9").encode("latin-1"))))
    V("eval/constant-gold-nan-metric", ["--data-dir", "evaldata"], "either", ("sts-dev.csv", "spearman"),
      setup=evaldata_copy(fx, edit=lambda e: (e / "stsbenchmark" / "sts-dev.csv").write_text(
          sts_text([(3.0, a, b) for _, a, b in STS_ROWS]))), check=strict_json(),
      note="Spearman of constant gold scores is NaN: refuse, or write strict JSON (null)")
    V("eval/model-missing", ["--model", "nomodel"], "error", ("nomodel",) + flag("model"))
    V("eval/model-not-given", ["--data-dir", str(fx.evald), "--tasks", "stsb-dev", "--out", "res.json"], "error",
      flag("model"), base=False)
    V("eval/dtype-bogus", ["--dtype", "float64"], "error", flag("dtype"))
    V("eval/autocast-bogus", ["--autocast", "yes"], "error", flag("autocast"))
    V("eval/pooling-bogus", ["--pooling", "max"], "error", flag("pooling"))
    V("eval/chat-template-bogus", ["--chat-template", "chatgpt"], "error", flag("chat-template") + ("chatgpt",))
    V("eval/device-bogus", ["--device", "tpu"], "error", flag("device") + ("tpu",))
    ro, ro_setup = unwritable_out("res.json")
    V("eval/out-unwritable", ["--out", ro], "error", (ro,) + flag("out"), setup=ro_setup)
    V("eval/out-parent-is-file", ["--out", "afile/res.json"], "error", ("afile/res.json", "afile") + flag("out"),
      setup=write("afile", "x"))
    V("eval/out-existing-folder", ["--out", "resdir"], "error", ("resdir",) + flag("out"), setup=mkdir("resdir"))
    for name, raw in (("0", "0"), ("negative", "-8")):
        f, v = batch_flag(fx.repo, "eval.py", raw)
        V(f"eval/batch-size-{name}", [f, v], "error", flag(f.lstrip("-")))
    V("eval/max-length-0", ["--max-length", "0"], "error", flag("max-length"))
    V("eval/sts-instruction-fills-max-length", ["--max-length", "16", "--sts-instruction",
                                                " ".join(["word"] * 40)], "error",
      flag("sts-instruction", "max-length") + ("instruction",))
    V("eval/adapter-missing", ["--adapter", "noadapter"], "error", ("noadapter",))
    V("eval/adapter-truncated", ["--adapter", "adapter"], "error", ("adapter_model.safetensors",),
      setup=adapter_copy(fx, edit=lambda a: truncate(a / "adapter_model.safetensors")))
    V("eval/adapter-nan-weights", ["--adapter", "adapter"], "error", ("adapter_model.safetensors", "adapter"),
      setup=adapter_copy(fx, edit_tensors=nan_tensors))
    V("eval/unknown-flag", ["--normalise"], "error", ("--normalise",))

    extended = set(EXTENDED.split())
    assert extended <= {c.name for c in cases}, extended - {c.name for c in cases}
    for c in cases:
        c.extra = c.name in extended
    return cases


# More of the same kinds, run with --extended.
EXTENDED = """
encode/text-tab-newline
encode/text-emoji-only
encode/instruction-fills-small-max-length
encode/normalize-ok
encode/file-non-utf8-jsonl
encode/file-jsonl-text-number
encode/file-jsonl-instruction-list
encode/file-crlf
encode/file-20-lines-no-out
encode/batch-size-text
encode/model-empty-folder
encode/model-config-missing-key
encode/model-type-unsupported
encode/model-tokenizer-garbage
encode/model-weights-empty-file
encode/model-pickle-only
encode/adapter-is-file
encode/adapter-config-list
encode/adapter-foreign-keys
encode/adapter-not-lora
encode/dtype-bfloat16-ok
encode/api-pair-list-ok
train/output-dir-under-file
train/eval-sts-file-non-utf8
train/train-file-not-given
train/train-file-directory
train/train-file-too-small
train/supervised-too-few-triples
train/supervised-ok
train/batch-size-negative
train/lr-not-a-number
train/mask-token-unknown
train/bool-not-bool
train/config-objective-unknown
train/init-adapter-layers-to-transform
train/merge-out-is-file
train/merge-out-ok
train/resume-changed-objective
train/max-seq-length-0
train/model-missing
train/mask-probability-0
eval/sts-file-non-utf8
eval/data-dir-is-file
eval/model-not-given
"""


# ----------------------------------------------------------------------------- running and classifying

NOISE = [re.compile(p) for p in (
    r"^\s*$",
    r"\d+%\|",  # tqdm bar
    r"\|\s*\d+/\d+\s*\[",  # tqdm bar without percentage
    r"^[WI]\d{4} \d\d:",  # glog lines (torchrun)
    r"^\*{5,}",
    r"Setting OMP_NUM_THREADS",
)]
WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def meaningful_lines(stderr: str) -> list[str]:
    """stderr minus argparse's usage block, Python warnings (with their source line), progress bars."""
    out, skip_indented = [], False
    for line in re.split(r"[\r\n]+", stderr):
        if skip_indented and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skip_indented = False
        if line.startswith("usage:") or WARNING.search(line) or line.startswith("  warnings.warn("):
            skip_indented = True
            continue
        if any(p.search(line) for p in NOISE):
            continue
        out.append(line.rstrip())
    return out


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def snapshot(d: Path, rels) -> dict:
    snap = {}
    for rel in rels:
        p = d / rel
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        for f in files:
            st = f.stat()
            snap[str(f.relative_to(d))] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_mtime_ns)
    return snap


def run_one(case: Case, fx: Fixtures, root: Path, timeout: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "_", case.name) + "-", dir=root))
    rec = {"name": case.name, "cli": case.cli, "expect": case.expect, "argv": [str(a)[:300] for a in case.argv],
           "note": case.note}
    try:
        if case.setup:
            case.setup(d)
    except Exception as e:  # a battery bug, not the CLI's
        rec.update(verdict="battery-error", msg=f"setup failed: {type(e).__name__}: {e}", rc=None, seconds=0)
        return rec
    before = snapshot(d, case.protect)
    if case.protect and not before:
        rec.update(verdict="battery-error", msg="nothing to protect after setup", rc=None, seconds=0)
        return rec
    if case.cli == "python":
        cmd = [sys.executable, "-c", *map(str, case.argv)]
    else:
        cmd = [sys.executable, str(fx.repo / f"{case.cli}.py"), *map(str, case.argv)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=d, env=child_env(fx.repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    rec.update(rc=rc, seconds=round(time.time() - t0, 1), stdout=stdout[-3000:], stderr=stderr[-4000:])
    lines = meaningful_lines(stderr)
    tb = rc not in (0, None) and "Traceback (most recent call last)" in stderr
    msg = (lines[-1] if tb else lines[0]) if lines else ""
    detail = ""

    after = snapshot(d, case.protect)
    changed = sorted(k for k in before if after.get(k) != before[k])
    lost = ""
    if case.lost_work and rc != 0:
        out = d / case.lost_work
        if (out / "train_config.json").is_file() and not (out / "final" / "adapter_model.safetensors").is_file():
            lost = f"training started in {case.lost_work}/ and crashed before final/ was saved"
    if changed:
        gone = [k for k in changed if k not in after]
        verdict = "data-loss"
        detail = f"{len(changed)} protected file(s) changed or gone ({len(gone)} gone), e.g. {changed[0]}"
    elif lost:
        verdict, detail = "data-loss", lost
    elif rc is None:
        verdict = "hang"
    elif tb and not (case.cli == "python" and case.expect == "error"):
        verdict = "traceback"
    elif rc != 0:
        if case.cli == "python":  # API misuse: the exception message is the error
            one = lines[-1] if lines else ""
            verdict = "clear" if names_match(one, case.names) else "unclear"
            msg = one
        elif case.expect == "ok":
            verdict = "refused"
        else:
            verdict = "clear" if len(lines) == 1 and names_match(lines[0], case.names) else "unclear"
            if verdict == "clear":
                rec["format_ok"] = bool(re.match(rf"{case.cli}\.py: error: ", lines[0]))
    elif case.expect == "error":
        verdict = "silent-wrong"
        detail = "accepted (rc 0): " + (first_line(stdout) or "no output")
        if case.check:
            detail += " | " + safe_check(case, d, rec)[1]
    else:
        passed, detail = safe_check(case, d, rec) if case.check else (True, "")
        verdict = "ok" if passed else "silent-wrong"
    if verdict == "data-loss":
        msg = detail + (f" | {msg}" if msg else "")
    elif verdict == "silent-wrong" and not msg:
        msg = detail
    rec.update(verdict=verdict, msg=msg, detail=detail, meaningful_stderr=lines[-12:])
    return rec


def safe_check(case, d, rec):
    try:
        return case.check(d, rec)
    except Exception as e:
        return False, f"check failed: {type(e).__name__}: {e}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, type=Path, help="the l2v checkout whose CLIs are tested")
    p.add_argument("--out", required=True, type=Path, help="results JSON")
    p.add_argument("--only", action="append", default=[], help="run only cases whose name contains this (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1; at most 2 on a small machine)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case before the verdict 'hang'")
    p.add_argument("--tokenizer-dir", type=Path, help="SmolLM2 tokenizer files (default: ../shared/reference/...)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (printed)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--extended", action="store_true", help="also run the extra cases (about 45 more)")
    args = p.parse_args(argv)
    repo = args.repo.resolve()
    for name in ("encode.py", "train.py", "eval.py", "l2v"):
        if not (repo / name).exists():
            p.error(f"--repo: {repo} has no {name}")
    tok_dir = args.tokenizer_dir or next(
        (c for c in (repo.parent / "shared" / "reference" / "smollm2-135m-instruct",
                     HERE.parent.parent / "shared" / "reference" / "smollm2-135m-instruct")
         if (c / "tokenizer.json").is_file()), None)
    if tok_dir is None or not all((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        p.error("--tokenizer-dir: no folder with " + ", ".join(TOKENIZER_FILES))
    if args.jobs < 1:
        p.error("--jobs: must be >= 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="l2v-battery-"))
    t0 = time.time()
    try:
        if args.list:
            class Dummy:  # the case list needs only paths
                pass
            fx = Dummy()
            fx.repo, fx.model, fx.adapter = repo, tmp / "model", tmp / "adapter"
            fx.sents, fx.triples, fx.sts, fx.evald = tmp / "s.txt", tmp / "t.jsonl", tmp / "sts.csv", tmp / "ev"
            fx.train_args = lambda *a, **k: Fixtures.train_args(fx, *a, **k)
            fx.part_log = 4
            for c in build_cases(fx):
                if args.extended or not c.extra:
                    print(f"{c.name:<48} {c.expect}")
            return
        fx = Fixtures(tmp / "fixtures", repo, tok_dir, log)
        cases = [c for c in build_cases(fx) if args.extended or not c.extra]
        if args.only:
            cases = [c for c in cases if any(s in c.name for s in args.only)]
        assert len({c.name for c in cases}) == len(cases), "duplicate case names"
        log(f"{len(cases)} cases against {repo} (fixtures {time.time() - t0:.0f}s)")
        root = tmp / "cases"
        root.mkdir()
        results = [None] * len(cases)

        def work(i):
            r = run_one(cases[i], fx, root, args.timeout)
            results[i] = r
            log(f"[{sum(x is not None for x in results):3d}/{len(cases)}] {r['verdict']:<13} {r['name']} "
                f"({r.get('seconds', 0)}s)")

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(work, range(len(cases))))
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            for f in tmp.rglob("*"):  # a read-only folder from a case would stop rmtree
                if f.is_dir() and not f.is_symlink():
                    os.chmod(f, 0o755)
            shutil.rmtree(tmp, ignore_errors=True)

    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS + ("battery-error",)}
    counts = {k: v for k, v in counts.items() if v or k in VERDICTS}
    summary = {"repo": str(repo), "cases": len(results), "seconds": round(time.time() - t0, 1), "counts": counts,
               "by_cli": {cli: {v: sum(r["verdict"] == v for r in results if r["cli"] in cli_set)
                                for v in counts if any(r["verdict"] == v and r["cli"] in cli_set for r in results)}
                          for cli, cli_set in (("encode", ("encode", "python")), ("train", ("train",)),
                                               ("eval", ("eval",)))}}
    args.out.write_text(json.dumps({"summary": summary, "results": results}, indent=2, ensure_ascii=False) + "\n")

    width = max(len(r["name"]) for r in results)
    print(f"\n{'case':<{width}}  {'expect':<6}  {'verdict':<12}  message")
    for r in results:
        m = (r.get("msg") or "").replace("\n", " ")
        print(f"{r['name']:<{width}}  {r['expect']:<6}  {r['verdict']:<12}  {m[:110]}")
    print(f"\n{len(results)} cases in {summary['seconds']:.0f}s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
