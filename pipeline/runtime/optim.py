"""How a step updates the weights beyond the optimizer: mixed precision, the LR schedule, the weight EMA."""

from __future__ import annotations

import contextlib
import copy

import torch

from pipeline.errors import SpmlError


def amp_dtype(enabled: bool, dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CPU only an explicit ``bf16`` autocasts (to measure its effect
    where there is no GPU; ``auto``, e.g. a GPU preset run on a CPU machine, stays fp32)."""
    if not enabled:
        return None
    if device.type != "cuda":
        return torch.bfloat16 if dtype == "bf16" and device.type == "cpu" else None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scheduler(kind: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    pct_start: float) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``none`` or ``onecycle`` (per-iteration OneCycleLR, max_lr = each group's lr, torch defaults)."""
    if kind == "none":
        return None
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=max(steps_per_epoch, 1), pct_start=pct_start)


class WeightEMA:
    """An exponential moving average of a model's weights *and* buffers, updated after every optimizer
    step (Xie et al.'s ModelEma, decay 0.9997): float entries move by ``decay``, integer ones (BatchNorm's
    counters) are copied. ``model`` is a frozen copy in eval mode that evaluation can use as a model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise SpmlError(f"params train.weight_ema must be in (0, 1) or null, got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_value, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)
