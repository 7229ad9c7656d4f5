"""EPR, expected positive regularisation (Cole et al. 2021): positives only, plus (mean label count − k)²/C²."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import StepOutput
from pipeline.methods import Method, expected_positives, register_method
from pipeline.methods.losses import epr_loss


@register_method("epr")
class ExpectedPositiveRegularisation(Method):
    @dataclass
    class Params:
        expected_positives: float | None  # k; None = true mean positives per training image

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.k = expected_positives(self.params.expected_positives, ctx, "method_params.epr")

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(epr_loss(logits, batch.positives, self.k))

    def describe(self):
        return {**super().describe(), "expected_positives_used": self.k}
