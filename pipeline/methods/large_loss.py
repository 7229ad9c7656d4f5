"""Shared machinery of the large-loss methods (Kim et al. 2022): LL-R, LL-Ct, LL-Cp and BoostLU.

Not a method itself (nothing is registered here); ``ll_r``, ``ll_ct``, ``ll_cp`` and ``boostlu`` each
register one. Per batch, the unannotated entries are ranked by their exact logit BCE under AN; the
k largest (ties at the k-th value included) are rejected (loss 0) or corrected (target flipped to 1).
The final loss is the mean over all B·C entries, rejected zeros included.

* schedule ``growing`` (LL-R, LL-Ct): k = ceil(B·C·(e − 1)·Δ/100) in epoch e;
* schedule ``fixed`` (LL-Cp): k = ceil(B·C·Δ/100) from epoch 2 on, and the corrected entries are set
  to positive *permanently* after the optimizer step (the intended LL-Cp of the BoostLU code, not the
  accidental LL-Ct behaviour of the LargeLossMatters HEAD). The flips are method state keyed by the
  training row, saved with the checkpoint.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method
from pipeline.methods.losses import large_loss_count, large_loss_mask
from pipeline.methods.sync import all_reduce_

Scheme = Literal["reject", "temporary", "permanent"]


class LargeLossMethod(Method):
    """Subclasses set ``Params`` with ``delta_percent`` (and optionally ``scheme``)."""

    # Δ: the rejected/corrected share grows by Δ percent of B·C per epoch (LL-Cp: Δ percent per batch, so
    # also Δ percent of the entries per epoch)
    schedules: ClassVar[dict[str, str]] = {"delta_percent": "per_epoch"}

    scheme: ClassVar[Scheme] = "reject"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.scheme = getattr(self.params, "scheme", type(self).scheme)
        if self.params.delta_percent < 0:
            raise SpmlError(f"method_params.{self.name}.delta_percent must be >= 0, got {self.params.delta_percent}")
        # LL-Cp: entries permanently switched to positive (a separate table; the dataset is never edited)
        self.flips = torch.zeros(ctx.observed_train.shape, dtype=torch.bool, device=ctx.device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def logits(self, model, images: torch.Tensor) -> torch.Tensor:
        return model(images).logits

    @torch.no_grad()
    def predict(self, model, images):
        return self.logits(model, images)

    def training_step(self, model, batch, epoch):
        logits = self.logits(model, batch.image)
        permanent = self.scheme == "permanent"
        y = batch.positives
        flipped = self.flips[batch.index] & (y == 0) if permanent else torch.zeros_like(y, dtype=torch.bool)
        y = torch.where(flipped, torch.ones_like(y), y)
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        unobserved = y == 0
        k = large_loss_count(loss.numel(), epoch, self.params.delta_percent, fixed=permanent)
        large = large_loss_mask(loss, unobserved, k)
        if self.scheme == "reject":
            loss = torch.where(large, torch.zeros_like(loss), loss)
        else:  # corrected: the target of a large-loss entry is flipped (0 -> 1)
            corrected = F.binary_cross_entropy_with_logits(logits, 1 - y, reduction="none")
            loss = torch.where(large, corrected, loss)
        if permanent:
            self._pending = (batch.index, large)
        return StepOutput(loss.mean(), {"ll_k": torch.tensor(float(k), device=loss.device),
                                        "ll_large_fraction": large.float().mean()}, flagged=large | flipped)

    def after_optimizer_step(self, batch, epoch):
        if self._pending is not None:
            index, large = self._pending
            self.flips[index] |= large
            self._pending = None

    def on_epoch_end(self, epoch, model, batches):
        if self.scheme == "permanent":  # DDP: each rank flipped rows of its own shard; combine them
            self.flips |= all_reduce_(self.flips.to(torch.uint8), "max").bool()

    def state_dict(self):
        return {"flips": self.flips} if self.scheme == "permanent" else {}

    def load_state_dict(self, state):
        if "flips" in state:
            self.flips.copy_(state["flips"].to(self.flips.device))
