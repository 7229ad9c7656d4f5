"""EPR, expected positive regularisation (Cole et al. 2021): positives only, plus (mean label count − k)²/C²."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import SpmlError
from pipeline.methods import Method, StepOutput, register_method
from pipeline.methods.losses import epr_loss


def expected_positives(k: float | None, ctx, where: str) -> float:
    """k from params, or (None) the dataset's true mean positives per training image from `prepare`."""
    value = ctx.mean_positives if k is None else k
    if not 0 < value <= ctx.num_classes:
        raise SpmlError(f"{where}.expected_positives must be in (0, {ctx.num_classes}], got {value}; "
                        "set it in params.yaml or rerun `spml prepare` to record the dataset's mean")
    return float(value)


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
