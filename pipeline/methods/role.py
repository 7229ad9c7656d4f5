"""ROLE, regularised online label estimation (Cole et al. 2021).

A learnable logit table Θ (one row per training image, keyed by ``Batch.index``) holds the label
estimates g = σ(Θ). The classifier f and the estimator g teach each other through symmetric
stop-gradient BCE terms, both fit the observed positives, and both are pulled towards k expected
positives per image. Θ is optimised by the run's optimizer at ``lr_mult`` × lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, expected_positives, register_method
from pipeline.methods.losses import role_loss
from pipeline.methods.sync import average_gradient_hook


def _logit(p: float, clip: float = 1e-5) -> float:
    p = min(max(p, clip), 1 - clip)
    return math.log(p / (1 - p))


def initial_label_logits(observed: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Θ at the start: unannotated U(−logit 0.6, logit 0.6), observed positives logit(0.995),
    observed negatives (never in SPML) logit(0.005). Drawn on the CPU from the run's torch RNG
    (or ``generator``) so the table is the same on every device."""
    q = _logit(0.6)
    theta = (torch.rand(observed.shape, generator=generator) * 2 - 1) * q
    observed = observed.cpu()
    theta[observed > 0] = _logit(0.995)
    theta[observed < 0] = _logit(0.005)
    return theta


@register_method("role")
class RegularisedOnlineLabelEstimation(Method):
    @dataclass
    class Params:
        expected_positives: float | None  # k; None = true mean positives per training image
        lr_mult: float  # Θ's learning rate is lr_mult x lr
        estimate_threshold: float  # g >= this counts as "estimated positive" in the diagnostics

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.k = expected_positives(self.params.expected_positives, ctx, "method_params.role")
        if self.params.lr_mult <= 0:
            raise SpmlError(f"method_params.role.lr_mult must be > 0, got {self.params.lr_mult}")
        self.label_logits = torch.nn.Parameter(initial_label_logits(ctx.observed_train).to(ctx.device))
        # under DDP every rank keeps the whole table; averaging its gradient (as DDP does for the model)
        # keeps the tables and their Adam moments identical on all ranks
        self.label_logits.register_hook(average_gradient_hook)

    def parameter_groups(self, lr):
        # no weight decay on the estimates, whatever the model's optimizer uses
        return [{"params": [self.label_logits], "lr": lr * self.params.lr_mult, "weight_decay": 0.0}]

    def training_step(self, model, batch, epoch):
        f = torch.sigmoid(model(batch.image).logits)
        g = torch.sigmoid(self.label_logits[batch.index])
        y = batch.positives
        return StepOutput(role_loss(f, g, y, self.k), {"role_mean_estimate": g.detach().mean()},
                          flagged=g.detach() >= self.params.estimate_threshold)

    def state_dict(self):
        return {"label_logits": self.label_logits.detach()}

    def load_state_dict(self, state):
        if "label_logits" in state:
            with torch.no_grad():
                self.label_logits.copy_(state["label_logits"].to(self.label_logits.device))

    def describe(self):
        return {**super().describe(), "expected_positives_used": self.k}
