"""AN, "assume negative": every unannotated label is a negative (Cole et al. 2021)."""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.contracts import StepOutput
from pipeline.methods import Method, register_method


@register_method("an")
class AssumeNegative(Method):
    """Binary cross-entropy against the observed labels with unannotated entries as 0, mean over B*C.

    The exact logit BCE (as LargeLossMatters and the IGNORE warm-up use) rather than Cole's
    -log(p + 1e-5), which differs only where the probability saturates.
    """

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(F.binary_cross_entropy_with_logits(logits, batch.positives))
