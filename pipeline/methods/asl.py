"""ASL, asymmetric loss (Ridnik et al. 2021) under the assume-negative assumption.

No SPML repository implements it; the defaults are those of the reference loss class (γ₊ = 1,
γ₋ = 4, probability margin m = 0.05, focusing weight without gradient, sum reduction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import asl_loss


@register_method("asl")
class AsymmetricLossAN(Method):
    @dataclass
    class Params:
        gamma_pos: float  # γ₊
        gamma_neg: float  # γ₋
        clip: float  # m, the probability margin of the negatives
        detach_focal_weight: bool
        reduction: Literal["sum", "mean"]

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p = self.params
        if p.gamma_pos < 0 or p.gamma_neg < 0 or not 0 <= p.clip < 1:
            raise SpmlError(f"method_params.asl: gammas must be >= 0 and clip in [0, 1), got "
                            f"gamma_pos={p.gamma_pos}, gamma_neg={p.gamma_neg}, clip={p.clip}")

    def training_step(self, model, batch, epoch):
        p = self.params
        logits = model(batch.image).logits
        return StepOutput(asl_loss(logits, batch.positives, p.gamma_pos, p.gamma_neg, p.clip,
                                   p.detach_focal_weight, p.reduction))
