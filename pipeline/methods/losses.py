"""The baselines' loss formulas as plain functions, exactly as the spec states them.

Two conventions, kept apart on purpose (``/work/shared/specs/baselines.md``, notation):

* **Cole / Zhou** (AN-LS, WAN, EPR, ROLE, EM, APL): probabilities f = σ(z) with the "Cole log"
  ℓ⁺(p) = −log(p + ε), ℓ⁻(p) = −log(1 − p + ε), ε = 1e-5; the B×C loss matrix is summed and divided
  by B·C (entries with no loss count as 0 but stay in the denominator).
* **LargeLossMatters / BoostLU / LAC** (LL-*, BoostLU, PLC): the exact logit BCE, no ε.

Every function takes a (B, C) matrix and returns a scalar unless it says otherwise. Observed labels
``y`` are the {0, 1} observed-positive matrix (1 = the single observed positive, 0 = unannotated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5  # Cole et al.'s epsilon inside the logs


def log_pos(p: torch.Tensor) -> torch.Tensor:
    """ℓ⁺(p) = −log(p + ε)."""
    return -torch.log(p + EPS)


def log_neg(p: torch.Tensor) -> torch.Tensor:
    """ℓ⁻(p) = −log(1 − p + ε)."""
    return -torch.log(1 - p + EPS)


def soft_bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Entry-wise BCE(p; t) = t·ℓ⁺(p) + (1 − t)·ℓ⁻(p) (Cole log)."""
    return target * log_pos(p) + (1 - target) * log_neg(p)


def mean_over_entries(matrix: torch.Tensor) -> torch.Tensor:
    """Σ/(B·C): the sum of the loss matrix over all B·C entries, zeros included."""
    return matrix.sum() / matrix.numel()


# --- Cole et al. 2021 ---------------------------------------------------------------------------------

def an_ls_loss(logits: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    """AN with symmetric label smoothing: targets 1 − ρ for observed positives and ρ for the rest."""
    p = torch.sigmoid(logits)
    pos = (1 - rho) * log_pos(p) + rho * log_neg(p)
    neg = (1 - rho) * log_neg(p) + rho * log_pos(p)
    return mean_over_entries(y * pos + (1 - y) * neg)


def wan_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weak AN: the assumed-negative entries weighted by γ (Cole: 1/(C − 1)), positives by 1."""
    p = torch.sigmoid(logits)
    return mean_over_entries(y * log_pos(p) + gamma * (1 - y) * log_neg(p))


def expected_positive_regulariser(p: torch.Tensor, k: float) -> torch.Tensor:
    """R(p) = ((1/B) Σ_n Σ_i p_ni − k)² / C²: batch-mean predicted label count against k."""
    return (p.sum(dim=1).mean() - k) ** 2 / p.shape[1] ** 2


def epr_loss(logits: torch.Tensor, y: torch.Tensor, k: float) -> torch.Tensor:
    """EPR: ℓ⁺ on the observed positives only, Σ/(B·C), plus R(f) with no extra weight."""
    p = torch.sigmoid(logits)
    return mean_over_entries(y * log_pos(p)) + expected_positive_regulariser(p, k)


def role_loss(f: torch.Tensor, g: torch.Tensor, y: torch.Tensor, k: float) -> torch.Tensor:
    """ROLE: classifier probabilities f and label estimates g = σ(Θ) of the batch rows.

    entry = ½[y·ℓ⁺(f) + y·ℓ⁺(g)] + ½[BCE(f; sg(g)) + BCE(g; sg(f))] over all B·C entries, Σ/(B·C),
    plus ½[R(f) + R(g)].
    """
    observed_terms = 0.5 * (y * log_pos(f) + y * log_pos(g))
    cross_terms = 0.5 * (soft_bce(f, g.detach()) + soft_bce(g, f.detach()))
    regulariser = 0.5 * (expected_positive_regulariser(f, k) + expected_positive_regulariser(g, k))
    return mean_over_entries(observed_terms + cross_terms) + regulariser


# --- Zhou et al. 2022 ---------------------------------------------------------------------------------

def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = −[p log(p + ε) + (1 − p) log(1 − p + ε)]."""
    return p * log_pos(p) + (1 - p) * log_neg(p)


def em_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float,
            pseudo_mask: torch.Tensor | None = None, pseudo_target: torch.Tensor | None = None,
            beta: float = 0.0) -> torch.Tensor:
    """EM (+ APL): ℓ⁺(f) on observed positives, −α·H(f) on unknowns, and, for pseudo-labelled
    entries, β·BCE(f; s) with the soft target s stored at labelling time. Σ/(B·C)."""
    p = torch.sigmoid(logits)
    unknown = 1 - y
    matrix = y * log_pos(p)
    if pseudo_mask is not None:
        labelled = pseudo_mask.to(p.dtype) * unknown
        matrix = matrix + beta * labelled * soft_bce(p, pseudo_target)
        unknown = unknown - labelled
    matrix = matrix - alpha * unknown * entropy(p)
    return mean_over_entries(matrix)


