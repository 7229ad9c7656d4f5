"""Full-label BCE: the upper reference that sees every true label (Cole et al.'s "BCE" on clean labels).

``label_source = "full"``: the training loop hands this method the full labels as ``Batch.observed``; no
other method gets them.
"""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.contracts import StepOutput
from pipeline.methods import Method, register_method


@register_method("full")
class FullLabels(Method):
    label_source = "full"

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        return StepOutput(F.binary_cross_entropy_with_logits(logits, batch.observed))
