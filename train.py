"""One training loop for the LLM2Vec stages: MNTP, unsupervised SimCSE, supervised contrastive.

    # stage 1: masked next-token prediction (bidirectional attention + LoRA)
    python train.py --objective mntp --config configs/mntp/smollm2-135m.json
    torchrun --nproc_per_node 2 train.py --objective mntp --config configs/mntp/smollm2-135m.json

    # stage 2: SimCSE on top of the merged MNTP adapter
    python train.py --objective simcse --config configs/simcse/smollm2-135m.json \
        --init_adapter runs/mntp-smollm2/final

    # any config key can be overridden: --key value (lists as JSON, e.g. --init_adapter '["a", "b"]')
    python train.py --objective mntp --model DIR --train_file wiki.txt --max_steps 10 --lr 1e-4

Everything is visible here: config resolution, DDP setup (torchrun env vars), data, the step loop with
gradient accumulation under `no_sync`, autocast, clipping, logging, evaluation and checkpoints.
The library (`l2v/`) holds the pure pieces: model, LoRA, data, losses, pooling.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from l2v.checkpoint import load_model, read_json, resolve_dtype, save_model
from l2v.data import batches, mask_token_id, mask_tokens, mntp_blocks, read_texts, read_triples
from l2v.encoder import Encoder, pool
from l2v.lora import add_lora, load_adapter, merge_lora, save_adapter
from l2v.objectives import mntp_loss, num_targets, simcse_loss, supervised_loss
from l2v.tokenizer import Tokenizer

# Every key a run can set; a config file or --key value overrides these. Types come from the defaults.
DEFAULTS = dict(
    objective="mntp",  # mntp | simcse | supervised
    model="models/smollm2-135m-instruct",  # HF folder with config.json, safetensors, tokenizer.json
    train_file="",
    eval_file="",  # held-out text (MNTP) or sentences (SimCSE) for a periodic eval loss
    eval_sts_file="",  # optional STS-B style dev file: Spearman x100 at every eval (checkpoint selection)
    output_dir="runs/run",
    init_adapter=[],  # adapters merged into the base first (e.g. MNTP's, before SimCSE)
    is_causal=False,  # LLM2Vec trains with bidirectional attention
    # optimisation
    max_steps=1000,
    stop_after_n_steps=0,  # end early but keep the schedule of max_steps (0 = off)
    batch_size=32,  # global batch: sequences per optimizer step, across ranks and accumulation
    micro_batch_size=0,  # per rank per forward; 0 = batch_size / world_size (no accumulation)
    lr=5e-5,
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip=1.0,
    seed=42,
    # LoRA
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # data and objective
    max_seq_length=512,
    mask_probability=0.2,
    mask_token="blank",  # blank ('_', upstream default) | eos
    mask_mode="80_10_10",  # 80_10_10 | all_mask
    attention_dropout=0.0,  # SimCSE: 0.3
    pooling="mean",
    scale=20.0,  # cosine x scale: 20 for SimCSE (temperature 0.05), 50 for supervised
    # precision and speed
    weights_dtype="float32",  # dtype of the frozen base weights; LoRA weights are always float32
    autocast="bfloat16",  # bfloat16 | float16 | none
    gradient_checkpointing=False,
    compile=False,
    # bookkeeping
    log_every=10,
    eval_every=0,  # 0 = only at the end when an eval file is given
    eval_batches=8,
    save_every=0,  # 0 = only the final adapter
    keep_checkpoints=2,
    resume=False,  # continue from the newest checkpoint in output_dir
    merge_out="",  # also write a merged HF folder (base + init adapters + this LoRA)
    progress=True,
)
OBJECTIVE_DEFAULTS = {
    "mntp": dict(lr=5e-5, max_seq_length=512, batch_size=32),
    "simcse": dict(lr=3e-5, max_seq_length=128, batch_size=128, attention_dropout=0.3, scale=20.0),
    "supervised": dict(lr=2e-4, max_seq_length=512, batch_size=64, warmup_steps=300, scale=50.0),
}


def parse_config(argv: list[str]) -> dict:
    """defaults < objective defaults < --config JSON < --key value flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=list(OBJECTIVE_DEFAULTS))
    p.add_argument("--config", help="JSON file of config keys")
    for key, value in DEFAULTS.items():
        if key != "objective":
            p.add_argument(f"--{key}", f"--{key.replace('_', '-')}", dest=key, default=None,
                           help=f"default: {json.dumps(value)}")
    args = p.parse_args(argv)
    cfg = dict(DEFAULTS)
    file_cfg = read_json(args.config) if args.config else {}
    unknown = set(file_cfg) - set(DEFAULTS) - {"_comment"}
    if unknown:
        raise SystemExit(f"{args.config}: unknown config key(s) {sorted(unknown)}")
    objective = args.objective or file_cfg.get("objective") or cfg["objective"]
    if objective not in OBJECTIVE_DEFAULTS:
        raise SystemExit(f"unknown objective {objective!r}; choose from {list(OBJECTIVE_DEFAULTS)}")
    cfg.update(OBJECTIVE_DEFAULTS[objective])
    cfg.update({k: v for k, v in file_cfg.items() if k != "_comment"})
    cfg["objective"] = objective
    for key, raw in vars(args).items():
        if raw is None or key in ("objective", "config"):
            continue
        cfg[key] = coerce(key, raw, DEFAULTS[key])
    return cfg


