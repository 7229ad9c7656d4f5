"""What a method reported, scored against the hidden labels: the training loop's, never a method's.

A method only sees a :class:`~pipeline.contracts.Batch` (images and observed labels). What it did to the
unannotated entries it reports in its :class:`~pipeline.contracts.StepOutput`; the training loop (and the
bench) hold the batch's :class:`~pipeline.contracts.HiddenLabels` and call :func:`score_step`, which feeds a
:class:`FalseNegativeMeter` owned by the loop, one per epoch. This module sits beside the loop, outside
``pipeline/methods/``: no method module may import it (``pyproject.toml``'s import-linter contracts). Counts
stay on the device (no host sync per step) and are turned into precision / recall / F1 once per epoch:

* an *assumed negative* is an unannotated entry (observed label 0);
* a *false negative* is an assumed negative whose full label is 1;
* precision = false negatives among the flagged entries / flagged entries;
* recall = flagged false negatives / all false negatives seen;
* base rate = false negatives / assumed negatives (the precision of flagging at random);
* FN/TN ratio = flagged false negatives / flagged true negatives (the paper's Fig. 3b).

Quantities that need no hidden data (thresholds, mask areas...) stay with the method
(:class:`pipeline.methods.diagnostics.EpochMeans`, ``Method.epoch_diagnostics``).
"""

from __future__ import annotations

import torch

from pipeline.contracts import Batch, HiddenLabels, StepOutput
from pipeline.methods.diagnostics import EpochMeans


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
    """Score one step's report (see :class:`~pipeline.contracts.StepOutput`) against the hidden labels.

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
