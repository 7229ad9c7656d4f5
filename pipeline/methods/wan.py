"""WAN, weak assume negative: AN with the assumed negatives down-weighted by γ (Cole et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import wan_loss


@register_method("wan")
class WeakAssumeNegative(Method):
    @dataclass
    class Params:
        negative_weight: float | None  # γ; None = 1/(C − 1) as in Cole et al.

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        gamma = self.params.negative_weight
        self.gamma = 1.0 / max(ctx.num_classes - 1, 1) if gamma is None else gamma
        if self.gamma < 0:
            raise SpmlError(f"method_params.wan.negative_weight must be >= 0, got {gamma}")

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(wan_loss(logits, batch.positives, self.gamma))

    def describe(self):
        return {**super().describe(), "negative_weight_used": self.gamma}
