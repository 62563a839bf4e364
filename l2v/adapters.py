"""PEFT's LoRA adapter folder <-> `l2v.lora` modules: `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module path>.lora_A.weight`. Our module paths are HF `LlamaModel`'s, which
llm2vec's published adapters wrap, so adapters move both ways between l2v, peft and upstream llm2vec."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import TOKENIZER_FILES, hf_name_to_l2v, read_json, save_model_with
from .files import save_tensors, write_json
from .lora import LoRALinear, freeze_all_but_lora, layer_of, lora_modules, merge_lora, set_module

PREFIX = "base_model.model."
# Config options that change what the adapter computes and that we do not implement: refuse, never ignore.
UNSUPPORTED = (
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "exclude_modules",
)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved key names."""
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str = "",
    extra_config: dict | None = None,
) -> Path:
    """Write a PEFT LoRA folder that `peft.PeftModel.from_pretrained` and `load_adapter` both read."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA modules")
    if len({m.use_rslora for m in mods.values()}) > 1:
        raise ValueError("save_adapter: mixing rsLoRA and plain LoRA modules cannot be saved in one config")
    # The most common (r, alpha) goes in the config; other modules get exact-path patterns.
    r, alpha = Counter((m.r, m.alpha) for m in mods.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(p): m.r for p, m in mods.items() if m.r != r}
    alpha_pattern = {re.escape(p): m.alpha for p, m in mods.items() if m.alpha != alpha}
    dropout = next(iter(mods.values())).dropout_p
    layers = sorted({layer_of(p) for p in mods})
    all_layers = len(getattr(model, "layers", [])) == len(layers)
    config = dict(
        peft_type="LORA",
        task_type=None,
        base_model_name_or_path=base_model_name_or_path,
        revision=None,
        inference_mode=True,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted({p.rpartition(".")[2] for p in mods}),
        exclude_modules=None,
        fan_in_fan_out=False,
        bias="none",
        use_rslora=next(iter(mods.values())).use_rslora,
        modules_to_save=None,
        init_lora_weights=True,
        layers_to_transform=None if all_layers else layers,
        layers_pattern=None if all_layers else "layers",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=False,
        lora_bias=False,
        layer_replication=None,
    )
    config.update(extra_config or {})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "adapter_config.json", config)
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_tensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return folder


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's rule: a pattern matches a module whose path ends with it at a "." boundary.
    for pat, value in (patterns or {}).items():
        if any(re.fullmatch(rf"(?:.*\.)?(?:{pat})", p) for p in (path, "model." + path)):
            return value
    return default


def _rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _alpha(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_adapter_config(cfg: dict, path) -> None:
    """The values of adapter_config.json that change what the adapter computes: one error naming the key."""

    def bad(key, want):
        raise ValueError(f"{path}: {key!r} must be {want}, got {cfg.get(key)!r}")

    if not _rank(cfg.get("r")):
        bad("r", "an integer >= 1")
    if not _alpha(cfg.get("lora_alpha")):
        bad("lora_alpha", "a finite number > 0")
    dropout = cfg.get("lora_dropout") or 0.0
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        bad("lora_dropout", "a number in [0, 1)")
    for key, ok, want in (("rank_pattern", _rank, "integers >= 1"), ("alpha_pattern", _alpha, "numbers > 0")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
            bad(key, f"an object of {want}")
    targets = cfg.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or isinstance(targets, list)
        and all(isinstance(t, str) for t in targets)
    ):
        bad("target_modules", "a list of module names, a regex or null")
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        bad("use_rslora", "true or false")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if type(layers) is int else layers  # `type is`: a bool is not a layer number
    if layers is not None and not (
        isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers)
    ):
        bad("layers_to_transform", "a layer number >= 0, a list of them or null")


def read_adapter(folder: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, dict]]:
    """Read and check a PEFT LoRA folder against `model`: (config, {module path: {A, B, r, alpha, ...}})."""
    folder = Path(folder)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{cfg_path}: not a LoRA adapter config ({kind!r})")
    bad = [k for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if bad:
        raise ValueError(
            f"{cfg_path}: unsupported LoRA option(s) {bad}; l2v implements plain LoRA and rsLoRA"
        )
    check_adapter_config(cfg, cfg_path)
    if not weights_path.is_file():
        hint = (
            " (only pickle adapter_model.bin found; l2v loads safetensors only)"
            if (folder / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{weights_path}: file not found{hint}")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise ValueError(
            f"{cfg_path}: unsupported layers_pattern {cfg['layers_pattern']!r} (l2v's layers are 'layers')"
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # peft's regex form: the tensors decide what is adapted
        targets = []
    unknown = sorted(set(targets) - {n.rpartition(".")[2] for n in linears})
    if unknown:
        raise ValueError(f"{cfg_path}: target module(s) {unknown} match no linear layer of the model")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type for truncated or garbled files
        raise ValueError(f"{weights_path}: cannot be read as safetensors ({e})") from None
    found, unexpected = {}, []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for key, t in tensors.items():
        # base_model.model.[model.]<path>.lora_<A|B>[.default].weight; `model.` when saved from *ForCausalLM.
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        path = m and (m[1] if m[1] in linears else hf_name_to_l2v(m[1], model_type))
        if m and path is None:
            continue  # multimodal Gemma 3: the vision tower's adapter (l2v runs the language model only)
        if not m or path not in linears:
            unexpected.append(key)
            continue
        if m[2] in found.setdefault(path, {}):
            raise ValueError(f"{weights_path}: two tensors map to {path}.lora_{m[2]} (second: {key!r})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_path}: tensor {key!r} has NaN or infinite values")
        if layers is not None and layer_of(path) not in layers:
            raise ValueError(
                f"{weights_path}: tensor {key!r} is for a layer outside layers_to_transform {layers}"
            )
        found[path][m[2]] = t
    if unexpected:
        raise ValueError(
            f"{weights_path}: {len(unexpected)} key(s) match no linear layer of the model: "
            + ", ".join(unexpected[:10])
            + (" ..." if len(unexpected) > 10 else "")
        )
    half = sorted(p for p, d in found.items() if "A" not in d or "B" not in d)
    if half:
        raise ValueError(f"{weights_path}: module(s) with only one of lora_A/lora_B: {', '.join(half[:10])}")
    if not found:
        raise ValueError(f"{weights_path}: no LoRA tensors")
    already = sorted(p for p in found if isinstance(linears[p], LoRALinear))
    if already:
        raise ValueError(f"{weights_path}: model already has LoRA on {already[:5]}; merge_lora(model) first")
    for path, d in found.items():
        lin, A, B = linears[path], d["A"], d["B"]
        d["r"] = _pattern_value(cfg.get("rank_pattern"), path, cfg["r"])
        d["alpha"] = _pattern_value(cfg.get("alpha_pattern"), path, cfg["lora_alpha"])
        want_A, want_B = (d["r"], lin.in_features), (lin.out_features, d["r"])
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise ValueError(
                f"{weights_path}: shape mismatch for {path}: lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)}, model and r={d['r']} need {want_A} / {want_B}"
            )
    return cfg, found


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | os.PathLike, merge: bool = True) -> list[str]:
    """Apply a PEFT LoRA folder (ours, peft's, upstream llm2vec's); returns the adapted module paths.
    merge=True folds scaling * B @ A into the base weights; merge=False keeps LoRALinear modules and
    freezes the rest, ready to train on. Nothing is modified if any check fails."""
    cfg, found = read_adapter(folder, model)
    rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    for path, d in found.items():
        lora = LoRALinear(model.get_submodule(path), d["r"], d["alpha"], dropout, rslora)
        lora.lora_A.weight.copy_(d["A"])
        lora.lora_B.weight.copy_(d["B"])
        set_module(model, path, lora)
    if merge:
        merge_lora(model, found)
    else:
        freeze_all_but_lora(model)
    return sorted(found)


def save_merged(model: nn.Module, dest, base_folder, settings_folder, dtype=None) -> Path:
    """The model with its LoRA merged as an HF folder that transformers and l2v load: the base folder's
    tokenizer files and the settings files of `settings_folder` (how it encodes) go with it."""
    from .settings import SETTINGS_FILES

    files = [Path(base_folder) / f for f in TOKENIZER_FILES] + [
        Path(settings_folder) / f for f in SETTINGS_FILES
    ]
    return save_model_with(merge_lora(model), dest, files, dtype)
