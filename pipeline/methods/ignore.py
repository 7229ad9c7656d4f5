"""IGNORE (Song et al., ECCV 2024): information-gap-based false-negative loss rejection.

Per training step (``../shared/specs/ignore.md`` sections 2-3; equation numbers are the paper's):

1. weak view ``x`` -> logits ``z`` and CAM (with autograd); strong view ``x_s`` -> ``z_s`` (with autograd);
2. the CAM of each image's single observed positive (gathered with ``argmax``, no boolean indexing),
   normalised across the batch per pixel (``cam_norm: batch``, default: the official code's
   ``(A - min_n A) / max_n A``, checked against ``tests/golden/``) or per image (``cam_norm: image``,
   min-max over (h, w), what the paper presumably intends), bilinearly upsampled to the image size and
   thresholded with a strict ``> gamma`` (eq. 2; the code's 0.8 by default, the paper's 0.4 for ResNet-50
   in the ``ignore-paper`` preset); rows without an observed positive keep an all-ones mask;
3. the masked image ``x * M`` in normalised space (removed pixels become the ImageNet mean colour, eq. 3)
   goes through the model under ``torch.no_grad()`` (``masked_bn``: BatchNorm in train mode as the code,
   or eval mode) -> ``z_m``;
4. the gap ``G = |z - z_m|`` (eq. 4); ``tau`` <- EMA of the mean gap at the observed positives (eq. 5; the
   update is skipped for a batch with no observed positive, so tau is never NaN); ``mu`` <- per-class EMA
   of ``z`` averaged over all images as the code does (``mu_scope: unannotated`` follows eq. 6 instead);
5. after ``warmup_epochs`` epochs: reject the unannotated entries with ``G > tau`` and ``z > mu`` (eq. 7;
   the ``z > mu`` test is the "logit average threshold", dropped by the ``ignore-gap`` variant);
   observed positives are never rejected; rejected entries just leave the AN loss;
6. ``L = w_spbc * SPBC(weak) + w_ignore * L_IGNORE(strong) + w_reg * MSE(z_s, z)`` (eqs. 8, 9, 10, 11) with
   the IGNORE term normalised by the number of kept entries of the batch and the consistency term
   *minimised* (+MSE, gradients into both views), as in the official code.

Loss form: the official code writes every log as ``-log(p + 1e-5)`` on sigmoid probabilities
(``loss_form: eps``, default, the spec's official definition); ``loss_form: exact`` uses the exact
logit BCE (``binary_cross_entropy_with_logits``). They differ only where a probability saturates: the
``eps`` form bounds each entry's loss by -log(1e-5) = 11.5 and its gradient vanishes there.

Warm-up (``warmup_mode``): ``code`` trains the same three-term loss with rejection disabled (the
official code); ``an`` trains plain AN on the weak view (the paper's wording). In both, the masked
forward runs and tau/mu are updated from the first step, as in the code.

Every piece is a pure function below so that it can be tested against hand-computed values; the step
has no host-device synchronisation (no ``.item()``, no boolean indexing, no ``nonzero``).

The ablation rows of the paper's Table 3 are registered here as ablations of ``ignore`` that fix which
components run (``components``). Each has its own self-contained ``method_params`` block (params.yaml shares
IGNORE's values through a YAML anchor) and its cells are dvc.yaml's ``ablate`` stage (params ``ablations``),
which depends on this module:

* ``an-cons``: AN on the strong view + consistency (no masking, no SPBC, no rejection);
* ``ignore-gap``: + IGNORE + SPBC with the gap threshold only (``z > mu`` test off);
* ``ignore``: the full method (+ logit-average threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.contracts import Batch, StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.diagnostics import EpochMeans

LOG_EPS = 1e-5  # the official code's epsilon inside every log
NORM_EPS = 1e-12  # guards a constant CAM in the per-image min-max


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------
def positive_index(positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) {0,1} observed positives -> (class of each row's positive (B,) long, has_pos (B,) bool).

    SPML rows carry at most one observed positive, so ``argmax`` finds it without boolean indexing;
    for a row with none, the class is 0 and ``has_pos`` is False.
    """
    return positives.argmax(dim=1), positives.amax(dim=1) > 0


def gather_cam(cam: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) CAMs and (B,) class indices -> (B, h, w) CAM of each row's class."""
    b, _, h, w = cam.shape
    return cam.gather(1, cls.view(b, 1, 1, 1).expand(b, 1, h, w)).squeeze(1)


