"""DDP and seeded sampling.

* **DDP** (``torchrun --nproc_per_node N -m pipeline.cli train ...``): the global batch is
  ``train.batch_size`` split over the ranks; evaluation shards the eval set, gathers every prediction and
  computes mAP once (identically on every rank); only rank 0 writes outputs.
* **Seeded sampling** (:class:`EpochSampler`): the order of epoch ``e`` and the augmentation seed of every
  sample are functions of (run seed, e) only. The dataset augments each sample under its own seed, so
  results do not depend on the number of loader workers (persistent or not), on which worker draws a
  sample, or on being resumed, and DDP ranks shard one shared permutation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def env_rank() -> int:
    """This process's rank under torchrun (0 without it), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local)


def broadcast_buffers(ctx: DistContext, model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics diverge after the last local
    forward), so all ranks evaluate exactly the model rank 0 saves."""
    if ctx.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank; identity without DDP."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_arrays(ctx: DistContext, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all ranks (rank order); identity without DDP."""
    if not ctx.enabled:
        return arrays
    parts: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


class EpochSampler(Sampler):
    """Yields ``(row, sample_seed)``; a fresh permutation and fresh per-sample seeds every epoch.

    With ``world_size`` > 1 the permutation is padded (by wrapping, like DistributedSampler) to a
    multiple of the world size and rank r takes positions r, r + W, ... Without ``shuffle`` the rows
    come in order (evaluation) and each rank takes a contiguous-stride shard without padding.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        if self.shuffle and self.world_size > 1:
            total = -(-self.n // self.world_size) * self.world_size
            order = torch.cat([order, order[: total - self.n]]) if total > self.n else order
        return order[self.rank::self.world_size], seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._order()
        for i in order.tolist():
            yield i, int(seeds[i])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.shuffle:
            return (self.n + self.world_size - 1) // self.world_size
        return len(range(self.rank, self.n, self.world_size))
