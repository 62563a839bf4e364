"""The training configuration: one table of keys (default, help, check), the objectives' own defaults, and
`parse_config` (defaults < objective defaults < --config JSON < --key value), which checks every value's
type, finiteness and range. It reads files (the --config JSON) and writes none."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .checkpoint import read_json
from .cli import DATA_DIR, DEMO_MODEL, REPO, UserError, fail
from .encoder import POOLING_MODES
from .lora import DEFAULT_TARGETS
from .objectives import OBJECTIVES
from .settings import check_prompt

CHECKS = {
    ">=0": lambda v: v >= 0,
    ">0": lambda v: v > 0,
    ">=1": lambda v: v >= 1,
    ">=2": lambda v: v >= 2,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    # the random generators' range; seeds of the masks and dropout derive from seed * 1_000_003 + step
    ">=0 and < 2**32": lambda v: 0 <= v < 2**32,
}


def opt(default, help: str, check=None):
    """A key: its default, its help and its check (a CHECKS name or a tuple of choices). A --key value
    takes its default's type."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**kw, metadata={"help": help, "check": check})


@dataclass
class TrainConfig:
    objective: str = opt("mntp", "the training objective (one of OBJECTIVES, l2v/objectives.py)")
    model: str = opt(
        str(DEMO_MODEL.relative_to(REPO)), "HF model folder (config.json, safetensors, tokenizer.json)"
    )
    train_file: str = opt(
        "",
        "MNTP/SimCSE: .txt/.raw (a text per line), .json/.jsonl; supervised: triples; cosent: scored pairs",
    )
    eval_file: str = opt("", "held-out examples like train_file's: the objective's loss at each evaluation")
    eval_sts_file: str = opt("", "STS-B style dev file: Spearman x100 at each evaluation")
    output_dir: str = opt(
        "runs/run", "checkpoints, final/, log.jsonl; must hold no earlier run (see resume, overwrite)"
    )
    init_adapter: list = opt([], "adapters merged into the base first (e.g. MNTP's, before SimCSE)")
    is_causal: bool = opt(False, "keep causal attention (LLM2Vec trains bidirectional)")
    device: str = opt("auto", "auto (CUDA when available) | cpu | cuda | cuda:N; torchrun: cuda:LOCAL_RANK")
    max_steps: int = opt(1000, "optimizer steps; the linear schedule ends here", ">=1")
    stop_after_n_steps: int = opt(0, "stop early, keeping max_steps' schedule (0 = off)", ">=0")
    batch_size: int = opt(32, "global batch: examples per step over ranks and accumulation", ">=1")
    micro_batch_size: int = opt(0, "examples per rank per forward (0 = batch_size / ranks)", ">=0")
    contrastive_batch: str = opt(
        "global",
        "contrastive with micro-batches: global = the whole batch are the "
        "negatives (cached gradients); micro = each micro-batch alone (upstream's)",
        ("global", "micro"),
    )
    lr: float = opt(5e-5, "peak learning rate (AdamW)", ">0")
    warmup_steps: int = opt(0, "linear warmup steps", ">=0")
    weight_decay: float = opt(0.0, "AdamW weight decay", ">=0")
    grad_clip: float = opt(1.0, "max gradient norm (0 = off)", ">=0")
    seed: int = opt(42, "data order, masks, LoRA init, dropout", ">=0 and < 2**32")
    lora_r: int = opt(16, "LoRA rank", ">=1")
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling alpha / r)", ">0")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input", "in [0, 1)")
    lora_targets: list = opt(list(DEFAULT_TARGETS), "LoRA projections")
    lora_layers: list = opt(
        [], "layer numbers that get LoRA (empty = all); the backward stops below the lowest"
    )
    max_seq_length: int = opt(512, "MNTP block length; contrastive: tokens per text", ">=2")
    mask_probability: float = opt(0.2, "MNTP: share of tokens masked", "in (0, 1)")
    mask_token: str = opt(
        "blank",
        "MNTP mask token: '_' (upstream's), EOS, or auto: the tokenizer's own (Gemma's <mask>) else '_'",
        ("blank", "eos", "auto"),
    )
    mask_mode: str = opt("80_10_10", "MNTP masking", ("80_10_10", "all_mask"))
    attention_dropout: float = opt(0.0, "attention dropout (SimCSE: 0.3)", "in [0, 1)")
    pooling: str = opt("mean", "contrastive pooling", POOLING_MODES)
    prompt: str = opt("", "contrastive: template around each text with one {text} slot (e.g. PromptEOL)")
    instruction: str = opt("", "SimCSE, cosent: instruction before each text (supervised: the triples' own)")
    scale: float = opt(20.0, "contrastive: cosine x scale (20 SimCSE and cosent, 50 supervised)", ">0")
    weights_dtype: str = opt(
        "float32", "frozen base weights (LoRA weights stay float32)", ("float32", "bfloat16")
    )
    autocast: str = opt(
        "auto",
        "matmul dtype; auto: bf16 where fast (GPUs, AVX512-BF16/AMX CPUs)",
        ("auto", "bfloat16", "float16", "none"),
    )
    gradient_checkpointing: bool = opt(False, "recompute layers in the backward: less memory, more time")
    compile: bool = opt(False, "torch.compile the model")
    log_every: int = opt(10, "steps between log lines (mean loss since the last one)", ">=1")
    eval_every: int = opt(0, "steps between evaluations (0 = at the end only)", ">=0")
    eval_batches: int = opt(8, "micro-batches of eval_file per evaluation", ">=1")
    save_every: int = opt(0, "steps between checkpoints (0 = only final/)", ">=0")
    keep_checkpoints: int = opt(2, "newest checkpoints kept", ">=1")
    resume: bool = opt(False, "continue from the newest intact checkpoint in output_dir")
    resume_other_data: bool = opt(False, "resume although train_file differs from the checkpoint's")
    overwrite: bool = opt(False, "delete an earlier run's files in output_dir first")
    merge_out: str = opt("", "also write a merged HF folder (base + init adapters + this LoRA)")
    progress: bool = opt(True, "progress bar (when stderr is a terminal)")

    def to_dict(self) -> dict:
        return asdict(self)

    def local(self) -> TrainConfig:
        """Hub ids in `model` and `init_adapter` -> their snapshot folders (`l2v.hub`; downloaded if
        needed)."""
        from .hub import resolve

        adapters = [str(resolve(a, "adapter")) for a in self.init_adapter]
        return replace(self, model=str(resolve(self.model, "model")), init_adapter=adapters)

    def for_world(self, world: int) -> TrainConfig:
        """micro_batch_size 0 resolved to batch_size / ranks (no accumulation), and the split checked."""
        mb = self.micro_batch_size or self.batch_size // world
        if mb == 0 or self.batch_size % (world * mb):
            raise UserError(
                f"--batch_size {self.batch_size} / --micro_batch_size {mb}: must split over {world} rank(s) "
                f"x micro_batch_size {mb}"
            )
        return replace(self, micro_batch_size=mb)


