"""One training loop for the LLM2Vec stages: MNTP, unsupervised SimCSE, supervised contrastive, and CoSENT
on graded pairs (a last supervised stage on similarity scores; not in llm2vec).

    python train.py                               # the MNTP demo preset on the demo model (needs ../shared)
    torchrun --nproc_per_node 2 train.py --objective mntp --config configs/mntp/smollm2-135m.json
    python train.py --config configs/simcse/smollm2-135m.json --init_adapter runs/mntp-smollm2/final
    python train.py --model DIR --train_file wiki.txt --max_steps 10 --lr 1e-4  # any key: --key value

Top to bottom: check the run (it reads every file and writes none), prepare the output folder (the only
place that deletes or creates), load the model, resume, then the loop: the objective's micro-batches and
backward (accumulation under `no_sync`, or cached contrastive gradients), clipping, logging, evaluation,
checkpoints. The objective (`l2v/objectives.py`) is what differs between stages; the keys and their
checks are in `l2v/config.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from l2v.adapters import load_adapter, read_adapter, save_adapter, save_merged
from l2v.checkpoint import check_weights, load_config, load_model, meta_model, resolve_autocast
from l2v.cli import USER_ERRORS, UserError, fail
from l2v.config import TrainConfig, parse_config
from l2v.data import batches, micro_batch_positions
from l2v.distributed import all_sum, barrier, init_distributed
from l2v.encoder import Encoder
from l2v.evaluation import evaluate_sts, read_stsb
from l2v.files import append_line, folder_write, save_torch, write_json, write_text
from l2v.lora import add_lora
from l2v.objectives import OBJECTIVES, Objective
from l2v.runs import check_paths, data_identity, log_until, resumable_checkpoint
from l2v.settings import write_settings
from l2v.tokenizer import Tokenizer

RUN_FILES = ("final", "log.jsonl", "train_config.json")  # and checkpoint-*, .tmp-*: what --overwrite deletes


@dataclass
class Run:
    """What checking the run found."""

    objective: Objective
    tokenizer: Tokenizer
    data: object
    groups: list | None  # one label per example when global batches are grouped (supervised: dataset)
    eval_data: object
    sts: tuple | None
    ckpt: Path | None  # to resume from
    data_id: dict  # recorded in checkpoints: resuming on other data is refused
    present: list[str]  # the output folder's entries as checked
    earlier: list[Path]  # an earlier run's files, which --overwrite deletes


def check_run(cfg: TrainConfig) -> Run:
    """Read or check every file the run needs before the model loads; nothing is written."""
    mb, out = cfg.micro_batch_size, Path(cfg.output_dir)
    model_cfg = load_config(cfg.model)
    tok = Tokenizer(cfg.model, model_cfg.vocab_size)
    objective = OBJECTIVES[cfg.objective](cfg, tok)
    data = objective.load(cfg.train_file)
    groups = [r.get(objective.group_field, "") for r in data] if objective.group_field else None
    if not batches(len(data), cfg.batch_size, seed=0, groups=groups):
        raise UserError(
            f"{cfg.train_file}: {len(data)} examples, not one batch of --batch_size {cfg.batch_size}"
            + " (by group)" * bool(groups)
        )
    eval_data = objective.load(cfg.eval_file) if cfg.eval_file else None
    if eval_data is not None and len(eval_data) < mb:
        raise UserError(f"{cfg.eval_file}: {len(eval_data)} examples, fewer than one micro-batch of {mb}")
    sts = read_stsb(cfg.eval_sts_file) if cfg.eval_sts_file else None
    meta = meta_model(model_cfg)  # shapes are checked on a model that holds no weights
    check_weights(cfg.model, meta)
    if objective.needs_lm_head and not model_cfg.has_lm_head:
        raise UserError(f"--model {cfg.model}: no lm_head.weight, which --objective {cfg.objective} needs")
    for folder in cfg.init_adapter:
        read_adapter(folder, meta)
    try:
        add_lora(
            meta_model(model_cfg), r=cfg.lora_r, targets=cfg.lora_targets, layers=cfg.lora_layers or None
        )
    except ValueError as e:
        raise UserError(f"--lora_targets / --lora_layers: {e}") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    present = sorted(p for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    earlier = [p for p in present if p.name.startswith(("checkpoint-", ".tmp-")) or p.name in RUN_FILES]
    check_paths(cfg, [*earlier, out / "final"])  # what this run rewrites
    ckpt, data_id = None, data_identity(cfg.train_file)
    if cfg.resume:
        ckpt = resumable_checkpoint(cfg, out, meta, data_id)
    elif present and not cfg.overwrite:
        names = ", ".join(p.name for p in present[:3]) + ", ..." * (len(present) > 3)
        what = "holds an earlier run" if earlier else "is not empty"
        raise UserError(
            f"--output_dir {out}: {what} ({names}); pass --resume true to continue a run or "
            "--overwrite true (deletes only a run's files)"
        )
    earlier, present = earlier if cfg.overwrite else [], [p.name for p in present]
    return Run(objective, tok, data, groups, eval_data, sts, ckpt, data_id, present, earlier)


def prepare_output(cfg: TrainConfig, run: Run):
    """Create the output folder and hold its lock for the whole run (the OS releases it when the process
    ends, however it ends); with --overwrite, delete the earlier run's files. Rank 0 only."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a")
    except OSError as e:
        raise UserError(f"--output_dir {out}: not writable ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--output_dir {out}: another train.py is running in it") from None
    if sorted(p.name for p in out.iterdir() if p.name != ".lock") != run.present:
        raise UserError(f"--output_dir {out}: changed while this run was checking it (another train.py?)")
    for p in run.earlier:  # --overwrite: the earlier run's files only; anything else in the folder stays
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return lock


