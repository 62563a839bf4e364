"""One training loop for the LLM2Vec stages: MNTP, unsupervised SimCSE, supervised contrastive, and CoSENT
on graded pairs (a last supervised stage on similarity scores; not in llm2vec).

    python train.py                                    # the MNTP demo preset on the demo model (needs ../shared)
    torchrun --nproc_per_node 2 train.py --objective mntp --config configs/mntp/smollm2-135m.json
    python train.py --objective simcse --config configs/simcse/smollm2-135m.json --init_adapter runs/mntp-smollm2/final
    python train.py --objective mntp --model DIR --train_file wiki.txt --max_steps 10 --lr 1e-4  # any key: --key value

Top to bottom: check the run (reads every file, writes none), prepare the output folder (the only place
that deletes or creates), load the model, resume, then the step loop: the objective's micro-batches and
backward (accumulation under `no_sync`, or cached contrastive gradients), clipping, logging, evaluation,
checkpoints. The objective (`l2v/objectives.py`) is the one thing that differs between stages; the keys
and their checks are in `l2v/config.py`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from l2v.checkpoint import load_config, load_model, meta_model, read_json, resolve_autocast, save_model
from l2v.cli import USER_ERRORS, UserError, fail
from l2v.config import DEFAULTS, RESUMABLE, parse_config
from l2v.data import batches, micro_batch_positions
from l2v.distributed import all_sum, barrier, init_distributed
from l2v.encoder import Encoder
from l2v.evaluation import evaluate_sts, read_stsb
from l2v.files import write_json, write_text
from l2v.hub import resolve
from l2v.lora import add_lora, load_adapter, merge_lora, read_adapter, save_adapter
from l2v.objectives import OBJECTIVES, Objective
from l2v.settings import write_settings
from l2v.tokenizer import Tokenizer

RUN_FILES = ("final", "log.jsonl", "train_config.json")  # with checkpoint-*: what --overwrite may delete


@dataclass
class Run:
    """What checking the run found: the objective, the data, and where training starts from."""
    objective: Objective
    tokenizer: Tokenizer
    data: object
    groups: list | None
    eval_data: object
    sts: tuple | None
    ckpt: Path | None
    data_id: dict  # the train file's identity, recorded in checkpoints: resuming on other data is refused
    earlier: list[Path]  # an earlier run's files, deleted by --overwrite
    present: list[str]  # the output folder's entries as checked


def file_id(path: str) -> dict:
    h, p = hashlib.sha256(), Path(path)
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"train_file": str(p), "bytes": p.stat().st_size, "sha256": h.hexdigest()}


def check_run(cfg: dict, world: int) -> Run:
    """Read or check every file the run needs before the model loads; nothing is written."""
    mb = cfg["micro_batch_size"] = cfg["micro_batch_size"] or cfg["batch_size"] // world
    if cfg["batch_size"] % world or (cfg["batch_size"] // world) % mb:
        raise UserError(f"--batch_size {cfg['batch_size']}: must split over {world} rank(s) x micro_batch_size {mb}")
    if cfg["eval_every"] and not (cfg["eval_file"] or cfg["eval_sts_file"]):
        raise UserError("--eval_every: needs --eval_file or --eval_sts_file")
    model_cfg, tok = load_config(cfg["model"]), Tokenizer(cfg["model"])
    objective = OBJECTIVES[cfg["objective"]](cfg, tok)
    data = objective.read(cfg["train_file"])
    groups = [r.get(objective.group_field, "") for r in data] if objective.group_field else None
    if not batches(len(data), cfg["batch_size"], seed=0, groups=groups):
        raise UserError(f"{cfg['train_file']}: {len(data)} examples, not one batch of {cfg['batch_size']} (per group)")
    eval_data = objective.read(cfg["eval_file"]) if cfg["eval_file"] else None
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
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    present = sorted(p for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    earlier = [p for p in present if p.name.startswith(("checkpoint-", ".tmp-")) or p.name in RUN_FILES]
    for folder, flag in [(f, "--init_adapter") for f in cfg["init_adapter"]] + [(cfg["merge_out"], "--merge_out")]:
        if folder and any(Path(folder).resolve().is_relative_to(p.resolve()) for p in [*earlier, out / "final"]):
            raise UserError(f"{flag} {folder}: inside this run's own files in {out} (it would be overwritten)")
    if cfg["merge_out"] and Path(cfg["merge_out"]).exists() and any(Path(cfg["merge_out"]).iterdir()):
        raise UserError(f"--merge_out {cfg['merge_out']}: exists and is not empty")
    ckpt, data_id = None, file_id(cfg["train_file"])
    if cfg["resume"]:
        ckpt = resumable_checkpoint(cfg, out, meta, data_id)
    elif present and not cfg["overwrite"]:
        what = "holds an earlier run" if earlier else "is not empty"
        raise UserError(f"--output_dir {out}: {what} ({', '.join(p.name for p in present[:3])}{', ...' * (len(present) > 3)})"
                        "; pass --resume true to continue a run or --overwrite true (deletes only a run's files)")
    return Run(objective, tok, data, groups, eval_data, sts, ckpt, data_id, earlier if cfg["overwrite"] else [],
               [p.name for p in present])


def resumable_checkpoint(cfg: dict, out: Path, meta, data_id: dict) -> Path:
    """The newest intact checkpoint, if it was trained with these settings on this data."""
    damaged = []
    for ckpt in sorted(out.glob("checkpoint-*"), reverse=True):
        try:  # every file must read back: a kill may have truncated any of them
            read_json(ckpt / "train_config.json")
            read_adapter(ckpt, meta)
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
            for f in ckpt.glob("rng_rank*.pt"):
                torch.load(f, weights_only=True)
            break
        except Exception as e:
            damaged.append(f"{ckpt}: damaged, skipped ({type(e).__name__}: {str(e)[:200]})")
    else:
        raise UserError(f"--resume: no intact checkpoint in {out}" + (f" ({'; '.join(damaged)})" if damaged else ""))
    for d in damaged:
        print(f"train.py: warning: {d}", file=sys.stderr)
    saved = read_json(ckpt / "train_config.json")
    changed = [k for k in DEFAULTS if k not in RESUMABLE and saved.get(k, DEFAULTS[k]) != cfg[k]]
    if changed:
        raise UserError(f"--resume: {ckpt} was trained with other settings: " + ", ".join(
            f"{k} {saved.get(k)!r} -> {cfg[k]!r}" for k in changed) + f" (only {', '.join(sorted(RESUMABLE))} may change)")
    if cfg["max_steps"] < state["step"]:
        raise UserError(f"--max_steps {cfg['max_steps']}: below the checkpoint's step {state['step']} ({ckpt})")
    recorded = state.get("data")
    if recorded and recorded["sha256"] != data_id["sha256"] and not cfg["resume_other_data"]:
        raise UserError(f"--train_file {cfg['train_file']}: not the data {ckpt} was trained on ({recorded['bytes']} "
                        f"bytes, sha256 {recorded['sha256'][:12]}...); --resume_other_data true to continue anyway")
    return ckpt


def prepare_output(cfg: dict, run: Run, rank: int):
    """Create the output folder and hold its lock for the whole run (the OS releases it when the process
    ends, however it ends); with --overwrite, delete the earlier run's files. Rank 0 only."""
    out = Path(cfg["output_dir"])
    if rank != 0:
        return None
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


