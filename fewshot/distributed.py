"""torch.distributed helpers (torchrun launches, gloo on CPU, nccl on GPU)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_grads(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks (no-op in one process).

    Gradients are flattened into one buffer so a step costs one collective. A parameter
    without a gradient on this rank contributes zeros, so every rank issues the same call.
    """
    if not is_distributed():
        return
    params = [p for p in params]
    if not params:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad.reshape(-1))
    flat = torch.cat(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
