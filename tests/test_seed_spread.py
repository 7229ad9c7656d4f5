"""The seed-spread decomposition (pipeline/tools/seed_spread.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import mean_average_precision
from pipeline.tools.seed_spread import Spread, decompose


def test_predictions_from_the_two_parts():
    spread = Spread(seeds=3, images=3000, sd_whole=1.5, sd_half=math.sqrt(1.44 + 2 * 0.81), sd_train=1.2,
                    sd_sample=0.9)
    assert spread.sd_at(1) == pytest.approx(1.5)  # sqrt(1.44 + 0.81)
    assert spread.sd_at(4) == pytest.approx(math.sqrt(1.44 + 0.81 / 4))
    assert spread.sd_at(math.inf) == pytest.approx(1.2)
    assert spread.seeds_for(0.3) == 25  # (1.5 / 0.3)^2
    assert spread.seeds_for(0.3, math.inf) == 16  # (1.2 / 0.3)^2


def test_identical_seeds_have_no_spread():
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.3).astype(np.int8)
    scores = rng.random((40, 3))
    spread = decompose([scores, scores.copy(), scores.copy()], targets, rounds=5)
    assert (spread.sd_whole, spread.sd_half, spread.sd_train, spread.sd_sample) == (0, 0, 0, 0)


def test_one_round_by_hand():
    rng = np.random.default_rng(1)
    targets = (rng.random((41, 2)) < 0.4).astype(np.int8)  # odd: the last row of the permutation is left out
    targets[:2] = 1
    scores = [rng.random((41, 2)) for _ in range(3)]
    spread = decompose(scores, targets, rounds=1, seed=7)
    order = np.random.default_rng(7).permutation(41)
    halves = [order[:20], order[20:40]]
    whole = np.var([mean_average_precision(targets, s).map for s in scores], ddof=1)
    half = np.mean([np.var([mean_average_precision(targets[h], s[h]).map for s in scores], ddof=1)
                    for h in halves])
    assert spread.sd_whole == pytest.approx(math.sqrt(whole))
    assert spread.sd_half == pytest.approx(math.sqrt(half))
    sample = max(half - whole, 0.0)
    assert spread.sd_sample == pytest.approx(math.sqrt(sample))
    assert spread.sd_train == pytest.approx(math.sqrt(max(whole - sample, 0.0)))


def test_needs_two_seeds_and_a_round():
    with pytest.raises(ValueError, match="two seeds"):
        decompose([np.zeros((4, 1))], np.ones((4, 1)), rounds=1)
    with pytest.raises(ValueError, match="rounds must be at least 1"):  # else a mean of nothing: NaN, silently
        decompose([np.zeros((4, 1)), np.ones((4, 1))], np.ones((4, 1)), rounds=0)
