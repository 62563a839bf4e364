"""One training loop for the LLM2Vec stages: MNTP, unsupervised SimCSE, supervised contrastive, and
CoSENT on graded pairs (a last supervised stage on similarity scores; not in llm2vec).

    python train.py --objective mntp --config configs/mntp/smollm2-135m.json
    torchrun --nproc_per_node 2 train.py --objective mntp --config configs/mntp/smollm2-135m.json
    python train.py --objective simcse --config configs/simcse/smollm2-135m.json --init_adapter runs/mntp-smollm2/final
    python train.py --objective mntp --model DIR --train_file wiki.txt --max_steps 10 --lr 1e-4  # any key: --key value

Everything is visible here: config and checks, DDP setup, the step loop with gradient accumulation under
`no_sync`, autocast, clipping, logging, evaluation and checkpoints. `OBJECTIVES` is the one place that
differs per objective: how a file becomes examples, examples a micro-batch, a micro-batch a loss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from eval import evaluate_sts, fail, read_stsb
from l2v.checkpoint import load_config, load_model, meta_model, read_json, resolve_autocast, resolve_device, save_model
from l2v.data import (PAIR_FIELDS, batches, mask_token_id, mask_tokens, micro_batch_positions, mntp_blocks, read_examples,
                      read_texts)
from l2v.encoder import POOLING_MODES, Encoder
from l2v.lora import add_lora, load_adapter, merge_lora, read_adapter, save_adapter
from l2v.objectives import all_gather_with_grad, contrastive_loss, cosent_loss, mntp_loss, num_targets

CHECKS = {">=0": lambda v: v >= 0, ">0": lambda v: v > 0, ">=1": lambda v: v >= 1, ">=2": lambda v: v >= 2,
          "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1)": lambda v: 0 < v < 1}
# key: (default, help, check: a CHECKS name or a tuple of choices). A --key value takes its default's type.
OPTIONS = {
    "objective": ("mntp", "the training objective", ("mntp", "simcse", "supervised", "cosent")),
    "model": ("models/smollm2-135m-instruct", "HF model folder (config.json, safetensors, tokenizer.json)", None),
    "train_file": ("", "MNTP/SimCSE: .txt/.raw (a text per line), .json/.jsonl; supervised: triples; cosent: scored pairs", None),
    "eval_file": ("", "held-out examples like train_file's: the objective's loss at each evaluation", None),
    "eval_sts_file": ("", "STS-B style dev file: Spearman x100 at each evaluation", None),
    "output_dir": ("runs/run", "checkpoints, final/, log.jsonl; must hold no earlier run (see resume, overwrite)", None),
    "init_adapter": ([], "adapters merged into the base first (e.g. MNTP's, before SimCSE)", None),
    "is_causal": (False, "keep causal attention (LLM2Vec trains bidirectional)", None),
    "device": ("auto", "auto (CUDA when available) | cpu | cuda | cuda:N; torchrun: cuda:LOCAL_RANK", None),
    "max_steps": (1000, "optimizer steps; the linear schedule ends here", ">=1"),
    "stop_after_n_steps": (0, "stop early, keeping max_steps' schedule (0 = off)", ">=0"),
    "batch_size": (32, "global batch: examples per step over ranks and accumulation", ">=1"),
    "micro_batch_size": (0, "examples per rank per forward (0 = batch_size / ranks)", ">=0"),
    "lr": (5e-5, "peak learning rate (AdamW)", ">0"),
    "warmup_steps": (0, "linear warmup steps", ">=0"),
    "weight_decay": (0.0, "AdamW weight decay", ">=0"),
    "grad_clip": (1.0, "max gradient norm (0 = off)", ">=0"),
    "seed": (42, "data order, masks, LoRA init, dropout", None),
    "lora_r": (16, "LoRA rank", ">=1"),
    "lora_alpha": (32.0, "LoRA alpha (scaling alpha / r)", ">0"),
    "lora_dropout": (0.05, "dropout on the LoRA input", "in [0, 1)"),
    "lora_targets": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "LoRA projections", None),
    "lora_layers": ([], "layer numbers that get LoRA (empty = all); the backward stops below the lowest", None),
    "max_seq_length": (512, "MNTP block length; contrastive: tokens per text", ">=2"),
    "mask_probability": (0.2, "MNTP: share of tokens masked", "in (0, 1)"),
    "mask_token": ("auto", "MNTP mask token: auto = the tokenizer's own (Gemma's <mask>) else '_' (upstream)",
                   ("auto", "blank", "eos")),
    "mask_mode": ("80_10_10", "MNTP masking", ("80_10_10", "all_mask")),
    "attention_dropout": (0.0, "attention dropout (SimCSE: 0.3)", "in [0, 1)"),
    "pooling": ("mean", "contrastive pooling", POOLING_MODES),
    "prompt": ("", "contrastive: template around each text with one {text} slot (e.g. PromptEOL)", None),
    "instruction": ("", "SimCSE, cosent: instruction before each text (supervised: the triples' own)", None),
    "scale": (20.0, "contrastive: cosine x scale (20 SimCSE and cosent, 50 supervised)", ">0"),
    "weights_dtype": ("float32", "frozen base weights (LoRA weights stay float32)", ("float32", "bfloat16")),
    "autocast": ("auto", "matmul dtype; auto: bf16 where fast (GPUs, AVX512-BF16/AMX CPUs)", ("auto", "bfloat16", "float16", "none")),
    "gradient_checkpointing": (False, "recompute layers in the backward: less memory, more time", None),
    "compile": (False, "torch.compile the model", None),
    "log_every": (10, "steps between log lines (mean loss since the last one)", ">=1"),
    "eval_every": (0, "steps between evaluations (0 = at the end only)", ">=0"),
    "eval_batches": (8, "micro-batches of eval_file per evaluation", ">=1"),
    "save_every": (0, "steps between checkpoints (0 = only final/)", ">=0"),
    "keep_checkpoints": (2, "newest checkpoints kept", ">=1"),
    "resume": (False, "continue from the newest intact checkpoint in output_dir", None),
    "overwrite": (False, "delete an earlier run's files in output_dir first", None),
    "merge_out": ("", "also write a merged HF folder (base + init adapters + this LoRA)", None),
    "progress": (True, "progress bar (when stderr is a terminal)", None),
}
DEFAULTS = {k: v[0] for k, v in OPTIONS.items()}
OBJECTIVE_DEFAULTS = {"mntp": dict(lr=5e-5, max_seq_length=512, batch_size=32),
                      "simcse": dict(lr=3e-5, max_seq_length=128, batch_size=128, attention_dropout=0.3, scale=20.0),
                      "supervised": dict(lr=2e-4, max_seq_length=512, batch_size=64, warmup_steps=300, scale=50.0),
                      "cosent": dict(lr=5e-5, max_seq_length=512, batch_size=32, scale=20.0)}
# What may differ when resuming; any other change would silently train something else.
RESUMABLE = {"output_dir", "max_steps", "stop_after_n_steps", "device", "log_every", "eval_every", "eval_batches",
             "eval_file", "eval_sts_file", "save_every", "keep_checkpoints", "resume", "overwrite", "merge_out",
             "progress", "compile", "gradient_checkpointing"}


class UserError(Exception):
    """A mistake in the command line, a config or a file: one line, no traceback."""


def parse_config(argv: list[str]) -> dict:
    """defaults < objective defaults < --config JSON < --key value; every value checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail("train.py", f"{message} (see --help)")  # one line, no usage block
    p.add_argument("--config", help="JSON file of the keys below")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    for key, (value, text, _) in OPTIONS.items():
        p.add_argument(f"--{key}", metavar=type(value).__name__.upper(), help=f"{text} (default: {json.dumps(value)})")
    args = p.parse_args(argv)
    file_cfg = read_json(args.config) if args.config else {}
    if not isinstance(file_cfg, dict):
        raise UserError(f"{args.config}: expected a JSON object of config keys")
    file_cfg.pop("_comment", None)
    if set(file_cfg) - set(DEFAULTS):
        raise UserError(f"{args.config}: unknown config key(s) {sorted(set(file_cfg) - set(DEFAULTS))}")
    flags = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    for key, raw in flags.items():  # a command-line string -> the type of the key's default
        default = DEFAULTS[key]
        try:
            if isinstance(default, bool):
                flags[key] = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[raw.lower()]
            elif isinstance(default, list):
                flags[key] = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
                flags[key] = [int(v) for v in flags[key]] if key == "lora_layers" else flags[key]
            else:
                flags[key] = type(default)(raw)
        except (ValueError, KeyError):
            raise UserError(f"--{key}: cannot read {raw!r} as {type(default).__name__}") from None
    objective = flags.get("objective", file_cfg.get("objective", "mntp"))
    cfg = {**DEFAULTS, **OBJECTIVE_DEFAULTS.get(objective, {}), **file_cfg, **flags}
    for key, value in cfg.items():
        where, default, check = f"--{key}" if key in flags else f"{args.config}: {key}", DEFAULTS[key], OPTIONS[key][2]
        want = (int, float) if type(default) is float else type(default)
        if not isinstance(value, want) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise UserError(f"{where}: expected a {type(default).__name__}, got {value!r}")
        if isinstance(check, tuple) and value not in check:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(check)}")
        if isinstance(check, str) and not CHECKS[check](value):
            raise UserError(f"{where}: must be {check}, got {value}")
    if cfg["prompt"] and cfg["prompt"].count("{text}") != 1:
        raise UserError("--prompt: needs exactly one {text} slot")
    if cfg["resume"] and cfg["overwrite"]:
        raise UserError("--resume, --overwrite: choose one")
    return cfg


