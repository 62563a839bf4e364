"""Process-group helpers for `torchrun`: every function is a no-op (or the identity) in a plain process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .checkpoint import resolve_device


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py`
    is rank 0 of 1. On GPUs each rank takes cuda:LOCAL_RANK (nccl); on CPUs gloo."""
    dev = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(x, device, item: bool = True):
    """Sum over ranks; as a Python float (a host synchronisation: log steps only) or a device tensor."""
    if not is_distributed():
        return float(x) if item else torch.as_tensor(x, dtype=torch.float32, device=device)
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item() if item else t.float()


class _AllGather(torch.autograd.Function):
    """Forward: every rank's x, concatenated in rank order. Backward: every rank computed the same loss
    from the gathered tensor, so the gradient of rank r's slice is the sum of all ranks' gradients for it
    (an all-reduce, then this rank's slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n, ...) from all ranks in rank order -> (world_size * n, ...); the identity when not
    distributed; every rank passes the same n. Without it each rank would contrast against its own slice
    only: DDP would shrink the pool of in-batch negatives. Every rank computes the same global loss L; the
    backward gives rank r world_size x dL/dslice_r, which DDP's averaging divides back: the exact gradient."""
    return _AllGather.apply(x) if is_distributed() else x