def apl_quota(initial_unknown: torch.Tensor, theta: float, epochs: int, warmup: int) -> torch.Tensor:
    """Per-class pseudo-negatives per round: int(θ · U_i / (E − W)), U_i = initial unknowns of class i."""
    return torch.floor(theta * initial_unknown.double() / (epochs - warmup)).long()


def lowest_k_per_class(probs: torch.Tensor, candidates: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """(N, C) bool: per column i, the ``quota[i]`` candidates with the lowest probability
    (fewer when fewer candidates remain)."""
    chosen = torch.zeros_like(candidates)
    masked = torch.where(candidates, probs, torch.full_like(probs, math.inf))
    order = masked.argsort(dim=0, stable=True)  # candidates first, lowest probability first
    take = torch.minimum(quota.to(probs.device), candidates.sum(dim=0))
    ranks = torch.arange(probs.shape[0], device=probs.device).unsqueeze(1)
    chosen.scatter_(0, order, ranks < take.unsqueeze(0))
    return chosen


# --- Kim et al. 2022 / 2023 ---------------------------------------------------------------------------

def large_loss_count(entries: int, epoch: int, delta_percent: float, fixed: bool = False) -> int:
    """k of the LL schedule for a batch of ``entries`` = B·C loss entries in epoch ``epoch`` (from 1), with
    the official code's arithmetic, floating point included.

    LL-R/LL-Ct: a ``clean_rate`` starts at 1.0 and has Δ/100 subtracted after every epoch; while it is
    still exactly 1.0 (epoch 1) nothing is selected, else k = ceil(B·C·(1 − clean_rate)). The repeated
    subtraction leaves float noise (1 − clean_rate = 0.018000000000000002 after Δ = 0.2 nine times), and
    the ceiling acts on it, as in the official code. LL-Cp (``fixed``, the BoostLU code's intended one):
    k = ceil(B·C·Δ/100) from epoch 2 on. Never more than the batch's entries.
    """
    if epoch < 2:
        return 0
    delta = delta_percent / 100
    if fixed:
        return min(entries, math.ceil(entries * delta))
    clean_rate = 1.0
    for _ in range(epoch - 1):
        clean_rate -= delta
    if clean_rate == 1.0:
        return 0
    return min(entries, math.ceil(entries * (1 - clean_rate)))


def large_loss_mask(loss: torch.Tensor, unobserved: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C) bool: unobserved entries whose loss is ≥ the k-th largest unobserved loss (ties included)."""
    if k <= 0:
        return torch.zeros_like(unobserved)
    ranked = (loss.detach() * unobserved).flatten()
    tau = torch.topk(ranked, k).values[-1]
    return unobserved & (loss.detach() >= tau)


def boostlu_logits(cam: torch.Tensor, alpha: float) -> torch.Tensor:
    """BoostLU: positive CAM values × α, then global average pooling → (B, C) logits."""
    return torch.where(cam > 0, cam * alpha, cam).mean(dim=(2, 3))


# --- ASL (Ridnik et al. 2021), under AN -----------------------------------------------------------------

def asl_loss(logits: torch.Tensor, y: torch.Tensor, gamma_pos: float, gamma_neg: float, clip: float,
             detach_focal_weight: bool = True, reduction: str = "sum") -> torch.Tensor:
    """−y(1−p)^γ₊ log(max(p, 1e-8)) − (1−y) p_m^γ₋ log(max(1 − p_m, 1e-8)), p_m = max(p − m, 0)."""
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    w_pos, w_neg = (1 - p) ** gamma_pos, p_m ** gamma_neg
    if detach_focal_weight:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    matrix = -y * w_pos * torch.log(p.clamp(min=1e-8)) - (1 - y) * w_neg * torch.log((1 - p_m).clamp(min=1e-8))
    return matrix.sum() if reduction == "sum" else matrix.mean()


# --- Xie et al. 2022: PLC -----------------------------------------------------------------------------

def plc_targets(weak_logits: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q = σ(z_w).detach() + y; confident mask m = [q ≥ τ or q < 1 − τ]; hard target t = [q ≥ τ]."""
    q = torch.sigmoid(weak_logits.detach()) + y
    target = q >= tau
    return target | (q < 1 - tau), target


def plc_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Σ m·BCE_logits(z_s, t) / Σ m over the confident entries (0 when there are none)."""
    mask, target = plc_targets(weak_logits, y, tau)
    bce = F.binary_cross_entropy_with_logits(strong_logits, target.to(strong_logits.dtype), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


# --- Chen et al. 2024: GR Loss (docs/methods/gr-loss.md); also the unobserved term of AEVLP's GPR loss ---

GR_EPS = 1e-7  # GR Loss's (and AEVLP's) epsilon inside the logs, not Cole's 1e-5


def gr_log_pos(p: torch.Tensor) -> torch.Tensor:
    """ℓ⁺(p) = −log(p + 1e-7)."""
    return -torch.log(p + GR_EPS)


def gr_log_neg(p: torch.Tensor) -> torch.Tensor:
    """ℓ⁻(p) = −log(1 − p + 1e-7)."""
    return -torch.log(1 - p + GR_EPS)


def gr_schedule(epoch: int, epochs: int, k_weight: list[float], k_bias: list[float], v_mean: list[float],
                v_std: list[float]) -> tuple[float, float, float, float]:
    """(w, b, μ, σ) of epoch ``epoch`` (from 1) of ``epochs`` (T), each moving linearly from its first value
    to its second, as the official code sets them at the start of an epoch (no linear-init epochs, n₀ = 0):

    w, b: v₀ + (v_T − v₀)·(e − 1)/T, so w_T and b_T are never reached; μ, σ: v₀ + (v_T − v₀)·e/T, so the
    first epoch already moves one step and the last one is at μ_T, σ_T."""
    lag = max(epoch - 1, 0) / epochs
    lead = max(epoch, 0) / epochs
    return (k_weight[0] + (k_weight[1] - k_weight[0]) * lag, k_bias[0] + (k_bias[1] - k_bias[0]) * lag,
            v_mean[0] + (v_mean[1] - v_mean[0]) * lead, v_std[0] + (v_std[1] - v_std[0]) * lead)


def gr_soft_label_and_weight(p: torch.Tensor, w: float, b: float, mu: float,
                             sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K = σ(w·f̄ + b), the soft pseudo-label, and V = exp(−(f̄ − μ)²/(2σ²)), the per-entry weight, from the
    probabilities with the gradient stopped (no gradient flows through K or V)."""
    p = p.detach()
    return torch.sigmoid(w * p + b), torch.exp(-((p - mu) ** 2) / (2 * sigma ** 2))


def gr_unobserved(p: torch.Tensor, soft_label: torch.Tensor, weight: torch.Tensor, q2: float,
                  q3: float) -> torch.Tensor:
    """Entry-wise V·[K·L₂(f) + (1 − K)·L₃(f)], L₂(f) = (1 − f^q₂)/q₂ (GCE towards 1), L₃(f) = (1 − (1 − f)^q₃)/q₃
    (GCE towards 0; q₃ = 1 gives f)."""
    positive = (1 - p ** q2) / q2
    negative = (1 - (1 - p) ** q3) / q3
    return weight * (soft_label * positive + (1 - soft_label) * negative)


def gr_pushes_up(soft_label: torch.Tensor, q2: float, q3: float) -> torch.Tensor:
    """(B, C) bool: entries whose GR term, at f = ½, decreases as f grows, i.e. the loss trains them towards a
    positive score: K·2^(1−q₂) > (1 − K)·2^(1−q₃) (d/df of K·L₂ + (1 − K)·L₃ at ½ is negative). With
    q₂ → 0 and q₃ = 1 this is K > 1/3. GR Loss's pseudo-positives for the false-negative diagnostics."""
    return soft_label * 2.0 ** (1 - q2) > (1 - soft_label) * 2.0 ** (1 - q3)


def gr_loss(logits: torch.Tensor, y: torch.Tensor, w: float, b: float, mu: float, sigma: float, q2: float,
            q3: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GR Loss: ℓ⁺(f) on the observed positives, V·[K·L₂ + (1 − K)·L₃] on the unobserved entries, Σ/(B·C).

    Returns the loss and K, V (for the diagnostics)."""
    p = torch.sigmoid(logits)
    soft_label, weight = gr_soft_label_and_weight(p, w, b, mu, sigma)
    matrix = y * gr_log_pos(p) + (1 - y) * gr_unobserved(p, soft_label, weight, q2, q3)
    return mean_over_entries(matrix), soft_label, weight