OPTIONS = {f.name: f.metadata for f in fields(TrainConfig)}
DEFAULTS = TrainConfig().to_dict()
# What may differ when resuming; any other change would silently train something else.
RESUMABLE = {
    "output_dir",
    "train_file",  # a checkpoint records the file's sha256: moving it is fine, changing it is refused
    "max_steps",
    "stop_after_n_steps",
    "device",
    "log_every",
    "eval_every",
    "eval_batches",
    "eval_file",
    "eval_sts_file",
    "save_every",
    "keep_checkpoints",
    "resume",
    "overwrite",
    "merge_out",
    "progress",
    "compile",
    "gradient_checkpointing",
    "resume_other_data",
}
LIST_ITEMS = {"init_adapter": str, "lora_targets": str, "lora_layers": int}
BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
KIND = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}


def demo_preset(objective: str) -> Path:
    return REPO / "configs" / objective / "smollm2-135m.json"


def from_string(key: str, raw: str):
    """A command-line string -> the type of the key's default."""
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            return BOOLS[raw.lower()]
        if isinstance(default, list):
            items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
            return [int(v) if LIST_ITEMS[key] is int and isinstance(v, str) else v for v in items]
        if "_" in raw and isinstance(default, (int, float)):  # int("1_0") is 10: Python's digit separator
            raise ValueError
        return type(default)(raw)
    except (ValueError, KeyError):
        raise UserError(f"--{key}: cannot read {raw!r} as {type(default).__name__}") from None


def check_value(key: str, value, where: str) -> None:
    """Type (a bool is not a number), finiteness, range or choices, and list items."""
    default, check = DEFAULTS[key], OPTIONS[key]["check"]
    want = (int, float) if type(default) is float else type(default)
    if not isinstance(value, want) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise UserError(f"{where}: expected {KIND[type(default)]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value}")
    if isinstance(check, tuple) and value not in check:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(check)}")
    if isinstance(check, str) and not CHECKS[check](value):
        raise UserError(f"{where}: must be {check}, got {value}")
    if isinstance(value, list):
        item = LIST_ITEMS[key]
        bad = [
            v
            for v in value
            if not isinstance(v, item) or isinstance(v, bool) or (item is str and not v.strip())
        ]
        if bad:
            raise UserError(f"{where}: every item must be a non-empty {item.__name__}, got {bad[0]!r}")
        if key == "lora_targets" and not value:
            raise UserError(f"{where}: needs at least one projection (e.g. {', '.join(DEFAULT_TARGETS)})")
        if len(set(value)) != len(value):
            raise UserError(f"{where}: repeated items in {value}")