# ----------------------------------------------------------------------------- objectives
# Each micro-batch maker returns, per micro-batch of this rank, (model inputs, loss terms, tokens).

def mntp_micro_batches(ctx, data, global_idx, positions):
    """Mask the whole global batch with a generator seeded by (seed, step), then take this rank's rows:
    any world size or accumulation split sees the masks one process would, and resume is exact."""
    g = torch.Generator().manual_seed(ctx["cfg"]["seed"] * 1_000_003 + ctx["step"])
    ids, labels = mask_tokens(data[global_idx], mask_id=ctx["mask_id"], special_ids=ctx["tok"].special_ids,
                              vocab_size=ctx["tok"].vocab_size, probability=ctx["cfg"]["mask_probability"],
                              mode=ctx["cfg"]["mask_mode"], generator=g)
    return [((ids[p], labels[p]), int(num_targets(labels[p])), ids[p].numel()) for p in positions]


def contrastive_micro_batches(ctx, data, global_idx, positions):
    """Each micro-batch is packed into one Batch (`Encoder.batches`): SimCSE lists every sentence twice
    (dropout makes the copies differ); supervised lists queries, positives, then negatives; cosent the
    first, then the second texts of its pairs, whose gold scores travel beside the Batch."""
    out, enc, cfg = [], ctx["enc"], ctx["cfg"]
    for pos in positions:
        rows = [data[global_idx[p]] for p in pos]
        if cfg["objective"] == "simcse":  # the two views are the same texts: tokenize them once
            prepared = enc.prepare_inputs([(cfg["instruction"], t) for t in rows]) * 2
        elif cfg["objective"] == "cosent":  # a symmetric task: both sides get the instruction, as in evaluation
            prepared = enc.prepare_inputs([(r["instruction"] or cfg["instruction"], r[k]) for k in PAIR_FIELDS for r in rows])
        else:  # upstream: the instruction goes with the query only, and pooling skips its tokens
            prepared = enc.prepare_inputs([(r["instruction"], r["query"]) for r in rows] + [r["positive"] for r in rows] +
                                          [r["negative"] for r in rows])
        batch, = enc.batches(prepared)
        scores = torch.tensor([float(r["score"]) for r in rows]) if cfg["objective"] == "cosent" else None
        out.append(((batch, scores), 1, int((batch.segments > 0).sum())))
    return out


