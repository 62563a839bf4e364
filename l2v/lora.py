"""Hand-written LoRA (Hu et al. 2021) for `l2v.model.Transformer`, saved and loaded in PEFT's format.

    y = x W^T + b + scaling * B(A(dropout(x)))     A: (r, in) kaiming-uniform, B: (out, r) zeros

`LoRALinear` keeps the frozen `weight`/`bias` under their own names (base keys unchanged, as torchtune),
names `lora_A`/`lora_B` as PEFT does, and merges only on an explicit `merge()`. On disk an adapter is
PEFT's folder (`adapter_config.json`, `adapter_model.safetensors` with keys `base_model.model.<module
path>.lora_A.weight`); our module paths are HF `LlamaModel`'s, which llm2vec's published adapters wrap.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import hf_name_to_l2v, read_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
# Config options that change what the adapter computes and that we do not implement: refuse, never ignore.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "target_parameters",
               "trainable_token_indices", "layer_replication", "alora_invocation_tokens", "use_qalora",
               "exclude_modules")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # the decoder layer number in a module path


def keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A dropout keep mask shaped like x from `seed` alone; keep rate 1 - p, p rounded to 1/65536. Four 16-bit
    lanes per 64-bit draw: on CPU several times faster than per-element Bernoulli draws (docs/performance.md)."""
    g = torch.Generator(x.device).manual_seed(seed)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None, generator=g)
    return words.view(torch.int16)[:x.numel()].view(x.shape) >= round(p * 65536) - 32768


class DroppedLinear(torch.autograd.Function):
    """F.linear(x * keep_mask(x, p, seed), a) that saves x and the seed for the backward instead of the
    masked copy of x and the mask: the backward draws the mask again. The q/k/v adapters of a layer (and
    gate/up) share one saved x, so dropout keeps no more activations than LoRA without it."""

    @staticmethod
    def forward(ctx, x, a, p: float, seed: int):
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed = p, seed
        return F.linear(torch.where(keep_mask(x, p, seed), x, 0.0), a)  # `where`: no float copy of the mask

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        keep = keep_mask(x, ctx.p, ctx.seed)
        gx = torch.where(keep, (g @ a.to(g.dtype)).to(x.dtype), 0.0) if ctx.needs_input_grad[0] else None
        ga = g.flatten(0, -2).T @ torch.where(keep, x, 0.0).flatten(0, -2).to(g.dtype)
        return gx, ga.to(a.dtype), None, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: keys and storage unchanged
        # LoRA weights are float32 even on a bf16 base: small updates to low-precision weights get lost.
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # microsoft/LoRA's init
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts equal to the base
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
        self.dropout_p = dropout
        self.keep_scale = 65536 / (65536 - round(dropout * 65536))  # 1 / the exact keep rate
        self.merged = False
        self.train(base.training)  # a new module defaults to training mode: follow the model's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # Compute in the input's dtype (bf16 under autocast); `.to` keeps the grads flowing to fp32.
        # Scaling (and dropout's 1 / keep rate) go into the small (out, r) B, not the (..., out) output.
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight * self.scaling
        if self.training and self.dropout_p > 0 and torch.compiler.is_compiling():  # traceable; the compiler plans memory
            return out + F.linear(F.linear(F.dropout(x, self.dropout_p), a), b.to(x.dtype))
        if self.training and self.dropout_p > 0:  # the seed comes from the CPU generator: seeded, checkpointed
            h = DroppedLinear.apply(x, a, self.dropout_p, int(torch.randint(2 ** 62, ())))
            return out + F.linear(h, (b * self.keep_scale).to(x.dtype))
        return out + F.linear(F.linear(x, a), b.to(x.dtype))

    @torch.no_grad()
    def merge(self, sign: int = 1) -> None:
        """W += scaling * B @ A in float32 (sign -1: unmerge; on a bf16 base only up to bf16 rounding)."""
        if self.merged != (sign > 0):
            self.weight.copy_(self.weight.float() + sign * self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float()))
            self.merged = sign > 0


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def freeze_all_but_lora(model: nn.Module) -> None:
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def layer_of(path: str) -> int | None:
    m = LAYER.search(path)
    return int(m[1]) if m else None


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
             targets=DEFAULT_TARGETS, use_rslora: bool = False, layers=None) -> list[str]:
    """Swap every nn.Linear whose last name is in `targets` (and, if given, whose decoder layer number
    is in `layers`) for a LoRALinear; freeze all the rest."""
    if lora_modules(model):
        raise ValueError("model already has LoRA modules: call merge_lora(model) before adding new ones")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = sorted(set(targets) - {n.rpartition(".")[2] for n in linears})
    if unknown:
        raise ValueError(f"lora targets {unknown} match no linear layer of the model")
    n_layers = len(getattr(model, "layers", []))
    if layers is not None and not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"lora layers {sorted(layers)}: the model has layers 0..{n_layers - 1}")
    paths = [n for n in linears if n.rpartition(".")[2] in targets and (layers is None or layer_of(n) in layers)]
    for path in paths:
        _set_module(model, path, LoRALinear(model.get_submodule(path), r, alpha, dropout, use_rslora))
    freeze_all_but_lora(model)
    return paths


