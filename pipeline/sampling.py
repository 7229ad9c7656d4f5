"""The community's single-positive sampling and train/val split, reproduced bit for bit.

Both follow Cole et al. (CVPR 2021, ``preproc/generate_observed_labels.py`` and
``datasets.py:generate_split``), which every later SPML codebase reuses
(``../shared/specs/baselines.md`` sections 1.2 and 1.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from pipeline.config import Range

SEED_MAX = 2**32 - 1  # numpy RandomState seeds are 32-bit


@dataclass
class SplitParams:
    """``params.yaml: split`` (stage ``prepare``)."""

    val_fraction: Annotated[float, Range(gt=0, lt=1)]  # both train and val need rows
    seed: Annotated[int, Range(ge=0, le=SEED_MAX)]


@dataclass
class SampleParams:
    """``params.yaml: sample`` (stage ``sample``)."""

    seed: Annotated[int, Range(ge=0, le=SEED_MAX)]
    num_positives: Annotated[int, Range(ge=1)]  # single positive: 1; 0 would observe nothing
    num_negatives: Annotated[int, Range(ge=0)]

PROCEDURE = "cole2021: fresh RandomState(seed) per official split; per row shuffle positives then negatives"


def sample_observed_labels(labels: np.ndarray, seed: int = 1200, num_positives: int = 1,
                           num_negatives: int = 0) -> np.ndarray:
    """Observed labels for one official split, in {-1, 0, 1} (int8).

    A fresh ``RandomState(seed)`` walks the rows in order. For each row it shuffles the indices of the
    positives and observes the first ``num_positives``; then it shuffles the indices of the negatives
    and observes the first ``num_negatives`` as -1. The second shuffle runs even when no negative is
    observed: it consumes random numbers, and skipping it changes every later row.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.int8)
    for row_index, row in enumerate(labels):
        positives = np.flatnonzero(row == 1)
        rng.shuffle(positives)
        observed[row_index, positives[:num_positives]] = 1
        negatives = np.flatnonzero(row != 1)
        rng.shuffle(negatives)
        observed[row_index, negatives[:num_negatives]] = -1
    return observed


def train_val_split(num_rows: int, val_fraction: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) of the train and val parts of the official train split.

    ``RandomState(seed).permutation(N)``; the last ``round(val_fraction * N)`` entries (numpy's
    round-half-even) are val, the rest train, each sorted so that file order is kept.
    """
    permutation = np.random.RandomState(seed).permutation(num_rows)
    num_val = int(np.round(val_fraction * num_rows))
    train = np.sort(permutation[: num_rows - num_val])
    val = np.sort(permutation[num_rows - num_val:])
    return train, val