def save_checkpoint(out: Path, step: int, model, opt, sched, cfg: dict, run: Run, rank: int, world: int) -> None:
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
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "world_size": world,
                    "data": run.data_id}, tmp / "trainer_state.pt")
        write_run_settings(tmp, cfg)  # a checkpoint encodes like final/: pooling, prompt, attention
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[:-cfg["keep_checkpoints"]]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def write_run_settings(folder: Path, cfg: dict) -> None:
    """The encoder settings it trained with (`l2v.settings`), and the run's whole resolved config."""
    write_settings(folder, pooling_mode=cfg["pooling"], is_causal=cfg["is_causal"], prompt=cfg["prompt"],
                   trained_on=cfg["init_adapter"])
    write_json(folder / "train_config.json", cfg)


def resume(ckpt: Path, opt, sched, rank: int, device, log_path: Path) -> int:
    """Optimizer, schedule and RNG state of the checkpoint; the log keeps its records up to its step."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True) if (ckpt / f"rng_rank{rank}.pt").is_file() else {}
    torch.set_rng_state(rng.get("cpu", torch.get_rng_state()))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    if rank == 0 and log_path.is_file():
        recs = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
        write_text(log_path, "".join(json.dumps(r) + "\n" for r in recs if r.get("step", 0) <= state["step"]
                                     and "event" not in r))
    return state["step"]


@torch.no_grad()
def evaluate(objective: Objective, enc: Encoder, run: Run, cfg: dict, final: bool = False) -> dict:
    """On rank 0: the objective's loss on the first eval_batches micro-batches of eval_file (the same MNTP
    masks every time), and STS Spearman x100. A failure is reported, never fatal to the run."""
    metrics, model = {}, enc.model
    model.eval()
    try:
        if run.eval_data is not None:
            mb, total, count = cfg["micro_batch_size"], 0.0, 0
            for k in range(min(len(run.eval_data) // mb, cfg["eval_batches"])):
                m, = objective.micro_batches(run.eval_data, list(range(k * mb, (k + 1) * mb)), [list(range(mb))], -1)
                with objective.amp():
                    total, count = total + objective.loss(model, m.inputs, gather=False).item(), count + m.terms
            metrics["eval_loss"] = total / max(count, 1)
        if run.sts is not None:
            metrics["eval_sts_spearman"] = evaluate_sts(enc, *run.sts, show_progress=final and cfg["progress"])
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
    cfg = parse_config(argv)
    # Hub ids -> their snapshot folders (l2v/hub.py); the run records the folder, whose name is the commit.
    cfg["model"] = str(resolve(cfg["model"], "model"))
    cfg["init_adapter"] = [str(resolve(a, "adapter")) for a in cfg["init_adapter"]]
    rank, world, device = init_distributed(cfg["device"])
    run = check_run(cfg, world)
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    lock = prepare_output(cfg, run, rank)  # noqa: F841 (held until the process ends)
    barrier()
    master, out = rank == 0, Path(cfg["output_dir"])
    print0 = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg["seed"] + rank)

    # Model: frozen base weights (any dtype) + merged earlier-stage adapters + a fresh (or resumed) LoRA.
    model = load_model(cfg["model"], dtype=cfg["weights_dtype"], device=device, is_causal=cfg["is_causal"],
                       attention_dropout=cfg["attention_dropout"])
    for adapter in cfg["init_adapter"]:
        load_adapter(model, adapter, merge=True)
    if run.ckpt is not None:
        load_adapter(model, run.ckpt, merge=False)
    else:
        add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                 targets=tuple(cfg["lora_targets"]), layers=cfg["lora_layers"] or None)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg["compile"] else fwd
    autocast = resolve_autocast(cfg["autocast"], device)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    enc = Encoder(model, run.tokenizer, pooling=cfg["pooling"], max_length=cfg["max_seq_length"],
                  prompt=cfg["prompt"] or None, autocast=autocast)
    objective = run.objective
    objective.attach(model, enc, amp)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm, total = cfg["warmup_steps"], cfg["max_steps"]  # linear warmup, then linear decay to 0 at max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    log_path, step = out / "log.jsonl", 0
    if run.ckpt is not None:
        step = resume(run.ckpt, opt, sched, rank, device, log_path)
        print0(f"resumed from {run.ckpt} at step {step}")
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

    def run_eval(final: bool = False) -> dict:
        metrics = evaluate(objective, enc, run, cfg, final) if master else {}
        barrier()  # the other ranks wait: evaluation has no collectives
        return {"step": step, **metrics}

    print0(json.dumps({"event": "start", "objective": cfg["objective"], "world_size": world, "train_examples": len(run.data),
                       "accum": cfg["batch_size"] // world // cfg["micro_batch_size"], **objective.describe(world),
                       "trainable_params": sum(p.numel() for p in params), "device": str(device), "autocast": str(autocast)}))
    # Global batches depend on (seed, epoch) only, never on the world size (see micro_batch_positions).
    positions = micro_batch_positions(cfg["batch_size"], cfg["micro_batch_size"], rank, world)
    steps_per_epoch = len(batches(len(run.data), cfg["batch_size"], seed=cfg["seed"], groups=run.groups))
    epoch_batches, t0, start_step = None, time.time(), step
    loss_sum, tokens, since = torch.zeros((), device=device), 0, 0  # summed on the device: no sync per step
    while step < last_step:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or epoch_batches is None:
            epoch_batches = batches(len(run.data), cfg["batch_size"], seed=cfg["seed"], epoch=epoch, groups=run.groups)
        micro = objective.micro_batches(run.data, epoch_batches[within], positions, step)
        lr = sched.get_last_lr()[0]
        loss_sum += objective.backward(fwd, micro)
        tokens += sum(m.tokens for m in micro)
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
            save_checkpoint(out, step, model, opt, sched, cfg, run, rank, world)
    if bar:
        bar.close()

    evaluated = cfg["eval_every"] and step % cfg["eval_every"] == 0
    final_metrics = run_eval(final=True) if (run.eval_data is not None or run.sts is not None) and not evaluated else {}
    if master:
        save_final(model, out, cfg)
        log({"event": "end", **final_metrics, "step": step, "seconds": round(time.time() - t0, 1)})
        if cfg["merge_out"]:
            print0(f"merged model written to {save_merged(model, out, cfg)}")
    if world > 1:
        # DDP's reducer holds the process group. Freed after destroy_process_group (when main returns),
        # it would drop the group's last reference in a destructor that keeps the GIL while joining
        # gloo's worker threads, which may need the GIL: a hang at exit. So free it first.
        del fwd
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def save_final(model, out: Path, cfg: dict) -> None:
    """final/ via a temporary folder and a rename, like the checkpoints."""
    tmp, final = out / ".tmp-final", out / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, base_model_name_or_path=cfg["model"])
    write_run_settings(tmp, cfg)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def save_merged(model, out: Path, cfg: dict) -> Path:
    """The base with every adapter merged, its tokenizer and this run's encoder settings: an HF folder that
    transformers and l2v load. Written beside merge_out, then renamed into place."""
    dest = Path(cfg["merge_out"])
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(merge_lora(model), tmp, dtype=cfg["weights_dtype"])
    for f in [Path(cfg["model"]) / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                               "generation_config.json")] + sorted((out / "final").glob("*_config.json")):
        if f.is_file() and f.name != "adapter_config.json":
            shutil.copy(f, tmp / f.name)
    if dest.exists():
        dest.rmdir()  # checked empty before the run
    os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    main()
