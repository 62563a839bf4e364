"""One training loop for the LLM2Vec stages: MNTP, unsupervised SimCSE, supervised contrastive.

    # stage 1: masked next-token prediction (bidirectional attention + LoRA)
    python train.py --objective mntp --config configs/mntp/smollm2-135m.json
    torchrun --nproc_per_node 2 train.py --objective mntp --config configs/mntp/smollm2-135m.json
    # stage 2: SimCSE on top of the merged MNTP adapter
    python train.py --objective simcse --config configs/simcse/smollm2-135m.json --init_adapter runs/mntp-smollm2/final
    # any key can be overridden: --key value (lists as JSON or comma-separated)
    python train.py --objective mntp --model DIR --train_file wiki.txt --max_steps 10 --lr 1e-4

Everything is visible here: config, checks, DDP setup, the step loop with gradient accumulation under
`no_sync`, autocast, clipping, logging, evaluation and checkpoints. `OBJECTIVES` is the one place that
differs per objective: how a file becomes examples, examples a micro-batch, and a micro-batch a loss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from l2v.checkpoint import load_config, load_model, read_json, resolve_autocast, resolve_device, save_model
from l2v.data import batches, mask_token_id, mask_tokens, mntp_blocks, read_records, read_texts, read_triples
from l2v.encoder import POOLING_MODES, Encoder
from l2v.evaluate import evaluate_sts, read_stsb
from l2v.lora import add_lora, load_adapter, merge_lora, read_adapter, save_adapter
from l2v.model import Transformer
from l2v.objectives import contrastive_loss, mntp_loss, num_targets, simcse_loss, supervised_loss
from l2v.tokenizer import Tokenizer

# key: (default, help). The type of a --key value is that of its default. A config file or --key overrides.
OPTIONS = {
    "objective": ("mntp", "mntp | simcse | supervised"),
    "model": ("models/smollm2-135m-instruct", "HF model folder (config.json, safetensors, tokenizer.json)"),
    "train_file": ("", "MNTP/SimCSE: .txt/.raw (a text per line), .json/.jsonl; supervised: .jsonl triples"),
    "eval_file": ("", "held-out examples in the train_file's format: the objective's loss at each eval"),
    "eval_sts_file": ("", "STS-B style dev file: Spearman x100 at each eval (checkpoint selection)"),
    "output_dir": ("runs/run", "checkpoints, final/ adapter, log.jsonl; must be new or empty (see --resume)"),
    "init_adapter": ([], "adapters merged into the base first (e.g. MNTP's, before SimCSE)"),
    "is_causal": (False, "keep causal attention (LLM2Vec trains bidirectional)"),
    "device": ("auto", "auto (CUDA when available) | cpu | cuda | cuda:N; torchrun picks cuda:LOCAL_RANK"),
    "max_steps": (1000, "optimizer steps; the linear schedule decays to 0 here"),
    "stop_after_n_steps": (0, "end early but keep the schedule of max_steps (0 = off)"),
    "batch_size": (32, "global batch: examples per optimizer step, over ranks and accumulation"),
    "micro_batch_size": (0, "examples per rank per forward; 0 = batch_size / world size"),
    "lr": (5e-5, "peak learning rate (AdamW)"),
    "warmup_steps": (0, "linear warmup steps"),
    "weight_decay": (0.0, "AdamW weight decay"),
    "grad_clip": (1.0, "max gradient norm (0 = off)"),
    "seed": (42, "data order, masks, LoRA init and dropout"),
    "lora_r": (16, "LoRA rank"),
    "lora_alpha": (32.0, "LoRA alpha (scaling = alpha / r)"),
    "lora_dropout": (0.05, "dropout on the LoRA input"),
    "lora_targets": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     "projection names that get LoRA"),
    "lora_layers": ([], "layer numbers that get LoRA (empty = all)"),
    "max_seq_length": (512, "MNTP block length; contrastive: tokens per text"),
    "mask_probability": (0.2, "MNTP: share of tokens masked"),
    "mask_token": ("blank", "MNTP mask token: blank ('_', upstream's) | eos"),
    "mask_mode": ("80_10_10", "MNTP: 80_10_10 | all_mask"),
    "attention_dropout": (0.0, "attention dropout (SimCSE: 0.3)"),
    "pooling": ("mean", "contrastive pooling: " + " | ".join(POOLING_MODES)),
    "prompt": ("", "contrastive: template around each text with one {text} slot (e.g. PromptEOL)"),
    "instruction": ("", "SimCSE: instruction before each sentence (supervised: the triples' own)"),
    "scale": (20.0, "contrastive: cosine x scale (20 SimCSE, 50 supervised)"),
    "weights_dtype": ("float32", "frozen base weights: float32 | bfloat16 (LoRA weights stay float32)"),
    "autocast": ("auto", "auto (bf16 where fast: GPUs, AVX512-BF16/AMX CPUs) | bfloat16 | float16 | none"),
    "gradient_checkpointing": (False, "recompute each layer in the backward: less memory, ~30% slower"),
    "compile": (False, "torch.compile the model"),
    "log_every": (10, "steps between log lines (mean loss since the last one)"),
    "eval_every": (0, "steps between evaluations (0 = only at the end); needs an eval file"),
    "eval_batches": (8, "micro-batches of eval_file per evaluation"),
    "save_every": (0, "steps between checkpoints (0 = only the final adapter)"),
    "keep_checkpoints": (2, "newest checkpoints kept"),
    "resume": (False, "continue from the newest intact checkpoint in output_dir"),
    "overwrite": (False, "delete a previous run's files in output_dir and start afresh"),
    "merge_out": ("", "also write a merged HF folder (base + init adapters + this LoRA)"),
    "progress": (True, "progress bar (only when stderr is a terminal)"),
}
DEFAULTS = {k: v for k, (v, _) in OPTIONS.items()}
OBJECTIVE_DEFAULTS = {
    "mntp": dict(lr=5e-5, max_seq_length=512, batch_size=32),
    "simcse": dict(lr=3e-5, max_seq_length=128, batch_size=128, attention_dropout=0.3, scale=20.0),
    "supervised": dict(lr=2e-4, max_seq_length=512, batch_size=64, warmup_steps=300, scale=50.0),
}
CHOICES = {"objective": tuple(OBJECTIVE_DEFAULTS), "pooling": POOLING_MODES, "mask_token": ("blank", "eos"),
           "mask_mode": ("80_10_10", "all_mask"), "weights_dtype": ("float32", "bfloat16"),
           "autocast": ("auto", "bfloat16", "float16", "none")}
RANGES = {  # key: (low, high, low included); None = unbounded
    "max_steps": (1, None, True), "batch_size": (1, None, True), "micro_batch_size": (0, None, True),
    "lr": (0, None, False), "warmup_steps": (0, None, True), "weight_decay": (0, None, True),
    "grad_clip": (0, None, True), "lora_r": (1, None, True), "lora_alpha": (0, None, False),
    "lora_dropout": (0, 1, True), "max_seq_length": (2, None, True), "mask_probability": (0, 1, False),
    "attention_dropout": (0, 1, True), "scale": (0, None, False), "log_every": (1, None, True),
    "eval_every": (0, None, True), "eval_batches": (1, None, True), "save_every": (0, None, True),
    "keep_checkpoints": (1, None, True), "stop_after_n_steps": (0, None, True)}
# Keys that may differ when resuming; any other change would silently train something else.
RESUMABLE = {"max_steps", "stop_after_n_steps", "device", "log_every", "eval_every", "eval_batches", "eval_file",
             "eval_sts_file", "save_every", "keep_checkpoints", "resume", "overwrite", "merge_out", "progress",
             "compile", "gradient_checkpointing"}


class UserError(Exception):
    """A mistake in the command line, a config or a file: reported as one line, no traceback."""


def parse_config(argv: list[str]) -> dict:
    """defaults < objective defaults < --config JSON < --key value flags; then every value checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of keys below")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    for key, (value, text) in OPTIONS.items():
        p.add_argument(f"--{key}", default=None, metavar=type(value).__name__.upper(),
                       help=f"{text} (default: {json.dumps(value)})")
    args = p.parse_args(argv)
    file_cfg = {}
    if args.config:
        file_cfg = read_json(args.config)
        if not isinstance(file_cfg, dict):
            raise UserError(f"{args.config}: expected a JSON object of config keys")
        file_cfg.pop("_comment", None)
        unknown = sorted(set(file_cfg) - set(DEFAULTS))
        if unknown:
            raise UserError(f"{args.config}: unknown config key(s) {unknown}")
    flags = {k: coerce(k, v) for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    objective = flags.get("objective", file_cfg.get("objective", DEFAULTS["objective"]))
    if objective not in OBJECTIVE_DEFAULTS:
        raise UserError(f"--objective: unknown objective {objective!r}; choose from {list(OBJECTIVE_DEFAULTS)}")
    cfg = {**DEFAULTS, **OBJECTIVE_DEFAULTS[objective], **file_cfg, **flags}
    for key, value in cfg.items():
        check_value(key, value, f"--{key}" if key in flags else f"{args.config}: {key}" if key in file_cfg else key)
    if cfg["resume"] and cfg["overwrite"]:
        raise UserError("--resume, --overwrite: choose one")
    return cfg


def coerce(key: str, raw: str):
    """A command-line string -> the type of the key's default."""
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, list):
            value = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
            return [int(v) for v in value] if key == "lora_layers" else value
        return type(default)(raw)
    except ValueError:
        raise UserError(f"--{key}: cannot read {raw!r} as {type(default).__name__}") from None