def save(out: Path, name: str, model, cfg: TrainConfig, rank: int, state: dict | None = None) -> None:
    """out/<name>/ via a temporary folder and a rename, so a kill never leaves a half-written one: the adapter
    (PEFT format), the encoder settings it trained with, the config; a checkpoint (`state`) adds the trainer
    state and every rank's RNG state (dropout masks differ per rank)."""
    final, tmp = out / name, out / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with folder_write(final, tmp):  # a full disk: one error naming `final`; the earlier files stay
            save_adapter(model, tmp, base_model_name_or_path=cfg.model)
            write_settings(tmp, cfg.pooling, cfg.is_causal, cfg.prompt, trained_on=cfg.init_adapter)
            write_json(tmp / "train_config.json", cfg.to_dict())
            if state is not None:
                save_torch(tmp / "trainer_state.pt", state)
    barrier()
    if state is not None:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        with folder_write(final, tmp):
            save_torch(tmp / f"rng_rank{rank}.pt", {"cpu": torch.get_rng_state(), "cuda": cuda})
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def resume(ckpt: Path, opt, sched, rank: int, device, log_path: Path) -> int:
    """Optimizer, schedule and RNG state of the checkpoint; the log keeps its records up to its step."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng_file = ckpt / f"rng_rank{rank}.pt"  # absent when the run had fewer ranks
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else {}
    torch.set_rng_state(rng.get("cpu", torch.get_rng_state()))
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    if rank == 0 and log_path.is_file():
        write_text(log_path, "".join(json.dumps(r) + "\n" for r in log_until(log_path, state["step"])))
    return state["step"]


@torch.no_grad()
def evaluate(objective: Objective, enc: Encoder, run: Run, cfg: TrainConfig, final: bool = False) -> dict:
    """On rank 0: the objective's loss on the first eval_batches micro-batches of eval_file (the same MNTP
    masks every time), and STS Spearman x100. A failure is reported, never fatal to the run."""
    metrics, model = {}, enc.model
    model.eval()
    try:
        if run.eval_data is not None:
            metrics["eval_loss"] = objective.eval_loss(run.eval_data, cfg.micro_batch_size, cfg.eval_batches)
        if run.sts is not None:
            metrics["eval_sts_spearman"] = evaluate_sts(enc, *run.sts, show_progress=final and cfg.progress)
    except Exception as e:  # never lose the run to an evaluation failure
        metrics["eval_error"] = f"{type(e).__name__}: {e}"
    model.train()
    return metrics


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        train(argv)
    except USER_ERRORS as e:  # wherever a mistake in the input shows, it is one line (--debug: the traceback)
        fail("train.py", e, "--debug" in argv)


def train(argv: list[str]) -> None:
    cfg = parse_config(argv).local()  # hub ids -> folders: the run records the snapshot folder
    rank, world, device = init_distributed(cfg.device)
    cfg = cfg.for_world(world)
    run = check_run(cfg)
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    lock = prepare_output(cfg, run) if rank == 0 else None  # noqa: F841 (held until the process ends)
    barrier()
    master, out = rank == 0, Path(cfg.output_dir)
    print0 = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)

    # Model: frozen base weights (any dtype) + merged earlier-stage adapters + a fresh (or resumed) LoRA.
    model = load_model(cfg.model, cfg.weights_dtype, device, cfg.is_causal, cfg.attention_dropout)
    for adapter in cfg.init_adapter:
        load_adapter(model, adapter, merge=True)
    if run.ckpt is not None:
        load_adapter(model, run.ckpt, merge=False)
    else:
        layers = cfg.lora_layers or None
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, layers=layers)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = resolve_autocast(cfg.autocast, device)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    enc = Encoder(model, run.tokenizer, cfg.pooling, cfg.max_seq_length, prompt=cfg.prompt, autocast=autocast)
    objective = run.objective
    objective.attach(model, enc, amp)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm, total = cfg.warmup_steps, cfg.max_steps  # linear warmup, then linear decay to 0 at max_steps
    schedule = lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log_path, step = out / "log.jsonl", 0
    if run.ckpt is not None:
        step = resume(run.ckpt, opt, sched, rank, device, log_path)
        print0(f"resumed from {run.ckpt} at step {step}")
    if master:
        write_json(out / "train_config.json", cfg.to_dict())
    last_step = min(total, cfg.stop_after_n_steps or total)
    bar = None  # disable=None: none when stderr is not a terminal
    if master and cfg.progress:
        bar = tqdm(total=last_step, initial=step, desc=cfg.objective, dynamic_ncols=True, disable=None)

    def log(rec: dict) -> None:
        if master:
            line = json.dumps(rec, default=str)
            (bar.write if bar else print)(line)
            append_line(log_path, line)

    def run_eval(final: bool = False) -> dict:
        metrics = evaluate(objective, enc, run, cfg, final) if master else {}
        barrier()  # the other ranks wait: evaluation has no collectives
        return {"step": step, **metrics}

    rec = dict(event="start", objective=cfg.objective, world_size=world, train_examples=len(run.data))
    rec |= dict(accum=cfg.batch_size // world // cfg.micro_batch_size) | objective.describe(world)
    log(rec | dict(trainable_params=sum(p.numel() for p in params), device=str(device), resumed_at=step))
    # Global batches depend on (seed, epoch) only, never on the world size (see micro_batch_positions).
    positions = micro_batch_positions(cfg.batch_size, cfg.micro_batch_size, rank, world)
    epoch_of = lambda e: batches(len(run.data), cfg.batch_size, seed=cfg.seed, epoch=e, groups=run.groups)
    steps_per_epoch, epoch_batches, t0, first = len(epoch_of(0)), None, time.time(), step
    loss_sum, tokens, since = torch.zeros((), device=device), 0, 0  # summed on the device: no sync per step
    while step < last_step:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or epoch_batches is None:
            epoch_batches = epoch_of(epoch)
        micro = objective.micro_batches(run.data, epoch_batches[within], positions, step)
        lr = sched.get_last_lr()[0]
        loss_sum += objective.backward(fwd, micro)
        tokens += sum(m.tokens for m in micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, since = step + 1, since + 1
        if bar:
            bar.update(1)
        if step % cfg.log_every == 0 or step == last_step or step == 1:
            s, loss = time.time() - t0, round(all_sum(loss_sum, device) / world / since, 6)
            if not math.isfinite(loss):  # nothing after this is worth saving; earlier checkpoints stay
                raise UserError(f"step {step}: the loss is {loss}: training diverged (a lower --lr?)")
            norm = None if grad_norm is None else round(grad_norm.item(), 4)
            tps, sps = round(all_sum(tokens, device) / s, 1), round(s / (step - first), 3)
            log(dict(step=step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tps, s_per_step=sps))
            loss_sum.zero_()
            since = 0
        if cfg.eval_every and step % cfg.eval_every == 0:
            log(run_eval())
        if cfg.save_every and step % cfg.save_every == 0 and step < last_step:
            state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step)
            save(out, f"checkpoint-{step:06d}", model, cfg, rank, state | run.data_id)
    if bar:
        bar.close()

    evaluated = cfg.eval_every and step % cfg.eval_every == 0
    evaluate_now = (run.eval_data is not None or run.sts is not None) and not evaluated
    final_metrics = run_eval(final=True) if evaluate_now else {}
    save(out, "final", model, cfg, rank)
    log({"event": "end", **final_metrics, "step": step, "seconds": round(time.time() - t0, 1)})
    if master and cfg.merge_out:
        save_merged(model, cfg.merge_out, cfg.model, out / "final", cfg.weights_dtype)
        print0(f"merged model written to {cfg.merge_out}")
    if world > 1:
        # Free DDP's reducer first: dropping the process group's last reference in its destructor after
        # destroy_process_group keeps the GIL while joining gloo's threads, which may need it (a hang).
        del fwd
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
