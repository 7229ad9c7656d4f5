"""Per-epoch values a method keeps about itself: :class:`EpochMeans`, on the device, read once per epoch.

For quantities that need no hidden data (IGNORE's threshold tau, its mask area...): a method accumulates them
here and returns ``summary()`` from ``Method.epoch_diagnostics``. What needs the hidden labels (the
false-negative scores of what a method reported) is the training loop's, in :mod:`pipeline.hidden_scoring`,
which no method module may import (``pyproject.toml``'s import-linter contracts).
"""

from __future__ import annotations

import torch


class EpochMeans:
    """Weighted means and latest values accumulated on the device, summarised (and reset) once per epoch."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.active = False
        self._means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._values: dict[str, torch.Tensor] = {}

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def add_mean(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate a weighted mean (e.g. the mean logit gap of false negatives) without syncing."""
        self.active = True
        total, count = self._means.setdefault(name, (self._zero(), self._zero()))
        total += (values.double() * weights.double()).sum()
        count += weights.double().sum()

    def set_value(self, name: str, value: torch.Tensor | float) -> None:
        """Record the latest value of a scalar (e.g. the gap threshold tau)."""
        self.active = True
        self._values[name] = torch.as_tensor(value).detach()

    def summary(self) -> dict[str, float]:
        """The epoch's means (NaN where nothing had weight) and latest values; then a reset."""
        out = {}
        for name, (total, count) in self._means.items():
            out[name] = (total / count).item() if count.item() else float("nan")
        for name, value in self._values.items():
            out[name] = float(value.float().mean().item())
        self.reset()
        return out
