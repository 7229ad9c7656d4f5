"""Mean average precision as the SPML community computes it (``../shared/specs/baselines.md`` section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score


@dataclass
class MapResult:
    map: float  # x100
    per_class_ap: list[float]  # x100, 0 for a class with no positive
    classes_without_positives: int


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> MapResult:
    """Mean over classes of scikit-learn's step-wise AP, x100.

    A class with no positive in ``targets`` scores AP 0 and still counts in the mean (the community
    convention, which lowers mAP); how many such classes there were is reported alongside.
    """
    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must be equal (N, C) shapes")
    per_class = []
    empty = 0
    for c in range(targets.shape[1]):
        if targets[:, c].sum() == 0:
            per_class.append(0.0)
            empty += 1
        else:
            per_class.append(100.0 * float(average_precision_score(targets[:, c] > 0, scores[:, c])))
    return MapResult(float(np.mean(per_class)) if per_class else 0.0, per_class, empty)