def check_value(key: str, value, where: str) -> None:
    default = DEFAULTS[key]
    ok_type = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
    if not ok_type or (isinstance(value, bool) and not isinstance(default, bool)):
        raise UserError(f"{where}: expected a {type(default).__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(CHOICES[key])}")
    if key in RANGES:
        lo, hi, lo_ok = RANGES[key]
        if value < lo or (value == lo and not lo_ok) or (hi is not None and value >= hi):
            bound = f"{'>=' if lo_ok else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
            raise UserError(f"{where}: must be {bound}, got {value}")
    if isinstance(default, list) and not all(isinstance(v, int if key == "lora_layers" else str) for v in value):
        raise UserError(f"{where}: expected a list of {'integers' if key == 'lora_layers' else 'strings'}")
    if key == "prompt" and value and value.count("{text}") != 1:
        raise UserError(f"{where}: needs exactly one {{text}} slot")


# ----------------------------------------------------------------------------- objectives

@dataclass
class Objective:
    read: Callable  # (cfg, tokenizer, path) -> examples
    # (ctx, examples, indices of the global batch, this rank's positions) -> [(inputs, loss terms, tokens)]
    micro_batch: Callable
    loss: Callable  # (ctx, model, inputs, gather) -> loss summed over its terms


def mntp_micro_batch(ctx, data, global_idx, positions):
    """Mask the whole global batch with a generator seeded by (seed, step), then take this rank's rows:
    any world size or accumulation split sees the masks one process would, and resume is exact."""
    g = torch.Generator().manual_seed(ctx.cfg["seed"] * 1_000_003 + ctx.step)
    ids, labels = mask_tokens(data[global_idx], mask_id=ctx.mask_id, special_ids=ctx.tok.special_ids,
                              vocab_size=ctx.tok.vocab_size, probability=ctx.cfg["mask_probability"],
                              mode=ctx.cfg["mask_mode"], generator=g)
    return [((ids[pos], labels[pos]), int(num_targets(labels[pos])), ids[pos].numel()) for pos in positions]


