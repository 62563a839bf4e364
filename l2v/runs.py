"""A training run's folder as `train.py` checks it before writing anything: the paths a run writes must not
hold what it reads, a checkpoint is read back whole before it is resumed, and a checkpoint remembers the
data it trained on. Reads files, writes none."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .adapters import read_adapter
from .checkpoint import read_json
from .config import DEFAULTS, RESUMABLE, TrainConfig
from .files import check_writable_folder, sha256_file


def data_identity(path: str | os.PathLike) -> dict:
    """What a checkpoint records of its train file: the content's sha256 and size (not its path: a moved
    file is the same data)."""
    return {"data_sha256": sha256_file(path), "data_bytes": Path(path).stat().st_size}


def check_paths(cfg: TrainConfig, ours: list[Path]) -> None:
    """`ours`: what this run deletes or rewrites (the earlier run's files with --overwrite, final/). What it
    reads and the merged folder it writes must lie outside them, and no adapter it reads may be the output
    folder (whose train_config.json the run rewrites); the merged folder must not be the output folder or
    hold it, and must be new (or empty) and writable."""
    out, merge = Path(cfg.output_dir).resolve(), cfg.merge_out and Path(cfg.merge_out)
    ours = [p.resolve() for p in ours]
    reads = [
        ("--model", cfg.model),
        ("--train_file", cfg.train_file),
        ("--eval_file", cfg.eval_file),
        ("--eval_sts_file", cfg.eval_sts_file),
    ] + [("--init_adapter", f) for f in cfg.init_adapter]
    for flag, path in reads + [("--merge_out", merge)]:
        if path and any(Path(path).resolve().is_relative_to(p) for p in ours):
            raise ValueError(
                f"{flag} {path}: inside this run's own files in {cfg.output_dir} (they are rewritten)"
            )
    for folder in cfg.init_adapter:
        if Path(folder).resolve() == out:
            raise ValueError(f"--init_adapter {folder}: is --output_dir (the run rewrites its files)")
    if not merge:
        return
    if out.is_relative_to(merge.resolve()):
        raise ValueError(
            f"--merge_out {merge}: holds --output_dir {cfg.output_dir} (the merged folder replaces it)"
        )
    check_writable_folder(merge, "--merge_out")
    if merge.is_dir() and any(merge.iterdir()):
        raise ValueError(f"--merge_out {merge}: exists and is not empty")


def read_checkpoint(ckpt: Path, meta) -> tuple[dict, dict]:
    """(train_config.json, trainer_state.pt) of a checkpoint, after reading back every file of it (a kill may
    have truncated any); a damaged one is a ValueError naming the file."""
    saved = read_json(ckpt / "train_config.json")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt / 'train_config.json'}: not a JSON object")
    read_adapter(ckpt, meta)
    for name in ["trainer_state.pt", *sorted(p.name for p in ckpt.glob("rng_rank*.pt"))]:
        try:
            obj = torch.load(ckpt / name, weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"{ckpt / name}: {type(e).__name__}: {str(e)[:200]}") from None
        if name == "trainer_state.pt":
            state = obj
    keys = {"step": int, "optimizer": dict, "scheduler": dict}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in keys.items()):
        raise ValueError(f"{ckpt / 'trainer_state.pt'}: not a trainer state (step, optimizer, scheduler)")
    return saved, state


def resumable_checkpoint(cfg: TrainConfig, out: Path, meta, data: dict) -> Path:
    """The newest intact checkpoint, if it was trained with these settings on this data (`data_identity`)."""
    damaged = []
    for ckpt in sorted(out.glob("checkpoint-*"), reverse=True):
        try:
            saved, state = read_checkpoint(ckpt, meta)
            break
        except (OSError, ValueError) as e:
            damaged.append(f"{ckpt}: damaged, skipped ({e})")
    else:
        raise ValueError(f"--resume: no intact checkpoint in {out}" + "".join(f"; {d}" for d in damaged))
    for d in damaged:
        print(f"train.py: warning: {d}", file=sys.stderr, flush=True)
    changed = [k for k in DEFAULTS if k not in RESUMABLE and saved.get(k, DEFAULTS[k]) != getattr(cfg, k)]
    if changed:
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(
            f"--resume: {ckpt} was trained with other settings: {diff} (may change: {sorted(RESUMABLE)})"
        )
    if cfg.max_steps < state["step"]:
        raise ValueError(f"--max_steps {cfg.max_steps}: below the checkpoint's step {state['step']} ({ckpt})")
    if state.get("data_sha256", data["data_sha256"]) != data["data_sha256"] and not cfg.resume_other_data:
        was = f"{state['data_bytes']} bytes, " if "data_bytes" in state else ""
        raise ValueError(
            f"--train_file {cfg.train_file}: not the data {ckpt} was trained on ({was}another "
            "sha256); --resume_other_data true continues on it anyway"
        )
    return ckpt


def log_until(path: Path, step: int) -> list[dict]:
    """The records of a log up to `step`, for a resumed run to continue; a torn last line (a kill mid-write)
    and anything else that is not a record are dropped."""
    recs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("step", 0), int)
            and rec.get("step", 0) <= step
            and rec.get("event", "start") == "start"  # each (re)start's record stays; "end" does not
        ):
            recs.append(rec)
    return recs