@torch.no_grad()
def merge_lora(model: nn.Module, paths=None) -> nn.Module:
    """Replace every LoRALinear (or those at `paths`) by a plain nn.Linear holding W + scaling * B @ A."""
    for path, m in lora_modules(model).items():
        if paths is not None and path not in paths:
            continue
        m.merge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias  # reuse the merged Parameters, flags included
        lin.train(m.training)
        _set_module(model, path, lin)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved key names."""
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str = "",
                 extra_config: dict | None = None) -> Path:
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
        peft_type="LORA", task_type=None, base_model_name_or_path=base_model_name_or_path, revision=None,
        inference_mode=True, r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=sorted({p.rpartition(".")[2] for p in mods}), exclude_modules=None,
        fan_in_fan_out=False, bias="none", use_rslora=next(iter(mods.values())).use_rslora,
        modules_to_save=None, init_lora_weights=True, layers_to_transform=None if all_layers else layers,
        layers_pattern=None if all_layers else "layers",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=False, lora_bias=False,
        layer_replication=None,
    )
    config.update(extra_config or {})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "adapter_config.json", "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's rule: a pattern matches a module whose path ends with it at a "." boundary.
    for pat, value in (patterns or {}).items():
        if any(re.fullmatch(rf"(?:.*\.)?(?:{pat})", p) for p in (path, "model." + path)):
            return value
    return default


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
        raise ValueError(f"{cfg_path}: unsupported LoRA option(s) {bad}; l2v implements plain LoRA and rsLoRA")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ValueError(f"{cfg_path}: missing or non-numeric {key!r}")
    if not weights_path.is_file():
        hint = " (only pickle adapter_model.bin found; l2v loads safetensors only)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights_path}: file not found{hint}")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise ValueError(f"{cfg_path}: unsupported layers_pattern {cfg['layers_pattern']!r} (l2v's layers are 'layers')")
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
            raise ValueError(f"{weights_path}: tensor {key!r} is for a layer outside layers_to_transform {layers}")
        found[path][m[2]] = t
    if unexpected:
        raise ValueError(f"{weights_path}: {len(unexpected)} key(s) match no linear layer of the model: "
                         + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
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
            raise ValueError(f"{weights_path}: shape mismatch for {path}: lora_A {tuple(A.shape)} / lora_B "
                             f"{tuple(B.shape)}, model and r={d['r']} need {want_A} / {want_B}")
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
        _set_module(model, path, lora)
    if merge:
        merge_lora(model, found)
    else:
        freeze_all_but_lora(model)
    return sorted(found)
