"""EM, entropy maximisation on the unannotated labels (Zhou et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import em_loss


@register_method("em")
class EntropyMaximisation(Method):
    """ℓ⁺(f) on the observed positive, −α·H(f) on every unannotated entry, Σ/(B·C)."""

    @dataclass
    class Params:
        alpha: float  # weight of the entropy term

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if self.params.alpha < 0:
            raise SpmlError(f"method_params.{self.name}.alpha must be >= 0, got {self.params.alpha}")

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(em_loss(logits, batch.positives, self.params.alpha))
