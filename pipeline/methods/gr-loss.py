"""GR Loss, the generalized robust loss (Chen et al., IJCAI 2024; docs/methods/gr-loss.md).

Observed positives get ℓ⁺(f) = −log(f + 1e-7). Every unobserved entry gets V·[K·L₂(f) + (1 − K)·L₃(f)]:
L₂ and L₃ are GCE-style terms towards 1 and towards 0 (q₂ = 0.01 is close to CE, q₃ = 1 is the MAE f),
K = σ(w·f̄ + b) is a soft pseudo-label and V = exp(−(f̄ − μ)²/(2σ²)) a Gaussian weight, both from the
stopped-gradient probabilities f̄. The loss is the mean over all B·C entries. (w, b, μ, σ) are set at the
start of each epoch and move linearly from their first to their second value over the epochs
(:func:`pipeline.methods.losses.gr_schedule`, with the official code's off-by-one for w and b). No state
across steps.

Diagnostics: ``flagged`` = the unobserved entries the GR term currently trains towards a positive score
(:func:`~pipeline.methods.losses.gr_pushes_up`); K and V are split by observed positive / true negative /
false negative in the history (``gr_k_*``, ``gr_v_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pipeline.config import Range
from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import gr_loss, gr_pushes_up, gr_schedule


def check_gr_params(p, where: str) -> None:
    """The list params hold [start, end] pairs; σ stays positive over the schedule."""
    for name in ("k_weight", "k_bias", "v_mean", "v_std"):
        if len(getattr(p, name)) != 2:
            raise SpmlError(f"{where}.{name} must be [start, end], got {getattr(p, name)!r}")
    if min(p.v_std) <= 0:
        raise SpmlError(f"{where}.v_std must be > 0 at both ends, got {p.v_std!r}")


@register_method("gr-loss")
class GeneralizedRobustLoss(Method):
    # w, b, μ, σ move linearly over epoch / train.epochs (losses.gr_schedule): already progress
    schedules: ClassVar[dict[str, str]] = {"k_weight": "progress", "k_bias": "progress", "v_mean": "progress",
                                           "v_std": "progress"}

    @dataclass
    class Params:
        # the official --beta = [w0, wT, b0, bT], --alpha = [mu0, sigma0, muT, sigmaT], --q2q3 = [q2, q3]
        k_weight: list[float]  # [w0, wT]: slope of the soft pseudo-label K = sigmoid(w f + b)
        k_bias: list[float]  # [b0, bT]: its bias
        v_mean: list[float]  # [mu0, muT]: centre of the Gaussian weight V
        v_std: list[float]  # [sigma0, sigmaT]: its width
        q2: Annotated[float, Range(gt=0)]  # GCE exponent of the term towards 1
        q3: Annotated[float, Range(gt=0)]  # GCE exponent of the term towards 0

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        check_gr_params(self.params, f"method_params.{self.name}")
        self.schedule = gr_schedule(1, ctx.epochs, self.params.k_weight, self.params.k_bias, self.params.v_mean,
                                    self.params.v_std)

    def on_epoch_start(self, epoch):
        p = self.params
        self.schedule = gr_schedule(epoch, self.ctx.epochs, p.k_weight, p.k_bias, p.v_mean, p.v_std)

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        y = batch.positives
        loss, soft_label, weight = gr_loss(logits, y, *self.schedule, self.params.q2, self.params.q3)
        unobserved = y == 0
        return StepOutput(loss, flagged=gr_pushes_up(soft_label, self.params.q2, self.params.q3) & unobserved,
                          split_means={"gr_k": soft_label, "gr_v": weight})

    def epoch_diagnostics(self):
        w, b, mu, sigma = self.schedule
        return {"gr_w": w, "gr_b": b, "gr_mu": mu, "gr_sigma": sigma}
