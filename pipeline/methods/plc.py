"""PLC, pseudo-labelling consistency (Xie et al. 2022, stage 1 of SPML-LAC), with the AN term.

The weak and strong views go through the network as one concatenated batch. The weak view's
probabilities plus the observed labels, q = σ(z_w).detach() + y, set hard targets t = [q ≥ τ] on the
confident entries m = [q ≥ τ or q < 1 − τ]; the strong view is trained on them with BCE normalised by
Σm. Loss = mean BCE(z_w, y) + λ·Σ m·BCE(z_s, t)/Σ m. Pseudo-labels are recomputed every step (no state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import plc_loss, plc_targets


@register_method("plc")
class PseudoLabelConsistency(Method):
    needs_strong_view = True

    @dataclass
    class Params:
        threshold: float  # τ (stage 1 of the official code; 0.9 in stage 2)
        plc_weight: float  # λ_plc

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if not 0.5 < self.params.threshold <= 1 or self.params.plc_weight < 0:
            raise SpmlError(f"method_params.plc: threshold must be in (0.5, 1] and plc_weight >= 0, got "
                            f"threshold={self.params.threshold}, plc_weight={self.params.plc_weight}")

    def training_step(self, model, batch, epoch):
        if batch.strong is None:
            raise SpmlError("method plc needs the strong view but the batch has none")
        y = batch.positives
        logits = model(torch.cat([batch.image, batch.strong])).logits
        weak, strong = logits.split(len(batch.image))
        an = F.binary_cross_entropy_with_logits(weak, y)
        consistency = plc_loss(weak, strong, y, self.params.threshold)
        with torch.no_grad():
            mask, target = plc_targets(weak, y, self.params.threshold)
        return StepOutput(an + self.params.plc_weight * consistency,
                          {"plc_loss": consistency.detach(), "plc_confident_fraction": mask.float().mean()},
                          flagged=target)  # the pseudo-positives among the unknowns