def coerce(key: str, raw: str, default):
    """Turn a command-line string into the type of the key's default."""
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, list):
            return json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
        return type(default)(raw)
    except ValueError:
        raise SystemExit(f"--{key}: cannot read {raw!r} as {type(default).__name__}") from None


# ----------------------------------------------------------------------------- distributed

def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def all_sum(x: float | int, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, step: int, model, opt, sched, cfg: dict, rank: int, world: int) -> None:
    """Write checkpoint-<step>/ via a temp dir + rename, so a kill never leaves a half-written one."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # RNG state differs per rank (dropout masks), so every rank saves its own.
    rng = {"cpu": torch.get_rng_state()}
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


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob("checkpoint-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def barrier():
    if dist.is_initialized():
        dist.barrier()


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ----------------------------------------------------------------------------- data per objective

def load_data(cfg: dict, tok: Tokenizer, path: str):
    """MNTP: (N, max_seq_length) token blocks. SimCSE: sentences. Supervised: triples."""
    if cfg["objective"] == "mntp":
        return mntp_blocks(tok, read_texts(path), cfg["max_seq_length"])
    if cfg["objective"] == "simcse":
        return read_texts(path)
    return read_triples(path)


def micro_batch_positions(batch_size: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Positions in the global batch for each of this rank's micro-batches.

    Accumulation step i covers the contiguous group [i*G, (i+1)*G), G = micro * world, and rank r
    takes its r-th slice. Gathered over ranks, a contrastive micro-batch is then the same group of
    examples (the same in-batch negatives) whatever the world size: 1 rank x 2 micro-batches of 4
    and 2 ranks x 2 micro-batches of 2 both see the groups [0:4] and [4:8].
    """
    G = micro * world
    return [list(range(i * G + rank * micro, i * G + (rank + 1) * micro)) for i in range(batch_size // G)]


def mntp_micro_batches(cfg, data, global_idx, positions, tok, device, mask_id, step):
    """Mask the whole global batch with a generator seeded by (seed, step), then take this rank's
    rows: any world size or accumulation split sees the masks one process would, and resume is exact."""
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
    ids, labels = mask_tokens(data[global_idx], mask_id=mask_id, special_ids=tok.special_ids,
                              vocab_size=tok.vocab_size, probability=cfg["mask_probability"],
                              mode=cfg["mask_mode"], generator=g)
    return [(ids[pos].to(device), labels[pos].to(device)) for pos in positions]


def contrastive_inputs(cfg, enc: Encoder, data, idx):
    """Token batches (input_ids, attention_mask, embed_mask) for the contrastive objectives:
    (queries, positives, hard negatives); SimCSE has only the first."""
    tokenize = lambda inputs: enc.collate(enc.prepare_inputs(inputs))  # noqa: E731
    rows = [data[i] for i in idx]
    if cfg["objective"] == "simcse":
        return tokenize(rows), None, None
    # Upstream: the instruction goes with the query only, and pooling skips its tokens.
    return (tokenize([(r["instruction"], r["query"]) for r in rows]),
            tokenize([r["positive"] for r in rows]), tokenize([r["negative"] for r in rows]))


def contrastive_step_loss(cfg, model, batch, device):
    """Both losses gather embeddings from every rank with gradient, so the negatives are the global
    micro-batch, not the local slice; each rank computes the same global loss."""
    def embed(ids, attn, emb):  # mean pooling over the real text tokens only (upstream also pooled pads)
        ids, attn, emb = ids.to(device), attn.to(device), emb.to(device)
        return pool(model(ids, attn), attn, emb, cfg["pooling"])
    q_batch, p_batch, n_batch = batch
    if p_batch is None:  # SimCSE: one forward over [x; x]; dropout makes the two halves differ
        both = embed(*(torch.cat([t, t]) for t in q_batch))
        return simcse_loss(*both.chunk(2), scale=cfg["scale"])
    return supervised_loss(embed(*q_batch), embed(*p_batch), embed(*n_batch), scale=cfg["scale"])


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(cfg, model, enc, tok, eval_data, device, mask_id, amp) -> dict:
    model.eval()
    metrics = {}
    if eval_data is not None and cfg["objective"] == "mntp":
        total, count = 0.0, 0
        n = min(len(eval_data), cfg["eval_batches"] * cfg["micro_batch_size"])
        g = torch.Generator().manual_seed(cfg["seed"])  # the same masks at every evaluation
        for start in range(0, n, cfg["micro_batch_size"]):
            ids, labels = mask_tokens(eval_data[start:start + cfg["micro_batch_size"]], mask_id=mask_id,
                                      special_ids=tok.special_ids, vocab_size=tok.vocab_size,
                                      probability=cfg["mask_probability"], mode=cfg["mask_mode"], generator=g)
            k = int(num_targets(labels))
            with amp():
                total += mntp_loss(model, ids.to(device), labels.to(device), normalizer=1.0).item()
            count += k
        metrics["eval_loss"] = total / max(count, 1)
    if cfg["eval_sts_file"]:
        from l2v.evaluate import evaluate_sts, read_stsb
        s1, s2, gold = read_stsb(cfg["eval_sts_file"])
        enc.model = model
        metrics["eval_sts_spearman"] = evaluate_sts(enc, s1, s2, gold, batch_size=64)
    model.train()
    return metrics


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world, device = init_distributed()
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    out = Path(cfg["output_dir"])
    if cfg["micro_batch_size"] == 0:
        cfg["micro_batch_size"] = cfg["batch_size"] // world
    per_rank = cfg["batch_size"] // world
    if cfg["batch_size"] % world or per_rank % cfg["micro_batch_size"]:
        raise SystemExit(f"batch_size {cfg['batch_size']} must split evenly over {world} rank(s) "
                         f"x micro_batch_size {cfg['micro_batch_size']}")
    accum = per_rank // cfg["micro_batch_size"]
    if not cfg["train_file"]:
        raise SystemExit("--train_file is required (a .txt, .json or .jsonl file)")
    torch.manual_seed(cfg["seed"] + rank)

    # Model: base weights (frozen, any dtype) + merged earlier-stage adapters + a fresh LoRA.
    model = load_model(cfg["model"], dtype=cfg["weights_dtype"], device=device, is_causal=cfg["is_causal"],
                       attention_dropout=cfg["attention_dropout"])
    for adapter in cfg["init_adapter"]:
        load_adapter(model, adapter, merge=True)
    ckpt = latest_checkpoint(out) if cfg["resume"] else None
    if ckpt is not None:  # the checkpoint's LoRA weights, exactly as saved (float32)
        load_adapter(model, ckpt, merge=False)
    else:
        add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                 targets=tuple(cfg["lora_targets"]))
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    tok = Tokenizer(cfg["model"])
    enc = Encoder(model, tok, pooling=cfg["pooling"], max_length=cfg["max_seq_length"])
    mask_id = mask_token_id(tok, cfg["mask_token"]) if cfg["objective"] == "mntp" else None

    data = load_data(cfg, tok, cfg["train_file"])
    eval_data = load_data(cfg, tok, cfg["eval_file"]) if cfg["eval_file"] and cfg["objective"] == "mntp" else None
    if len(data) < cfg["batch_size"]:
        raise SystemExit(f"{cfg['train_file']}: {len(data)} training examples, fewer than one batch of {cfg['batch_size']}")

    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    fwd = DDP(model) if world > 1 else model
    fwd_model = fwd.module if world > 1 else fwd
    if cfg["compile"]:
        fwd = torch.compile(fwd)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def lr_lambda(step):  # linear warmup, then linear decay to 0 at max_steps
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        return max(0.0, (cfg["max_steps"] - step) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    step = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        if state["world_size"] != world:
            print0(f"note: resuming a {state['world_size']}-rank run on {world} rank(s); RNG streams differ")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        rng_file = ckpt / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        print0(f"resumed from {ckpt} at step {step}")

    use_amp = cfg["autocast"] != "none" and (device.type == "cuda" or cfg["autocast"] == "bfloat16")
    amp = (lambda: torch.autocast(device.type, dtype=resolve_dtype(cfg["autocast"]))) if use_amp else contextlib.nullcontext
    if master:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", cfg)
    print0(json.dumps({"event": "start", "objective": cfg["objective"], "world_size": world, "accum": accum,
                       "train_examples": len(data), "trainable_params": n_train, "device": str(device)}))

    # Global batches depend on (seed, epoch) only, never on the world size; see micro_batch_positions.
    last_step = min(cfg["max_steps"], cfg["stop_after_n_steps"] or cfg["max_steps"])
    bar = None
    if master and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=last_step, initial=step, desc=cfg["objective"], file=sys.stderr, dynamic_ncols=True)
    t0, tokens_seen, epoch_batches, start_step = time.time(), 0, None, step
    # Supervised triples may name their source dataset: then each global batch comes from one.
    groups = [r.get("dataset", "") for r in data] if cfg["objective"] == "supervised" else None
    steps_per_epoch = len(list(batches(len(data), cfg["batch_size"], seed=cfg["seed"], groups=groups)))
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg['train_file']}: not one full global batch of {cfg['batch_size']} per group")
    log_path = out / "log.jsonl"
    while step < last_step:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or epoch_batches is None:
            epoch_batches = list(batches(len(data), cfg["batch_size"], seed=cfg["seed"], epoch=epoch, groups=groups))
        global_idx = epoch_batches[within]
        positions = micro_batch_positions(cfg["batch_size"], cfg["micro_batch_size"], rank, world)

        if cfg["objective"] == "mntp":
            # Normalise by the masked-token count of the whole global batch (all micro-batches, all
            # ranks): per-micro-batch means would weight tokens unequally. DDP averages gradients
            # over ranks, so each rank scales its sum by world / global_count.
            micro = mntp_micro_batches(cfg, data, global_idx, positions, tok, device, mask_id, step)
            local_count = sum(int(num_targets(lab)) for _, lab in micro)
            global_count = all_sum(local_count, device)
            norm = global_count / world
        else:
            micro = [contrastive_inputs(cfg, enc, data, [global_idx[p] for p in pos]) for pos in positions]

        loss_sum = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = fwd.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with ctx:
                with amp():
                    if cfg["objective"] == "mntp":
                        ids, labels = batch
                        loss = mntp_loss(fwd, ids, labels, normalizer=norm)
                        tokens_seen += ids.numel()
                    else:
                        # each micro-batch is its own contrastive problem; average over them
                        loss = contrastive_step_loss(cfg, fwd, batch, device) / len(micro)
                        tokens_seen += sum(int(t[1].sum()) for t in batch if t is not None)
                loss.backward()
            loss_sum += loss.item()
        if cfg["grad_clip"] > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
        else:
            grad_norm = math.nan
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if bar:
            bar.update(1)

        # The logged loss is the global-batch mean; both objectives average over ranks the same way.
        train_loss = all_sum(loss_sum, device) / world
        if step % cfg["log_every"] == 0 or step == last_step or step == 1:
            elapsed = time.time() - t0
            rec = {"step": step, "loss": round(train_loss, 6), "lr": sched.get_last_lr()[0],
                   "grad_norm": round(grad_norm, 4), "tokens_per_s": round(all_sum(tokens_seen, device) / elapsed, 1),
                   "s_per_step": round(elapsed / (step - start_step), 3)}
            if cfg["eval_every"] and step % cfg["eval_every"] == 0:
                rec.update(evaluate(cfg, fwd_model, enc, tok, eval_data, device, mask_id, amp))
            if master:
                line = json.dumps(rec)
                (bar.write if bar else print)(line)
                with open(log_path, "a") as f:
                    f.write(line + "\n")
        if cfg["save_every"] and step % cfg["save_every"] == 0 and step < last_step:
            save_checkpoint(out, step, fwd_model, opt, sched, cfg, rank, world)
    if bar:
        bar.close()

    final_metrics = {}
    if (cfg["eval_file"] or cfg["eval_sts_file"]) and not cfg["eval_every"]:
        final_metrics = evaluate(cfg, fwd_model, enc, tok, eval_data, device, mask_id, amp)
    if master:
        final = out / "final"
        save_adapter(fwd_model, final, base_model_name_or_path=cfg["model"])
        write_json(final / "llm2vec_config.json", {"pooling_mode": cfg["pooling"], "max_length": 512,
                                                   "doc_max_length": 400, "skip_instruction": True})
        write_json(final / "train_config.json", cfg)
        record = {"event": "end", "step": step, "seconds": round(time.time() - t0, 1), **final_metrics}
        print0(json.dumps(record))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg["merge_out"]:
            merge_lora(fwd_model)
            save_model(fwd_model, cfg["merge_out"], dtype=cfg["weights_dtype"])
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                if (Path(cfg["model"]) / name).is_file():
                    shutil.copy(Path(cfg["model"]) / name, Path(cfg["merge_out"]) / name)
            print0(f"merged model written to {cfg['merge_out']}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
