import numpy as np
import pytest

from pipeline.metrics import mean_average_precision


def test_ap_hand_computed_and_empty_class_counts_as_zero():
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    result = mean_average_precision(targets, scores)
    # class 0: ranking 1,0,1,0 -> AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333; class 1 has no positive -> 0
    assert result.per_class_ap[0] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    assert result.per_class_ap[1] == 0.0
    assert result.classes_without_positives == 1
    assert result.map == pytest.approx(100 * (0.5 + 0.5 * 2 / 3) / 2)


def test_tied_scores_form_one_step():
    targets = np.array([[1], [0], [1]])
    scores = np.array([[0.5], [0.5], [0.1]])
    # threshold 0.5: recall 1/2, precision 1/2; threshold 0.1: recall 1, precision 2/3
    assert mean_average_precision(targets, scores).map == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 2 / 3))
