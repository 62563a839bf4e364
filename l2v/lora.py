"""Hand-written LoRA (Hu et al. 2021) for `l2v.model.Transformer` (saved and loaded in PEFT's format by
`l2v.adapters`).

    y = x W^T + b + scaling * B(A(dropout(x)))     A: (r, in) kaiming-uniform, B: (out, r) zeros

`LoRALinear` keeps the frozen `weight`/`bias` under their own names (base keys unchanged, as torchtune),
names `lora_A`/`lora_B` as PEFT does, and merges only on an explicit `merge()`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # the decoder layer number in a module path


def keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A dropout keep mask shaped like x from `seed` alone; keep rate 1 - p, p rounded to 1/65536. Four 16-bit
    lanes per 64-bit draw: on CPU several times faster than per-element Bernoulli draws
    (docs/performance.md)."""
    g = torch.Generator(x.device).manual_seed(seed)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(
        -(2**63), None, generator=g
    )
    return words.view(torch.int16)[: x.numel()].view(x.shape) >= round(p * 65536) - 32768


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
        self.weight, self.bias = (
            base.weight,
            base.bias,
        )  # the same Parameter objects: keys and storage unchanged
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
        if (
            self.training and self.dropout_p > 0 and torch.compiler.is_compiling()
        ):  # traceable; the compiler plans memory
            return out + F.linear(F.linear(F.dropout(x, self.dropout_p), a), b.to(x.dtype))
        if (
            self.training and self.dropout_p > 0
        ):  # the seed comes from the CPU generator: seeded, checkpointed
            h = DroppedLinear.apply(x, a, self.dropout_p, int(torch.randint(2**62, ())))
            return out + F.linear(h, (b * self.keep_scale).to(x.dtype))
        return out + F.linear(F.linear(x, a), b.to(x.dtype))

    @torch.no_grad()
    def merge(self, sign: int = 1) -> None:
        """W += scaling * B @ A in float32 (sign -1: unmerge; on a bf16 base only up to bf16 rounding)."""
        if self.merged != (sign > 0):
            self.weight.copy_(
                self.weight.float()
                + sign * self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
            )
            self.merged = sign > 0


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
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


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets=DEFAULT_TARGETS,
    use_rslora: bool = False,
    layers=None,
) -> list[str]:
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
    paths = [
        n for n in linears if n.rpartition(".")[2] in targets and (layers is None or layer_of(n) in layers)
    ]
    for path in paths:
        set_module(model, path, LoRALinear(model.get_submodule(path), r, alpha, dropout, use_rslora))
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
        set_module(model, path, lin)
    return model