def mntp_step_loss(ctx, model, inputs, gather):
    ids, labels = (t.to(ctx["device"]) for t in inputs)
    return mntp_loss(model(ids), labels, ctx["model"].lm_head_weight, normalizer=1.0,
                     logit_softcap=ctx["model"].config.final_softcap)


def contrastive_step_loss(ctx, model, inputs, gather):
    """Embeddings (and scores) are gathered from every rank with gradient: the negatives (cosent: the
    pairs ranked against each other) are the global micro-batch, and every rank computes the same
    global loss. Evaluation runs on one rank: no gathering."""
    (batch, scores), objective = inputs, ctx["cfg"]["objective"]
    views = ctx["enc"].embed(batch, model).chunk(3 if objective == "supervised" else 2)
    views = [all_gather_with_grad(v) for v in views] if gather else views
    if objective == "cosent":
        return cosent_loss(*views, all_gather_with_grad(scores.to(views[0].device)) if gather else scores,
                           scale=ctx["cfg"]["scale"])
    return contrastive_loss(*views, scale=ctx["cfg"]["scale"])


OBJECTIVES = {  # name: (file -> examples, micro-batch maker, loss)
    "mntp": (lambda cfg, tok, path: mntp_blocks(tok, read_texts(path), cfg["max_seq_length"]),
             mntp_micro_batches, mntp_step_loss),
    "simcse": (lambda cfg, tok, path: read_texts(path), contrastive_micro_batches, contrastive_step_loss),
    "supervised": (lambda cfg, tok, path: read_examples(path), contrastive_micro_batches, contrastive_step_loss),
    "cosent": (lambda cfg, tok, path: read_examples(path, PAIR_FIELDS), contrastive_micro_batches, contrastive_step_loss),
}