def parse_config(argv: list[str], objectives=OBJECTIVES) -> TrainConfig:
    """defaults < the objective's defaults < --config JSON < --key value; every value checked. With no
    --config and no --train_file, the objective's demo preset (when its data is there)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="One training loop for the LLM2Vec stages; any key "
        "of a --config JSON can be given as --key value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.error = lambda message: fail("train.py", f"{message} (see --help)")  # one line, no usage block
    p.add_argument("--config", help="JSON file of the keys below (presets: configs/<objective>/)")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    for key, meta in OPTIONS.items():
        check, value = meta["check"], DEFAULTS[key]
        choices = f"; one of {', '.join(check)}" if isinstance(check, tuple) else ""
        choices = f"; one of {', '.join(objectives)}" if key == "objective" else choices
        p.add_argument(
            f"--{key}",
            metavar=type(value).__name__.upper(),
            help=f"{meta['help']} (default: {json.dumps(value)}{choices})",
        )
    args = p.parse_args(argv)
    flags = {k: from_string(k, v) for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    config = args.config
    if config is None and "train_file" not in flags:
        config = str(pick_demo_preset(flags.get("objective", DEFAULTS["objective"])))
    file_cfg = read_json(config) if config else {}
    if not isinstance(file_cfg, dict):
        raise UserError(f"{config}: expected a JSON object of config keys")
    file_cfg.pop("_comment", None)
    if set(file_cfg) - set(DEFAULTS):
        raise UserError(f"{config}: unknown config key(s) {sorted(set(file_cfg) - set(DEFAULTS))}")
    for key, value in file_cfg.items():  # a flag overriding a key leaves the file's value wrong all the same
        if key != "objective":
            check_value(key, value, f"{config}: {key}")
    if "objective" in file_cfg and not (
        isinstance(file_cfg["objective"], str) and file_cfg["objective"] in objectives
    ):
        raise UserError(
            f"{config}: objective: {file_cfg['objective']!r} is not one of {', '.join(objectives)}"
        )
    if "objective" in flags and "objective" in file_cfg and flags["objective"] != file_cfg["objective"]:
        raise UserError(
            f"--objective {flags['objective']}: {config} is a preset for {file_cfg['objective']!r} "
            f"(its settings would train {flags['objective']} wrongly); use configs/{flags['objective']}/"
        )
    objective = flags.get("objective", file_cfg.get("objective", DEFAULTS["objective"]))
    if not isinstance(objective, str) or objective not in objectives:
        where = "--objective" if "objective" in flags else f"{config}: objective"
        raise UserError(f"{where}: {objective!r} is not one of {', '.join(objectives)}")
    cfg = {**DEFAULTS, **objectives[objective].defaults, **file_cfg, **flags}
    for key, value in cfg.items():
        check_value(key, value, f"--{key}" if key in flags else f"{config}: {key}")
    for key in ("model", "output_dir", "train_file"):  # "" is Path("."), the current folder
        if not cfg[key].strip():
            where = f"--{key}" if key in flags else f"{config}: {key}" if key in file_cfg else f"--{key}"
            raise UserError(f"{where}: required, got {cfg[key]!r}")
    check_prompt(cfg["prompt"], "--prompt" if "prompt" in flags else f"{config}: prompt")
    if cfg["eval_every"] and not (cfg["eval_file"] or cfg["eval_sts_file"]):
        raise UserError("--eval_every: needs --eval_file or --eval_sts_file")
    if cfg["resume"] and cfg["overwrite"]:
        raise UserError("--resume, --overwrite: choose one")
    return TrainConfig(**cfg)


def pick_demo_preset(objective: str) -> Path:
    """Bare `train.py [--objective X]`: the objective's demo preset on the demo model, when the data it
    reads is there (`../shared/data`); else one line saying what to pass."""
    preset = demo_preset(objective)
    example = f"python train.py --objective {objective} --train_file YOUR_FILE" + (
        f", or its demo preset --config {preset.relative_to(REPO)} (reads ../shared/data)"
        if preset.is_file()
        else ""
    )
    if not preset.is_file() or not DATA_DIR.is_dir():
        raise UserError(f"--train_file: required (a .txt, .raw, .json or .jsonl file): {example}")
    if int(os.environ.get("RANK", "0") or 0) == 0:  # once under torchrun
        print(
            f"train.py: no --config or --train_file: the demo preset {preset.relative_to(REPO)} "
            f"(demo model, data from {DATA_DIR})",
            flush=True,
        )
    return preset
