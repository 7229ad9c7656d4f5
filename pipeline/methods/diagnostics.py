"""Diagnostics of what a method did, scored against the hidden labels by the training loop, never by a method.

A method only sees a :class:`~pipeline.methods.Batch` (images and observed labels). What it did to the
unannotated entries it reports in its :class:`~pipeline.methods.StepOutput`; the training loop (and the
bench) hold the batch's :class:`HiddenLabels` and call :func:`score_step`, which feeds a
:class:`FalseNegativeMeter` owned by the loop, one per epoch. Counts stay on the device (no host sync per
step) and are turned into precision / recall / F1 once per epoch:

* an *assumed negative* is an unannotated entry (observed label 0);
* a *false negative* is an assumed negative whose full label is 1;
* precision = false negatives among the flagged entries / flagged entries;
* recall = flagged false negatives / all false negatives seen;
* base rate = false negatives / assumed negatives (the precision of flagging at random);
* FN/TN ratio = flagged false negatives / flagged true negatives (the paper's Fig. 3b).

Quantities that need no hidden data (thresholds, mask areas...) stay with the method, which may keep
them in an :class:`EpochMeans` of its own and return them from ``Method.epoch_diagnostics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for annotations: this module is imported by pipeline.methods itself
    from pipeline.methods import Batch, StepOutput


@dataclass
class HiddenLabels:
    """The ground truth of one batch that a method must not see: only the training loop and the bench hold it."""

    full: torch.Tensor  # (B, C) float {0, 1}: the hidden full labels
    instances: torch.Tensor | None = None  # (B, H, W) uint8 instance map of the weak view (synthetic data)
    instance_classes: torch.Tensor | None = None  # (B, K) long class of instance k+1, -1 padding


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


class FalseNegativeMeter(EpochMeans):
    """False-negative identification counts (and the split means of :func:`score_step`) over one epoch."""

    def reset(self) -> None:
        super().reset()
        self.counted = False  # update() ran: the fn_* columns exist
        self.flagged = self._zero()
        self.flagged_fn = self._zero()
        self.false_negatives = self._zero()
        self.assumed_negatives = self._zero()

    def update(self, flagged: torch.Tensor, observed: torch.Tensor, full: torch.Tensor) -> None:
        """Count one batch. ``flagged`` (B, C) bool: entries the method rejected or relabelled."""
        self.active = self.counted = True
        unannotated = observed == 0
        false_negative = unannotated & (full > 0)
        flagged = flagged & unannotated
        self.flagged += flagged.sum()
        self.flagged_fn += (flagged & false_negative).sum()
        self.false_negatives += false_negative.sum()
        self.assumed_negatives += unannotated.sum()

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.counted:
            flagged, tp = self.flagged.item(), self.flagged_fn.item()
            fn, assumed = self.false_negatives.item(), self.assumed_negatives.item()
            precision = tp / flagged if flagged else 0.0
            recall = tp / fn if fn else 0.0
            out = {
                "fn_flagged": flagged,
                "fn_precision": precision,
                "fn_recall": recall,
                "fn_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                "fn_base_rate": fn / assumed if assumed else 0.0,
                "fn_tn_ratio": tp / (flagged - tp) if flagged - tp else 0.0,
            }
        out.update(super().summary())  # resets the counts too
        return out


@torch.no_grad()
def score_step(meter: FalseNegativeMeter, batch: Batch, out: StepOutput, hidden: HiddenLabels) -> None:
    """Score one step's report (see :class:`~pipeline.methods.StepOutput`) against the hidden labels.

    Runs under ``no_grad``, draws no random numbers and changes nothing the method or the model hold, so
    training is the same with or without it."""
    unannotated = batch.observed == 0
    if out.flagged is not None:
        meter.update(out.flagged, batch.observed, hidden.full)
    for name, values in out.split_means.items():
        negatives = unannotated.float()
        meter.add_mean(f"{name}_sp", values, batch.positives)
        meter.add_mean(f"{name}_tn", values, negatives * (hidden.full <= 0).float())
        meter.add_mean(f"{name}_fn", values, negatives * (hidden.full > 0).float())
    for name, entries in out.fn_share.items():  # mean full label of the set's unannotated entries
        meter.add_mean(name, hidden.full, entries & unannotated)
    if out.kept_region is not None and hidden.instances is not None and hidden.instance_classes is not None:
        kept, w_pos, removed, w_other = mask_coverage(out.kept_region, batch.positives, hidden.instances,
                                                      hidden.instance_classes)
        meter.add_mean("mask_pos_kept", kept, w_pos)
        meter.add_mean("mask_other_removed", removed, w_other)


def mask_coverage(mask: torch.Tensor, positives: torch.Tensor, instances: torch.Tensor,
                  instance_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How a kept-region mask treats the objects of a synthetic image (instance map of the weak view).

    Returns per-pixel (kept (B, H, W), weight of the positive object's pixels, removed, weight of the
    other objects' pixels), for pooled fractions ``sum(kept * w_pos) / sum(w_pos)`` (share of the
    single positive's object kept) and ``sum(removed * w_other) / sum(w_other)`` (share of the other
    objects removed). Rows without an observed positive get zero weight.
    """
    # SPML rows carry at most one observed positive: argmax finds its class (as ignore.positive_index)
    cls, has_pos = positives.argmax(dim=1), positives.amax(dim=1) > 0
    inst = instances.long()
    _b, k = instance_classes.shape
    slot = (inst - 1).clamp(0, k - 1).flatten(1)
    pixel_class = instance_classes.gather(1, slot).view_as(inst)
    pixel_class = torch.where(inst > 0, pixel_class, torch.full_like(pixel_class, -1))
    row = has_pos.view(-1, 1, 1)
    pos_pix = (pixel_class == cls.view(-1, 1, 1)) & row
    other_pix = (pixel_class >= 0) & ~pos_pix & row
    mask = mask.to(torch.float32)
    return mask, pos_pix.float(), 1.0 - mask, other_pix.float()