def normalize_cam_image(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max over (h, w) to [0, 1]; a constant map becomes all zeros."""
    flat = cam.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    return (cam - lo) / (hi - lo).clamp_min(NORM_EPS)


def normalize_cam_batch(cam: torch.Tensor, has_pos: torch.Tensor) -> torch.Tensor:
    """The official code's normalisation: across the batch's rows with a positive, separately per pixel,
    ``(A - min_n A) / max_n A`` (divided by the max, not the range). Rows without a positive take no part
    in the min/max (their output is meaningless; their mask is all ones anyway). A pixel whose max is 0
    gives NaN/inf as in the code; NaN never passes the ``> gamma`` test."""
    inf = torch.tensor(float("inf"), dtype=cam.dtype, device=cam.device)
    valid = has_pos.view(-1, 1, 1)
    lo = torch.where(valid, cam, inf).amin(dim=0, keepdim=True)
    hi = torch.where(valid, cam, -inf).amax(dim=0, keepdim=True)
    return (cam - lo) / hi


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear with align_corners=False (the official code)."""
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def binary_mask(cam_up: torch.Tensor, gamma: float, has_pos: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with a strict ``>``; rows without an observed positive keep everything. Float (B, H, W)."""
    return ((cam_up > gamma) | ~has_pos.view(-1, 1, 1)).to(cam_up.dtype)


def positive_mask(cam: torch.Tensor, positives: torch.Tensor, image_size: tuple[int, int], gamma: float,
                  norm: str = "batch") -> torch.Tensor:
    """The whole mask pipeline: gather the positive's CAM, normalise, upsample, threshold."""
    cls, has_pos = positive_index(positives)
    a = gather_cam(cam, cls).float()
    if norm == "image":
        a = normalize_cam_image(a)
    elif norm == "batch":
        a = normalize_cam_batch(a, has_pos)
    else:
        raise SpmlError(f"unknown cam normalisation {norm!r}; use image or batch")
    return binary_mask(upsample(a, image_size), gamma, has_pos)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 3 on the already-normalised image: removed pixels become 0 (the ImageNet mean colour)."""
    return image * mask.unsqueeze(1).to(image.dtype)


def masked_logits(model: nn.Module, image: torch.Tensor, bn_mode: str = "train") -> torch.Tensor:
    """The masked forward, without autograd. ``bn_mode='train'`` uses (and updates) batch statistics as
    the official code does; ``'eval'`` uses the running statistics for this pass only."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if bn_mode == "eval" else []
    modes = [m.training for m in bns]
    for m in bns:
        m.eval()
    try:
        with torch.no_grad():
            return model(image).logits
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


def logit_gap(logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Eq. 4: G = |z - z_m|, detached."""
    return (logits.detach() - masked.detach()).abs()


def ema(old: torch.Tensor, value: torch.Tensor, decay: float, valid: torch.Tensor | bool = True) -> torch.Tensor:
    """``decay * old + (1 - decay) * value`` where ``valid``, else ``old`` (no host sync)."""
    new = decay * old + (1.0 - decay) * value
    return torch.where(torch.as_tensor(valid, device=old.device), new, old)


def positive_gap_mean(gap: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean gap at the observed positives (the official ``mean(G[y == 1])``; eq. 5's sum / B for SPML)
    and whether the batch has any positive (to skip the tau update instead of poisoning it with NaN)."""
    count = positives.sum()
    return (gap * positives).sum() / count.clamp_min(1.0), count > 0


def update_tau(tau: torch.Tensor, gap: torch.Tensor, positives: torch.Tensor, decay: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One tau step (eq. 5). Returns (new tau, whether it was updated)."""
    mean, valid = positive_gap_mean(gap, positives)
    return ema(tau, mean, decay, valid), valid


def batch_logit_average(logits: torch.Tensor, positives: torch.Tensor, scope: str = "all"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class batch average of the weak logits: over all images (official code) or over the
    unannotated entries only (eq. 6). Returns (average (C,), per-class valid (C,) bool)."""
    z = logits.detach()
    if scope == "all":
        return z.mean(dim=0), torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    weight = 1.0 - positives
    count = weight.sum(dim=0)
    return (z * weight).sum(dim=0) / count.clamp_min(1.0), count > 0


def debias(value: torch.Tensor, decay: float, updates: torch.Tensor) -> torch.Tensor:
    """Adam-style bias correction of a zero-initialised EMA after ``updates`` updates."""
    correction = 1.0 - torch.pow(torch.as_tensor(decay, dtype=value.dtype, device=value.device), updates)
    return torch.where(updates > 0, value / correction.clamp_min(1e-12), value)


def rejection(gap: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, mu: torch.Tensor | None,
              observed: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (bool (B, C)): unannotated entries with ``G > tau`` and, when ``mu`` is given, ``z > mu``.
    Observed entries (positives, or observed negatives) are never rejected."""
    flagged = gap > tau
    if mu is not None:
        flagged = flagged & (logits.detach() > mu.view(1, -1))
    return flagged & (observed == 0)


def _log_terms(logits: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log p, -log(1 - p)) elementwise, in the official epsilon form or exactly."""
    if form == "eps":
        p = torch.sigmoid(logits)
        return -torch.log(p + LOG_EPS), -torch.log(1.0 - p + LOG_EPS)
    return F.softplus(-logits), F.softplus(logits)


def ignore_loss(logits: torch.Tensor, positives: torch.Tensor, keep: torch.Tensor, form: str = "eps"
                ) -> torch.Tensor:
    """Eq. 8: the AN loss over the kept entries, divided by their number S (positives included)."""
    pos, neg = _log_terms(logits, form)
    per_entry = positives * pos + (1.0 - positives) * neg
    keep = keep.to(per_entry.dtype)
    return (per_entry * keep).sum() / keep.sum().clamp_min(1.0)


def an_loss(logits: torch.Tensor, positives: torch.Tensor, form: str = "eps") -> torch.Tensor:
    """Eq. 1: the AN loss averaged over all B*C entries."""
    return ignore_loss(logits, positives, torch.ones_like(logits), form)


def spbc_loss(logits: torch.Tensor, positives: torch.Tensor, form: str = "eps") -> torch.Tensor:
    """Eq. 9: -log p at the observed positives, divided by their number (the code's divisor; the same as
    the paper's B when every row has a positive). 0 for a batch without positives."""
    pos, _ = _log_terms(logits, form)
    return (pos * positives).sum() / positives.sum().clamp_min(1.0)


def consistency_loss(logits: torch.Tensor, strong_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 10 with the code's sign: mean squared difference of the two views' logits, minimised,
    gradients into both views."""
    return F.mse_loss(strong_logits, logits)


# --------------------------------------------------------------------------------------------------
# The method and its Table 3 variants
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Components:
    """Which parts of the objective run (the rows of the paper's Table 3)."""

    consistency: bool = True  # + w_reg * MSE(z_s, z)
    ignore_spbc: bool = True  # masking, rejection (after warm-up) and SPBC
    logit_average: bool = True  # also require z > mu for a rejection


@register_method("ignore")
class Ignore(Method):
    schedules: ClassVar[dict[str, str]] = {"warmup_epochs": "epochs", "gap_decay": "step_decay",
                                           "avg_decay": "step_decay"}
    needs_strong_view = True
    needs_instances = True  # the loop scores the reported CAM mask on synthetic data (ignored where absent)
    components: ClassVar[Components] = Components()

    @dataclass
    class Params:
        # no defaults: params.yaml holds the official code's values (its README's ResNet-50 command),
        # which tests/test_golden.py checks against the official functions' outputs
        cam_threshold: float  # gamma, strict >
        cam_norm: Literal["image", "batch"]  # the official batch-wise one, or per-image min-max
        masked_bn: Literal["train", "eval"]  # BatchNorm mode of the masked (no-grad) forward
        warmup_epochs: int  # epochs 1..warmup_epochs reject nothing
        warmup_mode: Literal["code", "an"]  # code: three-term loss without rejection; an: plain AN
        gap_decay: float  # lambda of the tau EMA
        avg_decay: float  # lambda of the mu EMA
        bias_correction: bool  # divide the EMAs by 1 - lambda^t
        mu_scope: Literal["all", "unannotated"]  # mu averages all images (code) or eq. 6's unannotated
        ignore_weight: float
        spbc_weight: float
        reg_weight: float
        loss_form: Literal["eps", "exact"]  # -log(p + 1e-5) (official) or exact logit BCE
        diagnostics: bool  # report rejections, gaps and mask for the loop's diagnostics (cheap, no sync)

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p = self.params
        for name in ("gap_decay", "avg_decay"):
            if not 0.0 <= getattr(p, name) < 1.0:
                raise SpmlError(f"params method_params.{self.name}.{name} must be in [0, 1), got {getattr(p, name)}")
        if p.warmup_epochs < 0:
            raise SpmlError(f"params method_params.{self.name}.warmup_epochs must be >= 0, got {p.warmup_epochs}")
        dev = ctx.device
        self.tau = torch.zeros((), device=dev)
        self.mu = torch.zeros(ctx.num_classes, device=dev)
        self.tau_updates = torch.zeros((), device=dev)
        self.mu_updates = torch.zeros(ctx.num_classes, device=dev)
        self.stats = EpochMeans(dev)  # mask_area and tau: per-epoch diagnostics that need no hidden labels

    # thresholds as used by the rejection rule (bias-corrected on request)
    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        if not p.bias_correction:
            return self.tau, self.mu
        return debias(self.tau, p.gap_decay, self.tau_updates), debias(self.mu, p.avg_decay, self.mu_updates)

    def update_thresholds(self, gap: torch.Tensor, logits: torch.Tensor, positives: torch.Tensor) -> None:
        p = self.params
        self.tau, tau_ok = update_tau(self.tau, gap, positives, p.gap_decay)
        self.tau_updates = self.tau_updates + tau_ok.to(self.tau_updates.dtype)
        avg, mu_ok = batch_logit_average(logits, positives, p.mu_scope)
        self.mu = ema(self.mu, avg, p.avg_decay, mu_ok)
        self.mu_updates = self.mu_updates + mu_ok.to(self.mu_updates.dtype)

    def training_step(self, model, batch: Batch, epoch: int) -> StepOutput:
        p, comp = self.params, self.components
        y = batch.positives
        warm = epoch <= p.warmup_epochs
        plain_an = warm and p.warmup_mode == "an"

        out = model(batch.image)  # forward 1: weak view, with autograd
        z = out.logits
        z_s = None
        if not plain_an:
            if batch.strong is None:
                raise SpmlError(f"method {self.name} needs the strong view but the batch has none")
            z_s = model(batch.strong).logits  # forward 2: strong view, with autograd

        logs: dict[str, torch.Tensor] = {}
        report: dict[str, Any] = {}
        keep = torch.ones_like(z)
        if comp.ignore_spbc:
            mask = positive_mask(out.cam.detach(), y, tuple(batch.image.shape[-2:]), p.cam_threshold, p.cam_norm)
            z_m = masked_logits(model, masked_image(batch.image, mask), p.masked_bn)  # forward 3, no grad
            gap = logit_gap(z, z_m)
            self.update_thresholds(gap, z, y)
            tau, mu = self.thresholds()
            flagged = rejection(gap, z, tau, mu if comp.logit_average else None, batch.observed)
            reject = flagged & (not warm)
            keep = (~reject).to(z.dtype)
            logs["reject_frac"] = reject.float().mean()
            if p.diagnostics:
                report = self._report(reject, gap, mask, tau)

        if plain_an:
            loss = an_loss(z, y, p.loss_form)
        else:
            loss = p.ignore_weight * ignore_loss(z_s, y, keep, p.loss_form)
            logs["loss_ignore"] = loss.detach()
            if comp.ignore_spbc:
                spbc = spbc_loss(z, y, p.loss_form)
                loss = loss + p.spbc_weight * spbc
                logs["loss_spbc"] = spbc.detach()
            if comp.consistency:
                reg = consistency_loss(z, z_s)
                loss = loss + p.reg_weight * reg
                logs["loss_reg"] = reg.detach()
        return StepOutput(loss, logs, **report)

    def _report(self, reject, gap, mask, tau) -> dict[str, Any]:
        """What the loop scores against the hidden labels (StepOutput's report fields); the mask area and
        tau need none and are kept here."""
        area = mask.mean(dim=(1, 2))  # same pixel count per image: the pooled mean is the mean of these
        self.stats.add_mean("mask_area", area, torch.ones_like(area))
        self.stats.set_value("tau", tau)
        return {"flagged": reject, "split_means": {"gap": gap}, "kept_region": mask}

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def epoch_diagnostics(self) -> dict[str, float]:
        if not self.stats.active:
            return {}
        out = self.stats.summary()
        # whether rejection was active this epoch (the report excludes warm-up epochs from its averages)
        out["fn_active"] = float(getattr(self, "_epoch", 0) > self.params.warmup_epochs)
        out["mu_mean"] = float(self.thresholds()[1].mean().item())
        return out

    def state_dict(self):
        return {"tau": self.tau, "mu": self.mu, "tau_updates": self.tau_updates, "mu_updates": self.mu_updates}

    def load_state_dict(self, state):
        if not state:
            return
        dev = self.ctx.device
        self.tau, self.mu = state["tau"].to(dev), state["mu"].to(dev)
        self.tau_updates, self.mu_updates = state["tau_updates"].to(dev), state["mu_updates"].to(dev)


@register_method("ignore-gap")
class IgnoreGapOnly(Ignore):
    """Table 3, row 3: consistency + IGNORE + SPBC with the gap threshold only (no ``z > mu`` test)."""

    components = Components(consistency=True, ignore_spbc=True, logit_average=False)
    ablation_of = "ignore"


@register_method("an-cons")
class AssumeNegativeConsistency(Ignore):
    """Table 3, row 2: the AN loss on the strong view + the consistency term; no masking, no SPBC."""

    needs_instances = False
    components = Components(consistency=True, ignore_spbc=False, logit_average=False)
    ablation_of = "ignore"

    def epoch_diagnostics(self) -> dict[str, float]:
        return {}
