"""AEVLP, adaptive and efficient vision-language pseudo-labelling (Tran et al., ICCV 2025; docs/methods/aevlp.md).

**DAMP** pseudo-labels every step from frozen CLIP scores of the whole image (S^g) and of a g×g grid of tiles
(S^(j)), each a softmax(cos/τ) over the classes. Per image: an adaptive threshold η_n = min(η, S^g at the
observed positive); per class the tiles' max a, min b and mean m; the local score ŝ = ½(S^g + a) where
a > η_n, else ½(S^g + b); the top-k classes by ŝ with ŝ ≥ θ become positive, except those among the
r = ⌊ρ_neg·C⌋ classes with the lowest ½(S^g + m), which are vetoed. The released code turns no class
negative (the veto only removes positives), and neither does this module.

**GPR loss**: ℓ⁺(f) on the observed positive; (1 − V̂)·BCE(f; ρ) on an unannotated pseudo-positive, with
V̂ = clip(V, 1 − λ₁, 1 − λ₂); GR Loss's V·[K·L₂ + (1 − K)·L₃] on the other unannotated entries (K, V and the
schedules of :mod:`pipeline.methods.losses`); mean over B·C, plus λ_reg times the EPR regulariser
(mean predicted label count − k̄)²/C². Logs with ε = 1e-7.

The cosines come from stage ``clip-scores`` (data/clip/<dataset>/aevlp/): each view unflipped and flipped;
a step draws an independent flip for the whole image and for each tile, as the official views do.

Diagnostics: ``flagged`` = the unannotated pseudo-positives; ``damp_negative_error`` = the share of false
negatives among the vetoed (bottom-r, the code's "negative") unannotated entries; ``clip_meaningful`` = 0
for random CLIP weights (the report marks such rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from pipeline.clip_scores import clip_score_files, read_clip_scores
from pipeline.config import Range
from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, expected_positives, register_method
from pipeline.methods.losses import (
    expected_positive_regulariser,
    gr_log_neg,
    gr_log_pos,
    gr_schedule,
    gr_soft_label_and_weight,
    gr_unobserved,
    mean_over_entries,
)


def damp_pseudo_labels(global_probs: torch.Tensor, tile_probs: torch.Tensor, y: torch.Tensor, eta: float,
                       top_k: int, threshold: float, vetoed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DAMP on softmax scores: global (B, C), tiles (B, G, C), observed positives y (B, C).

    Returns (pseudo-positives, vetoed classes), both (B, C) bool; the observed positives are not removed
    from the first (the caller masks them: an observed positive stays one)."""
    # η_n = min(η, S^g at the observed positive); 0 for an image without one (scores are >= 0)
    eta_n = torch.clamp((global_probs * (y > 0)).amax(dim=1), max=eta)
    high, low, mean = tile_probs.amax(dim=1), tile_probs.amin(dim=1), tile_probs.mean(dim=1)
    local = 0.5 * (global_probs + torch.where(high > eta_n.unsqueeze(1), high, low))
    top = torch.zeros_like(local, dtype=torch.bool).scatter_(1, local.topk(top_k, dim=1).indices, True)
    positive = top & (local >= threshold)
    veto = torch.zeros_like(positive)
    if vetoed > 0:
        lowest = (0.5 * (global_probs + mean)).topk(vetoed, dim=1, largest=False).indices
        veto.scatter_(1, lowest, True)
    return positive & ~veto, veto


