"""What a training forward keeps for the backward, per decoder layer, at a big model's shapes on a CPU.

    python scripts/saved_activations.py                      # Llama-3-8B shapes, 16 x 512 tokens, bf16
    python scripts/saved_activations.py --lora_dropout 0.05 0 --width_divisor 8   # quicker, ~3% high

Every tensor autograd saves is counted once (unique storages; parameters excluded) with
`torch.autograd.graph.saved_tensors_hooks`, on real tensors at the full width and with fewer tokens:
activation sizes scale linearly with the tokens, so the counts scale back exactly, and a 2-layer minus a
1-layer model gives one layer's share. A `width_divisor` > 1 also narrows the model; that scales back all
but LoRA's rank-16 intermediates, which do not narrow. Run it on two checkouts to compare.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from l2v.lora import add_lora
from l2v.model import ModelConfig, Transformer  # noqa: E402


def saved_bytes(n_layers: int, args, dropout: float) -> int:
    w = args.width_divisor
    cfg = ModelConfig(
        vocab_size=1000,
        dim=4096 // w,
        n_layers=n_layers,
        n_heads=32 // w,
        n_kv_heads=8 // w,
        head_dim=128,
        intermediate_size=14336 // w,
        norm_eps=1e-5,
        is_causal=False,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    add_lora(model, r=16, alpha=32, dropout=dropout)
    model.train()
    params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (args.batch, args.tokens))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model(ids)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_dropout", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument(
        "--width_divisor", type=int, default=1, help="8B widths / this (it must divide 8 KV heads)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument(
        "--scale_to", type=int, nargs=2, default=[16, 512], metavar=("B", "T"), help="report at B x T tokens"
    )
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    if (
        args.width_divisor < 1
        or 8 % args.width_divisor
        or min(args.batch, args.tokens, *args.scale_to, args.layers) < 1
    ):
        p.error(
            "--width_divisor must divide 8 (the KV heads); "
            "--batch, --tokens, --scale_to, --layers must be positive"
        )
    if any(not 0 <= d < 1 for d in args.lora_dropout):
        p.error("--lora_dropout: each value must be in [0, 1)")
    scale = args.width_divisor * args.scale_to[0] * args.scale_to[1] / (args.batch * args.tokens) / 2**30
    for d in args.lora_dropout:
        layer = saved_bytes(2, args, d) - saved_bytes(1, args, d)
        print(
            f"lora_dropout {d}: {layer * scale:.3f} GiB per layer, {args.layers * layer * scale:.1f} GiB for "
            f"{args.layers} layers at {args.scale_to[0]} x {args.scale_to[1]} tokens "
            "(bf16, LoRA r16 on 7 projections)"
        )


if __name__ == "__main__":
    main()
