"""How much of a mean's seed spread comes from the test split's size: a variance decomposition.

A run's test mAP varies over seeds for two reasons: training (initialisation, the sampled single positives,
batch order) and the interaction of each model with the finite test sample (two models that rank the
same images differently disagree more on a small sample). Only the second shrinks with a larger test split.
Scoring every seed's checkpoint on random halves of the test split separates them: over seeds,

    Var(mAP on n images) = s_train^2 + s_sample^2 * N / n      (N: the whole test split)

so the half-split variance minus the whole-split variance estimates s_sample^2 (at N), and the rest is
s_train^2. ``scripts/seed_spread.py`` scores the run folders and prints this (docs/embedded-benchmark.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import mean_average_precision


@dataclass(frozen=True)
class Spread:
    seeds: int
    images: int  # N: the whole test split
    sd_whole: float  # sd (ddof=1) over seeds of the test mAP on all N images
    sd_half: float  # the same on N/2 images: the root of the mean variance over random halves
    sd_train: float  # what no test split removes
    sd_sample: float  # the test sample's part at N images

    def sd_at(self, factor: float) -> float:
        """Predicted seed sd with a test split ``factor`` times N (math.inf: an infinite one)."""
        return math.sqrt(self.sd_train ** 2 + (0.0 if math.isinf(factor) else self.sd_sample ** 2 / factor))

    def seeds_for(self, target_se: float, factor: float = 1.0) -> int:
        """Seeds for a standard error of the mean at most ``target_se`` with a ``factor`` x N test split."""
        return max(2, math.ceil((self.sd_at(factor) / target_se) ** 2))


def decompose(scores: list[np.ndarray], targets: np.ndarray, rounds: int, seed: int = 0) -> Spread:
    """``scores``: one (images, classes) array per seed, rows aligned with ``targets`` (the full labels).
    ``rounds`` random splits into two halves, each half scored for every seed (fixed ``seed``)."""
    if len(scores) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    n = len(targets)
    whole = np.var([mean_average_precision(targets, s).map for s in scores], ddof=1)
    rng = np.random.default_rng(seed)
    half_vars = []
    for _ in range(rounds):
        order = rng.permutation(n)
        for rows in (order[: n // 2], order[n // 2: 2 * (n // 2)]):
            half_vars.append(np.var([mean_average_precision(targets[rows], s[rows]).map for s in scores], ddof=1))
    half = float(np.mean(half_vars))
    # Var(half) = t + 2 s and Var(whole) = t + s; clipped at 0, as seed variances are noisy with few seeds
    sample = max(half - whole, 0.0)
    train = max(whole - sample, 0.0)
    return Spread(len(scores), n, math.sqrt(whole), math.sqrt(half), math.sqrt(train), math.sqrt(sample))
