"""VLPL, vision-language pseudo-labels (Xing et al., CVPR Workshops 2024; docs/methods/vlpl.md).

A frozen CLIP scores each training image against every class prompt; S = softmax(cos/τ) over the classes,
and the classes with S > θ (strict) become positive pseudo-labels. Per entry: the observed positive gets
ℓ⁺(f); an unannotated pseudo-positive gets β₊·BCE(f; 0.9) (a smoothed target); every other unannotated
entry gets Zhou et al.'s −α·H(f). Σ/(B·C), Cole-style logs (ε = 1e-5). No negative pseudo-labels (the
released ResNet-50 code has them switched off) and no state across steps.

The cosines come from stage ``clip-scores`` (data/clip/<dataset>/vlpl/, :mod:`pipeline.clip_scores`): the
official code runs CLIP on every step on the classifier's own (randomly flipped) input; the table holds
each image unflipped and flipped, and a step draws the flip per image (independently of the classifier
view's flip, which a method cannot see).

Diagnostics: ``flagged`` = the unannotated entries pseudo-labelled positive. ``clip_meaningful`` (history)
is 0 when the CLIP weights were random (the all-methods CPU table), and the report marks such rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from pipeline.clip_scores import clip_score_files, read_clip_scores
from pipeline.config import Range
from pipeline.contracts import StepOutput
from pipeline.methods import Method, register_method
from pipeline.methods.losses import entropy, log_pos, mean_over_entries, soft_bce


def vlpl_pseudo_positives(cosines: torch.Tensor, temperature: float, threshold: float) -> torch.Tensor:
    """(B, C) bool: softmax(cos/τ) over the classes, strictly above θ."""
    return torch.softmax(cosines.float() / temperature, dim=1) > threshold


def vlpl_loss(logits: torch.Tensor, y: torch.Tensor, pseudo: torch.Tensor, alpha: float, positive_weight: float,
              positive_target: float) -> torch.Tensor:
    """EM_PL: ℓ⁺(f) on observed positives, β₊·BCE(f; t) on unannotated pseudo-positives, −α·H(f) on the other
    unannotated entries; Σ/(B·C). An observed positive stays an observed positive whatever CLIP says."""
    p = torch.sigmoid(logits)
    pseudo = pseudo.to(p.dtype) * (1 - y)
    unknown = 1 - y - pseudo
    target = torch.full_like(p, positive_target)
    matrix = y * log_pos(p) + positive_weight * pseudo * soft_bce(p, target) - alpha * unknown * entropy(p)
    return mean_over_entries(matrix)


@register_method("vlpl")
class VisionLanguagePseudoLabels(Method):
    schedules: ClassVar[dict[str, str]] = {"warmup_epochs": "epochs"}

    @dataclass
    class Params:
        alpha: Annotated[float, Range(ge=0)]  # α: weight of the entropy term on the other unknowns
        positive_weight: Annotated[float, Range(ge=0)]  # β₊: weight of the pseudo-positives' BCE
        positive_target: Annotated[float, Range(ge=0, le=1)]  # their smoothed target (0.9)
        temperature: Annotated[float, Range(gt=0)]  # τ of softmax(cos/τ) over the classes
        threshold: Annotated[float, Range(ge=0, le=1)]  # θ: pseudo-positive if the softmax score is > θ
        warmup_epochs: Annotated[int, Range(ge=0)]  # epochs of plain EM before the pseudo-labels (code: 0)

    @classmethod
    def input_files(cls, dataset):
        return clip_score_files(dataset, cls.name)  # the CLIP scores this method reads

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        scores = read_clip_scores(ctx.dataset, self.name, ctx.num_train, ctx.num_classes)
        self.global_cos = torch.from_numpy(scores.global_cos).to(ctx.device)  # (N, 2, C)
        self.clip_diagnostics = scores.diagnostics()

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        y = batch.positives
        p = self.params
        if epoch > p.warmup_epochs:
            flip = torch.randint(0, 2, batch.index.shape, device=self.global_cos.device)
            cosines = self.global_cos[batch.index.to(self.global_cos.device), flip].to(logits.device)
            pseudo = vlpl_pseudo_positives(cosines, p.temperature, p.threshold) & (y == 0)
        else:
            pseudo = torch.zeros_like(y, dtype=torch.bool)
        loss = vlpl_loss(logits, y, pseudo, p.alpha, p.positive_weight, p.positive_target)
        return StepOutput(loss, {"pseudo_positives_per_image": pseudo.float().sum(dim=1).mean()}, flagged=pseudo)

    def epoch_diagnostics(self):
        return dict(self.clip_diagnostics)
