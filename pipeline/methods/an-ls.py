"""AN-LS: assume negative with symmetric label smoothing (Cole et al. 2021, ``ls_coef`` ρ = 0.1)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import an_ls_loss


@register_method("an-ls")
class AssumeNegativeLabelSmoothing(Method):
    """BCE with targets 1 − ρ (observed positive) and ρ (unannotated), Cole log, Σ/(B·C)."""

    @dataclass
    class Params:
        smoothing: float  # ρ

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if not 0 <= self.params.smoothing < 0.5:
            raise SpmlError(f"method_params.an-ls.smoothing must be in [0, 0.5), got {self.params.smoothing}")

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(an_ls_loss(logits, batch.positives, self.params.smoothing))