def gpr_loss(logits: torch.Tensor, y: torch.Tensor, pseudo: torch.Tensor, schedule: tuple[float, float, float, float],
             q2: float, q3: float, pseudo_weight: list[float], rho: float, reg_weight: float,
             k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPR loss (module docstring) and K, V. ``schedule`` = (w, b, μ, σ) of the epoch."""
    p = torch.sigmoid(logits)
    soft_label, weight = gr_soft_label_and_weight(p, *schedule)
    pseudo = pseudo.to(p.dtype) * (1 - y)
    other = 1 - y - pseudo
    clipped = weight.clamp(1 - pseudo_weight[0], 1 - pseudo_weight[1])  # V̂: the weight 1 − V̂ is in [λ₂, λ₁]
    smoothed = rho * gr_log_pos(p) + (1 - rho) * gr_log_neg(p)
    matrix = y * gr_log_pos(p) + pseudo * (1 - clipped) * smoothed + other * gr_unobserved(p, soft_label, weight,
                                                                                             q2, q3)
    return mean_over_entries(matrix) + reg_weight * expected_positive_regulariser(p, k), soft_label, weight


@register_method("aevlp")
class AdaptiveVisionLanguagePseudoLabels(Method):
    # GR Loss's schedules (losses.gr_schedule), over epoch / train.epochs: already progress
    schedules: ClassVar[dict[str, str]] = {"k_weight": "progress", "k_bias": "progress", "v_mean": "progress",
                                           "v_std": "progress"}

    @dataclass
    class Params:
        # GR Loss's part (method gr-loss): the official --beta, --alpha and --q2q3
        k_weight: list[float]  # [w0, wT]
        k_bias: list[float]  # [b0, bT]
        v_mean: list[float]  # [mu0, muT]
        v_std: list[float]  # [sigma0, sigmaT]
        q2: Annotated[float, Range(gt=0)]
        q3: Annotated[float, Range(gt=0)]
        pseudo_weight: list[float]  # [lambda1, lambda2]: a pseudo-positive's weight 1 - clip(V, 1-l1, 1-l2)
        rho: Annotated[float, Range(ge=0, le=1)]  # smoothed target of the pseudo-positives
        reg_weight: Annotated[float, Range(ge=0)]  # lambda_reg of the EPR regulariser
        expected_positives: float | None  # k-bar; null = the dataset's true mean positives (as epr)
        # DAMP
        temperature: Annotated[float, Range(gt=0)]  # tau of softmax(cos/tau) over the classes
        eta: Annotated[float, Range(ge=0, le=1)]  # cap of the adaptive per-image threshold
        threshold: Annotated[float, Range(ge=0, le=1)]  # theta: a top-k class is positive if s-hat >= theta
        top_k: Annotated[int, Range(ge=1)]
        negative_ratio: Annotated[float, Range(ge=0, le=1)]  # the floor(ratio * C) lowest classes are vetoed

    @classmethod
    def input_files(cls, dataset):
        return clip_score_files(dataset, cls.name)  # the CLIP scores this method reads

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p, where = self.params, f"method_params.{self.name}"
        for name in ("k_weight", "k_bias", "v_mean", "v_std", "pseudo_weight"):
            if len(getattr(p, name)) != 2:
                raise SpmlError(f"{where}.{name} must be a pair, got {getattr(p, name)!r}")
        if min(p.v_std) <= 0:
            raise SpmlError(f"{where}.v_std must be > 0 at both ends, got {p.v_std!r}")
        if not 0 <= p.pseudo_weight[1] <= p.pseudo_weight[0] <= 1:
            raise SpmlError(f"{where}.pseudo_weight must be [lambda1, lambda2] with 0 <= lambda2 <= lambda1 <= 1, "
                            f"got {p.pseudo_weight!r}")
        if p.top_k > ctx.num_classes:
            raise SpmlError(f"{where}.top_k must be at most the {ctx.num_classes} classes, got {p.top_k}")
        self.k = expected_positives(p.expected_positives, ctx, where)
        self.vetoed = math.floor(p.negative_ratio * ctx.num_classes)
        scores = read_clip_scores(ctx.dataset, self.name, ctx.num_train, ctx.num_classes)
        if scores.tile_cos.shape[1] == 0:
            raise SpmlError(f"method {self.name} needs tile scores: set clip.{self.name}.tiles >= 1 and rerun "
                            f"`spml clip-scores {ctx.dataset} {self.name}`")
        self.global_cos = torch.from_numpy(scores.global_cos).to(ctx.device)  # (N, 2, C)
        self.tile_cos = torch.from_numpy(scores.tile_cos).to(ctx.device)  # (N, G, 2, C)
        self.clip_diagnostics = scores.diagnostics()
        self.schedule = gr_schedule(1, ctx.epochs, p.k_weight, p.k_bias, p.v_mean, p.v_std)

    def on_epoch_start(self, epoch):
        p = self.params
        self.schedule = gr_schedule(epoch, self.ctx.epochs, p.k_weight, p.k_bias, p.v_mean, p.v_std)

    def pseudo_labels(self, index: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DAMP for the batch's rows, with a random flip for the whole image and for each tile."""
        p, device = self.params, self.global_cos.device
        index = index.to(device)
        tiles = self.tile_cos.shape[1]
        flip = torch.randint(0, 2, index.shape, device=device)
        tile_flip = torch.randint(0, 2, (len(index), tiles), device=device)
        global_cos = self.global_cos[index, flip]
        tile_cos = self.tile_cos[index.unsqueeze(1), torch.arange(tiles, device=device).unsqueeze(0), tile_flip]
        global_probs = torch.softmax(global_cos / p.temperature, dim=-1).to(y.device)
        tile_probs = torch.softmax(tile_cos / p.temperature, dim=-1).to(y.device)
        return damp_pseudo_labels(global_probs, tile_probs, y, p.eta, p.top_k, p.threshold, self.vetoed)

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        y = batch.positives
        p = self.params
        with torch.no_grad():
            positive, veto = self.pseudo_labels(batch.index, y)
        unobserved = y == 0
        pseudo = positive & unobserved
        loss, _, _ = gpr_loss(logits, y, pseudo, self.schedule, p.q2, p.q3, p.pseudo_weight, p.rho, p.reg_weight,
                              self.k)
        return StepOutput(loss, {"pseudo_positives_per_image": pseudo.float().sum(dim=1).mean()}, flagged=pseudo,
                          fn_share={"damp_negative_error": veto & unobserved})

    def epoch_diagnostics(self):
        w, b, mu, sigma = self.schedule
        return {**self.clip_diagnostics, "gr_w": w, "gr_b": b, "gr_mu": mu, "gr_sigma": sigma}

    def describe(self):
        return {**super().describe(), "expected_positives_used": self.k, "vetoed_classes": self.vetoed}