def mntp_step_loss(ctx, model, inputs, gather):
    ids, labels = (t.to(ctx.device) for t in inputs)
    return mntp_loss(model(ids), labels, ctx.raw_model.lm_head_weight, normalizer=1.0)


def contrastive_micro_batch(ctx, data, global_idx, positions):
    """Each micro-batch is packed into one Batch (see `Encoder.batches`): SimCSE lists every sentence
    twice (dropout makes the copies differ); supervised lists queries, then positives, then negatives."""
    out = []
    for pos in positions:
        rows = [data[global_idx[p]] for p in pos]
        if ctx.cfg["objective"] == "simcse":
            texts = [(ctx.cfg["instruction"], t) for t in rows] * 2
        else:  # upstream: the instruction goes with the query only, and pooling skips its tokens
            texts = [(r["instruction"], r["query"]) for r in rows] + [r["positive"] for r in rows] + \
                    [r["negative"] for r in rows]
        batch, = ctx.enc.batches(ctx.enc.prepare_inputs(texts))
        out.append((batch, 1, int((batch.segments > 0).sum())))
    return out


def contrastive_step_loss(ctx, model, batch, gather):
    """Embeddings are gathered from every rank with gradient, so the negatives are the global
    micro-batch, not the local slice; every rank computes the same global loss."""
    emb = ctx.enc.embed(batch, model)  # (n_texts, D) in input order; DDP's wrapper when there is one
    if not gather:  # evaluation runs on one rank
        return contrastive_loss(*emb.chunk(2 if ctx.cfg["objective"] == "simcse" else 3), scale=ctx.cfg["scale"])
    if ctx.cfg["objective"] == "simcse":
        return simcse_loss(*emb.chunk(2), scale=ctx.cfg["scale"])
    return supervised_loss(*emb.chunk(3), scale=ctx.cfg["scale"])