# ----------------------------------------------------------------------------- checks before any work

def check_run(cfg: dict, world: int):
    """Read or check every file the run needs before the model loads: (tokenizer, data, eval data,
    STS dev data, checkpoint to resume from or None)."""
    from l2v.tokenizer import Tokenizer
    mb = cfg["micro_batch_size"] = cfg["micro_batch_size"] or cfg["batch_size"] // world
    if cfg["batch_size"] % world or (cfg["batch_size"] // world) % mb:
        raise UserError(f"--batch_size {cfg['batch_size']}: must split over {world} rank(s) x micro_batch_size {mb}")
    if not cfg["train_file"]:
        raise UserError("--train_file: required (a .txt, .raw, .json or .jsonl file)")
    if cfg["eval_every"] and not (cfg["eval_file"] or cfg["eval_sts_file"]):
        raise UserError("--eval_every: needs --eval_file or --eval_sts_file")
    model_cfg, tok = load_config(cfg["model"]), Tokenizer(cfg["model"])
    read = OBJECTIVES[cfg["objective"]][0]
    data = read(cfg, tok, cfg["train_file"])
    groups = [r.get("dataset", "") for r in data] if cfg["objective"] == "supervised" else None
    if not batches(len(data), cfg["batch_size"], seed=0, groups=groups):
        raise UserError(f"{cfg['train_file']}: {len(data)} examples, not one batch of {cfg['batch_size']} (per dataset)")
    eval_data = read(cfg, tok, cfg["eval_file"]) if cfg["eval_file"] else None
    if eval_data is not None and len(eval_data) < mb:
        raise UserError(f"{cfg['eval_file']}: {len(eval_data)} examples, fewer than one micro-batch of {mb}")
    sts = read_stsb(cfg["eval_sts_file"]) if cfg["eval_sts_file"] else None
    meta = meta_model(model_cfg)  # shapes are checked on a model that holds no weights
    for folder in cfg["init_adapter"]:
        read_adapter(folder, meta)
    try:
        with torch.device("meta"):
            add_lora(meta_model(model_cfg), r=cfg["lora_r"], targets=cfg["lora_targets"], layers=cfg["lora_layers"] or None)
    except ValueError as e:
        raise UserError(f"--lora_targets / --lora_layers: {e}") from None
    out, merge_out = Path(cfg["output_dir"]), Path(cfg["merge_out"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    if cfg["merge_out"] and merge_out.exists() and any(merge_out.iterdir()):
        raise UserError(f"--merge_out {merge_out}: exists and is not empty")
    present = sorted(p for p in out.iterdir() if not p.name.startswith(".write-test")) if out.is_dir() else []
    ours = [p for p in present if p.name.startswith(("checkpoint-", ".tmp-checkpoint-"))
            or p.name in ("final", "log.jsonl", "train_config.json")]
    ckpt = None
    if cfg["resume"]:
        ckpt, damaged = latest_intact_checkpoint(out, meta)
        if ckpt is None:
            raise UserError(f"--resume: no intact checkpoint in {out}" + (f" ({'; '.join(damaged)})" if damaged else ""))
        for d in damaged:
            print(f"train.py: warning: {d}", file=sys.stderr)
        saved = read_json(ckpt / "train_config.json")
        changed = [k for k in DEFAULTS if k not in RESUMABLE and saved.get(k, DEFAULTS[k]) != cfg[k]]
        if changed:
            raise UserError(f"--resume: {ckpt} was trained with other settings: " + ", ".join(
                f"{k} {saved.get(k)!r} -> {cfg[k]!r}" for k in changed) + f" (only {', '.join(sorted(RESUMABLE))} may change)")
        step = torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
        if cfg["max_steps"] < step:
            raise UserError(f"--max_steps {cfg['max_steps']}: below the checkpoint's step {step} ({ckpt})")
    elif present and not cfg["overwrite"]:
        what = "holds an earlier run" if ours else "is not empty"
        raise UserError(f"--output_dir {out}: {what} ({', '.join(p.name for p in present[:3])}{', ...' * (len(present) > 3)})"
                        "; pass --resume true to continue a run or --overwrite true (deletes only a run's files)")
    elif ours and int(os.environ.get("RANK", 0)) == 0:
        for p in ours:  # --overwrite: the earlier run's files only; anything else in the folder stays
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.environ.get('RANK', 0)}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_dir {out}: not writable ({e.strerror})") from None
    return tok, data, eval_data, sts, ckpt


def latest_intact_checkpoint(out: Path, meta_model) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all read back, and what is wrong with the newer, damaged ones."""
    damaged = []
    for ckpt in sorted(out.glob("checkpoint-*"), reverse=True):
        try:
            read_json(ckpt / "train_config.json")
            read_adapter(ckpt, meta_model)
            for f in ["trainer_state.pt"] + [f.name for f in ckpt.glob("rng_rank*.pt")]:
                torch.load(ckpt / f, weights_only=True)
            return ckpt, damaged
        except Exception as e:  # any damage: truncated file, bad pickle, missing file
            damaged.append(f"{ckpt}: damaged, skipped ({type(e).__name__}: {str(e)[:200]})")
    return None, damaged


# ----------------------------------------------------------------------------- distributed, checkpoints

def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1."""
    dev = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def all_sum(x, device, item: bool = True):
    """Sum over ranks; as a Python float (a host synchronisation: log steps only) or a device tensor."""
    if not dist.is_initialized():
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item() if item else t.float()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_encoder_settings(folder: Path, cfg: dict) -> None:
    """What `Encoder.from_pretrained` reads from an adapter folder: upstream's file and the resolved config."""
    write_json(folder / "llm2vec_config.json", {"pooling_mode": cfg["pooling"], "max_length": 512,
                                                "doc_max_length": 400, "skip_instruction": True})
    write_json(folder / "train_config.json", cfg)


def save_checkpoint(out: Path, step: int, model, opt, sched, cfg: dict, rank: int, world: int) -> None:
    """Write checkpoint-<step>/ via a temp dir + rename, so a kill never leaves a half-written one."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")  # per rank: dropout masks differ
    if rank == 0:
        save_adapter(model, tmp, base_model_name_or_path=cfg["model"])
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "world_size": world},
                   tmp / "trainer_state.pt")
        write_encoder_settings(tmp, cfg)  # a checkpoint encodes like final/: pooling, prompt, attention
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[:-cfg["keep_checkpoints"]]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


@torch.no_grad()
def evaluate(ctx, eval_data, sts) -> dict:
    """On rank 0: the objective's loss on the first eval_batches micro-batches of eval_data (the same
    MNTP masks every time), and STS Spearman x100. A failure is reported, never fatal to the run."""
    metrics, model, cfg = {}, ctx["model"], ctx["cfg"]
    _, make, loss_fn = OBJECTIVES[cfg["objective"]]
    model.eval()
    try:
        if eval_data is not None:
            mb, total, count = cfg["micro_batch_size"], 0.0, 0
            for k in range(min(len(eval_data) // mb, cfg["eval_batches"])):
                (inputs, terms, _), = make({**ctx, "step": -1}, eval_data, list(range(k * mb, (k + 1) * mb)), [list(range(mb))])
                with ctx["amp"]():
                    total, count = total + loss_fn(ctx, model, inputs, gather=False).item(), count + terms
            metrics["eval_loss"] = total / max(count, 1)
        if sts is not None:
            metrics["eval_sts_spearman"] = evaluate_sts(ctx["enc"], *sts, show_progress=False)
    except Exception as e:  # never lose the run to an evaluation failure
        metrics["eval_error"] = f"{type(e).__name__}: {e}"
    model.train()
    return metrics


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        rank, world, device = init_distributed(cfg["device"])
        tok, data, eval_data, sts, ckpt = check_run(cfg, world)
    except (UserError, ValueError, OSError) as e:
        fail("train.py", e, "--debug" in argv)
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    master, out = rank == 0, Path(cfg["output_dir"])
    print0 = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg["seed"] + rank)

    # Model: frozen base weights (any dtype) + merged earlier-stage adapters + a fresh (or resumed) LoRA.
    model = load_model(cfg["model"], dtype=cfg["weights_dtype"], device=device, is_causal=cfg["is_causal"],
                       attention_dropout=cfg["attention_dropout"])
    for adapter in cfg["init_adapter"]:
        load_adapter(model, adapter, merge=True)
    if ckpt is not None:
        load_adapter(model, ckpt, merge=False)
    else:
        add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                 targets=tuple(cfg["lora_targets"]), layers=cfg["lora_layers"] or None)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = DDP(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg["compile"] else fwd
    autocast = resolve_autocast(cfg["autocast"], device)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    enc = Encoder(model, tok, pooling=cfg["pooling"], max_length=cfg["max_seq_length"], prompt=cfg["prompt"] or None,
                  autocast=autocast)
    ctx = dict(cfg=cfg, tok=tok, enc=enc, model=model, device=device, amp=amp, step=0,
               mask_id=mask_token_id(tok, cfg["mask_token"]) if cfg["objective"] == "mntp" else None)
    _, make_micro_batches, step_loss = OBJECTIVES[cfg["objective"]]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm, total = cfg["warmup_steps"], cfg["max_steps"]  # linear warmup, then linear decay to 0 at max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))

    step, log_path = 0, out / "log.jsonl"
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True) if (ckpt / f"rng_rank{rank}.pt").is_file() else {}
        torch.set_rng_state(rng.get("cpu", torch.get_rng_state()))
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        if master and log_path.is_file():  # keep the log's records up to the checkpoint only
            recs = [json.loads(ln) for ln in log_path.read_text().splitlines()]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in recs if r.get("step", 0) <= step and "event" not in r))
        print0(f"resumed from {ckpt} at step {step}" + (f" (was {state['world_size']} ranks)" if state["world_size"] != world else ""))
    if master:
        write_json(out / "train_config.json", cfg)
    last_step = min(total, cfg["stop_after_n_steps"] or total)
    bar = None
    if master and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=last_step, initial=step, desc=cfg["objective"], file=sys.stderr, dynamic_ncols=True, disable=None)

    def log(rec: dict) -> None:
        if master:
            line = json.dumps(rec, default=str)
            (bar.write if bar else print)(line)
            with open(log_path, "a") as f:
                f.write(line + "\n")

    def run_eval() -> dict:
        metrics = evaluate(ctx, eval_data, sts) if master else {}
        barrier()  # the other ranks wait: evaluation has no collectives
        return {"step": step, **metrics}

    print0(json.dumps({"event": "start", "objective": cfg["objective"], "world_size": world, "train_examples": len(data),
                       "accum": cfg["batch_size"] // world // cfg["micro_batch_size"],
                       "trainable_params": sum(p.numel() for p in params), "device": str(device), "autocast": str(autocast)}))
    # Global batches depend on (seed, epoch) only, never on the world size (see micro_batch_positions).
    # Supervised triples may name their source dataset: then each global batch comes from one.
    groups = [r.get("dataset", "") for r in data] if cfg["objective"] == "supervised" else None
    positions = micro_batch_positions(cfg["batch_size"], cfg["micro_batch_size"], rank, world)
    steps_per_epoch = len(batches(len(data), cfg["batch_size"], seed=cfg["seed"], groups=groups))
    epoch_batches, t0, start_step = None, time.time(), step
    loss_sum, tokens, since = torch.zeros((), device=device), 0, 0  # summed on the device: no sync per step
    while step < last_step:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or epoch_batches is None:
            epoch_batches = batches(len(data), cfg["batch_size"], seed=cfg["seed"], epoch=epoch, groups=groups)
        ctx["step"] = step
        micro = make_micro_batches(ctx, data, epoch_batches[within], positions)
        # Normalise by the loss terms of the whole global batch (MNTP: masked tokens, which micro-batches
        # hold in different numbers; contrastive: micro-batches); DDP averages over ranks: divide by world.
        norm = all_sum(sum(terms for _, terms, _ in micro), device, item=False) / world
        lr = sched.get_last_lr()[0]
        for i, (inputs, _, n_tokens) in enumerate(micro):
            with fwd.no_sync() if world > 1 and i < len(micro) - 1 else contextlib.nullcontext():
                with amp():
                    loss = step_loss(ctx, fwd, inputs, gather=True) / norm
                loss.backward()
            loss_sum += loss.detach()
            tokens += n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]) if cfg["grad_clip"] > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, since = step + 1, since + 1
        if bar:
            bar.update(1)
        if step % cfg["log_every"] == 0 or step == last_step or step == 1:
            elapsed = time.time() - t0
            log({"step": step, "loss": round(all_sum(loss_sum, device) / world / since, 6), "lr": lr,
                 "grad_norm": None if grad_norm is None else round(grad_norm.item(), 4),
                 "tokens_per_s": round(all_sum(tokens, device) / elapsed, 1), "s_per_step": round(elapsed / (step - start_step), 3)})
            loss_sum.zero_()
            since = 0
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            log(run_eval())
        if cfg["save_every"] and step % cfg["save_every"] == 0 and step < last_step:
            save_checkpoint(out, step, model, opt, sched, cfg, rank, world)
    if bar:
        bar.close()

    evaluated = cfg["eval_every"] and step % cfg["eval_every"] == 0
    final_metrics = run_eval() if (eval_data is not None or sts is not None) and not evaluated else {}
    if master:
        save_adapter(model, out / "final", base_model_name_or_path=cfg["model"])
        write_encoder_settings(out / "final", cfg)
        log({"event": "end", **final_metrics, "step": step, "seconds": round(time.time() - t0, 1)})
        if cfg["merge_out"]:
            save_model(merge_lora(model), cfg["merge_out"], dtype=cfg["weights_dtype"])
            # The tokenizer, and this run's encoding settings (pooling, prompt, attention) for `Encoder`
            for f in [Path(cfg["model"]) / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json")] + [out / "final" / n for n in ("llm2vec_config.json", "train_config.json")]:
                if f.is_file():
                    shutil.copy(f, Path(cfg["merge_out"]) / f.name)
            print0(f"merged model written to {cfg['merge_out']}")
    if dist.is_initialized():
        # DDP's reducer holds the process group. Freed after destroy_process_group (when main returns),
        # it would drop the group's last reference in a destructor that keeps the GIL while joining
        # gloo's worker threads, which may need the GIL: a hang at exit. So free it first.
        del fwd
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
