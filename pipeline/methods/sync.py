"""Keeping row-keyed method state identical across DDP ranks (no-ops in a single process).

Under ``torchrun`` every rank holds the whole state table but trains on its own shard of each epoch,
so a method that writes per-row state (LL-Cp's flips, APL's pseudo-labels, ROLE's label table) must
combine the ranks' writes. Nothing here is a method; ``pipeline.methods`` imports it like any module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) over the ranks; returns ``tensor``."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def average_gradient_hook(grad: torch.Tensor) -> torch.Tensor:
    """Tensor hook: average a gradient over the ranks, as DDP does for the model's parameters."""
    if world_size() > 1:
        grad = grad.clone()
        dist.all_reduce(grad)
        grad /= world_size()
    return grad