OBJECTIVES = {
    "mntp": Objective(lambda cfg, tok, path: mntp_blocks(tok, read_texts(path), cfg["max_seq_length"]),
                      mntp_micro_batch, mntp_step_loss),
    "simcse": Objective(lambda cfg, tok, path: read_texts(path), contrastive_micro_batch, contrastive_step_loss),
    "supervised": Objective(lambda cfg, tok, path: read_triples(path), contrastive_micro_batch, contrastive_step_loss),
}


def micro_batch_positions(batch_size: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Positions in the global batch for each of this rank's micro-batches.

    Accumulation step i covers the contiguous group [i*G, (i+1)*G), G = micro * world, and rank r
    takes its r-th slice. Gathered over ranks, a contrastive micro-batch is then the same group of
    examples (the same in-batch negatives) whatever the world size: 1 rank x 2 micro-batches of 4
    and 2 ranks x 2 micro-batches of 2 both see the groups [0:4] and [4:8].
    """
    G = micro * world
    return [list(range(i * G + rank * micro, i * G + (rank + 1) * micro)) for i in range(batch_size // G)]


# ----------------------------------------------------------------------------- checks before any work

def check_run(cfg: dict, world: int):
    """Every file the run needs, read or checked before the model loads. Returns the tokenizer, data,
    eval data, STS dev data and the checkpoint to resume from (or None)."""
    mb = cfg["micro_batch_size"] = cfg["micro_batch_size"] or cfg["batch_size"] // world
    if cfg["batch_size"] % world or (cfg["batch_size"] // world) % mb:
        raise UserError(f"--batch_size {cfg['batch_size']}: must split evenly over {world} rank(s) x "
                        f"micro_batch_size {mb}")
    if not cfg["train_file"]:
        raise UserError("--train_file: required (a .txt, .raw, .json or .jsonl file)")
    if cfg["eval_every"] and not (cfg["eval_file"] or cfg["eval_sts_file"]):
        raise UserError("--eval_every: needs --eval_file or --eval_sts_file")
    model_cfg = load_config(cfg["model"])
    tok = Tokenizer(cfg["model"])
    objective = OBJECTIVES[cfg["objective"]]
    data = objective.read(cfg, tok, cfg["train_file"])
    if len(data) < cfg["batch_size"]:
        raise UserError(f"{cfg['train_file']}: {len(data)} training examples, fewer than one batch of {cfg['batch_size']}")
    eval_data = objective.read(cfg, tok, cfg["eval_file"]) if cfg["eval_file"] else None
    if eval_data is not None and len(eval_data) < mb:
        raise UserError(f"{cfg['eval_file']}: {len(eval_data)} examples, fewer than one micro-batch of {mb}")
    groups = [r.get("dataset", "") for r in data] if cfg["objective"] == "supervised" else None
    if not next(batches(len(data), cfg["batch_size"], seed=cfg["seed"], groups=groups), None):
        raise UserError(f"{cfg['train_file']}: not one full global batch of {cfg['batch_size']} per dataset")
    sts = read_stsb(cfg["eval_sts_file"]) if cfg["eval_sts_file"] else None
    with torch.device("meta"):  # adapters are checked against the model's shapes without loading it
        meta = Transformer(model_cfg)
    for folder in cfg["init_adapter"]:
        read_adapter(folder, meta)
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    if cfg["merge_out"] and Path(cfg["merge_out"]).exists() and any(Path(cfg["merge_out"]).iterdir()):
        raise UserError(f"--merge_out {cfg['merge_out']}: exists and is not empty")
    ours = [p for p in out.glob("*") if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or
            p.name in ("final", "log.jsonl", "train_config.json")] if out.is_dir() else []
    ckpt = None
    if cfg["resume"]:
        ckpt = latest_intact_checkpoint(out, meta)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out}")
        saved = read_json(ckpt / "train_config.json")
        changed = sorted(k for k in DEFAULTS if k not in RESUMABLE and saved.get(k, DEFAULTS[k]) != cfg[k])
        if changed:
            raise UserError(f"--resume: {ckpt} was trained with other settings: " + ", ".join(
                f"{k} {saved.get(k)!r} -> {cfg[k]!r}" for k in changed) + f" (only {', '.join(sorted(RESUMABLE))} may change)")
        step = torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
        if cfg["max_steps"] < step:
            raise UserError(f"--max_steps {cfg['max_steps']}: below the checkpoint's step {step} ({ckpt})")
    elif ours and not cfg["overwrite"]:
        raise UserError(f"--output_dir {out}: holds an earlier run ({', '.join(sorted(p.name for p in ours)[:3])}"
                        f"{', ...' if len(ours) > 3 else ''}); pass --resume true to continue it or --overwrite true")
    elif ours and get_rank() == 0:
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if not out.exists():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output_dir {out}: cannot be created ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--output_dir {out}: not writable")
    return tok, data, eval_data, sts, ckpt


def latest_intact_checkpoint(out: Path, meta_model) -> Path | None:
    """The newest checkpoint whose files all read back; damaged newer ones are reported and skipped."""
    for ckpt in sorted(out.glob("checkpoint-*"), reverse=True):
        try:
            read_json(ckpt / "train_config.json")
            read_adapter(ckpt, meta_model)
            torch.load(ckpt / "trainer_state.pt", weights_only=True)
            if (ckpt / f"rng_rank{get_rank()}.pt").is_file():
                torch.load(ckpt / f"rng_rank{get_rank()}.pt", weights_only=True)
            return ckpt
        except Exception as e:  # any damage: truncated file, bad pickle, missing file
            print(f"train.py: warning: {ckpt}: damaged, skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------- distributed, checkpoints

def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1."""
    dev = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, dev
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def all_sum(x, device) -> float:
    if not dist.is_initialized():
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_checkpoint(out: Path, step: int, model, opt, sched, cfg: dict, rank: int, world: int) -> None:
    """Write checkpoint-<step>/ via a temp dir + rename, so a kill never leaves a half-written one."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng = {"cpu": torch.get_rng_state()}  # per rank: dropout masks differ
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_adapter(model, tmp, base_model_name_or_path=cfg["model"])
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "world_size": world}, tmp / "trainer_state.pt")
        write_json(tmp / "train_config.json", cfg)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[:-cfg["keep_checkpoints"]]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(ctx, eval_data, sts) -> dict:
    """Rank 0 only (the caller holds the others at a barrier): the objective's loss on the first
    eval_batches micro-batches of eval_data, and STS Spearman x100."""
    metrics, model = {}, ctx.raw_model
    model.eval()
    try:
        if eval_data is not None:
            step, ctx.step = ctx.step, -1  # MNTP: the same masks at every evaluation
            mb, total, count = ctx.cfg["micro_batch_size"], 0.0, 0
            n = min(len(eval_data) // mb, ctx.cfg["eval_batches"])
            objective = OBJECTIVES[ctx.cfg["objective"]]
            for k in range(n):
                (inputs, terms, _), = objective.micro_batch(ctx, eval_data, list(range(k * mb, (k + 1) * mb)),
                                                            [list(range(mb))])
                with ctx.amp():
                    total += objective.loss(ctx, model, inputs, gather=False).item()
                count += terms
            ctx.step = step
            metrics["eval_loss"] = total / max(count, 1)
        if sts is not None:
            metrics["eval_sts_spearman"] = evaluate_sts(ctx.enc, *sts, show_progress=False)
    finally:
        model.train()
    return metrics


# ----------------------------------------------------------------------------- main

@dataclass
class Context:
    """What the objective functions need besides their arguments."""
    cfg: dict
    tok: Tokenizer
    enc: Encoder
    raw_model: torch.nn.Module
    device: torch.device
    amp: Callable
    mask_id: int | None
    step: int = 0


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        rank, world, device = init_distributed(cfg["device"])
        tok, data, eval_data, sts, ckpt = check_run(cfg, world)
    except (UserError, ValueError, OSError) as e:
        if "--debug" in argv:
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    train(cfg, rank, world, device, tok, data, eval_data, sts, ckpt)


def train(cfg, rank, world, device, tok, data, eval_data, sts, ckpt) -> None:
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    out = Path(cfg["output_dir"])
    accum = cfg["batch_size"] // world // cfg["micro_batch_size"]
    torch.manual_seed(cfg["seed"] + rank)

    # Model: base weights (frozen, any dtype) + merged earlier-stage adapters + a fresh LoRA.
    model = load_model(cfg["model"], dtype=cfg["weights_dtype"], device=device, is_causal=cfg["is_causal"],
                       attention_dropout=cfg["attention_dropout"])
    for adapter in cfg["init_adapter"]:
        load_adapter(model, adapter, merge=True)
    if ckpt is not None:  # the checkpoint's LoRA weights, exactly as saved (float32)
        load_adapter(model, ckpt, merge=False)
    else:
        add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                 targets=tuple(cfg["lora_targets"]), layers=cfg["lora_layers"] or None)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = DDP(model) if world > 1 else model
    if cfg["compile"]:
        fwd = torch.compile(fwd)
    autocast = resolve_autocast(cfg["autocast"], device)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    enc = Encoder(model, tok, pooling=cfg["pooling"], max_length=cfg["max_seq_length"], prompt=cfg["prompt"] or None,
                  autocast=autocast)
    mask_id = mask_token_id(tok, cfg["mask_token"]) if cfg["objective"] == "mntp" else None
    ctx = Context(cfg, tok, enc, model, device, amp, mask_id)
    objective = OBJECTIVES[cfg["objective"]]

    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def lr_lambda(step):  # linear warmup, then linear decay to 0 at max_steps
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        return max(0.0, (cfg["max_steps"] - step) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    step, log_path = 0, out / "log.jsonl"
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        if state["world_size"] != world:
            print0(f"note: resuming a {state['world_size']}-rank run on {world} rank(s); dropout draws differ")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True) if (ckpt / f"rng_rank{rank}.pt").is_file() else {}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        if master and log_path.is_file():  # drop the records written after the checkpoint
            keep = [ln for ln in log_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step
                    and json.loads(ln).get("event") != "end"]
            log_path.write_text("".join(ln + "\n" for ln in keep))
        print0(f"resumed from {ckpt} at step {step}")
    if master:
        write_json(out / "train_config.json", cfg)

    def log(rec: dict) -> None:
        if master:
            line = json.dumps(rec, allow_nan=False, default=str)
            (bar.write if bar else print)(line)
            with open(log_path, "a") as f:
                f.write(line + "\n")

    def run_eval(step: int) -> dict:
        metrics = {}
        if master:
            try:
                metrics = evaluate(ctx, eval_data, sts)
            except Exception as e:  # never lose the run to an evaluation failure
                metrics = {"eval_error": f"{type(e).__name__}: {e}"}
        barrier()
        return {"step": step, **metrics}

    bar = None
    last_step = min(cfg["max_steps"], cfg["stop_after_n_steps"] or cfg["max_steps"])
    if master and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=last_step, initial=step, desc=cfg["objective"], file=sys.stderr, dynamic_ncols=True, disable=None)
    print0(json.dumps({"event": "start", "objective": cfg["objective"], "world_size": world, "accum": accum,
                       "train_examples": len(data), "trainable_params": sum(p.numel() for p in params),
                       "device": str(device), "autocast": str(autocast)}))

    # Global batches depend on (seed, epoch) only, never on the world size; see micro_batch_positions.
    # Supervised triples may name their source dataset: then each global batch comes from one.
    groups = [r.get("dataset", "") for r in data] if cfg["objective"] == "supervised" else None
    steps_per_epoch = len(list(batches(len(data), cfg["batch_size"], seed=cfg["seed"], groups=groups)))
    positions = micro_batch_positions(cfg["batch_size"], cfg["micro_batch_size"], rank, world)
    epoch_batches, t0, start_step = None, time.time(), step
    loss_acc, tokens, since = torch.zeros((), device=device), 0, 0  # summed on the device: no sync per step
    while step < last_step:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or epoch_batches is None:
            epoch_batches = list(batches(len(data), cfg["batch_size"], seed=cfg["seed"], epoch=epoch, groups=groups))
        ctx.step = step
        micro = objective.micro_batch(ctx, data, epoch_batches[within], positions)
        # MNTP: normalise by the masked-token count of the whole global batch (all micro-batches, all
        # ranks), since micro-batches hold different counts; contrastive: by the number of micro-batches.
        # DDP averages gradients over ranks, so the count is divided by the world size.
        norm = all_sum(sum(terms for _, terms, _ in micro), device) / world
        lr = sched.get_last_lr()[0]
        for i, (inputs, _, n_tokens) in enumerate(micro):
            sync = i == len(micro) - 1
            with fwd.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with amp():
                    loss = objective.loss(ctx, fwd, inputs, gather=True) / norm
                loss.backward()
            loss_acc += loss.detach()
            tokens += n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]) if cfg["grad_clip"] > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, since = step + 1, since + 1
        if bar:
            bar.update(1)
        if step % cfg["log_every"] == 0 or step == last_step or step == 1:
            # The loss is the mean over the steps since the last line, of each step's global-batch mean.
            elapsed = time.time() - t0
            log({"step": step, "loss": round(all_sum(loss_acc, device) / world / since, 6), "lr": lr,
                 "grad_norm": None if grad_norm is None else round(grad_norm.item(), 4),
                 "tokens_per_s": round(all_sum(tokens, device) / elapsed, 1),
                 "s_per_step": round(elapsed / (step - start_step), 3)})
            loss_acc.zero_()
            since = 0
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            log(run_eval(step))
        if cfg["save_every"] and step % cfg["save_every"] == 0 and step < last_step:
            save_checkpoint(out, step, model, opt, sched, cfg, rank, world)
    if bar:
        bar.close()

    final_metrics = {}
    if (eval_data is not None or sts is not None) and not (cfg["eval_every"] and step % cfg["eval_every"] == 0):
        final_metrics = run_eval(step)
    if master:
        final = out / "final"
        save_adapter(model, final, base_model_name_or_path=cfg["model"])
        write_json(final / "llm2vec_config.json", {"pooling_mode": cfg["pooling"], "max_length": 512,
                                                   "doc_max_length": 400, "skip_instruction": True})
        write_json(final / "train_config.json", cfg)
        log({"event": "end", **final_metrics, "step": step, "seconds": round(time.time() - t0, 1)})
        if cfg["merge_out"]:
            merge_lora(model)
            save_model(model, cfg["merge_out"], dtype=cfg["weights_dtype"])
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                if (Path(cfg["model"]) / name).is_file():
                    shutil.copy(Path(cfg["model"]) / name, Path(cfg["merge_out"]) / name)
            print0(f"merged model written to {cfg['merge_out']}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
