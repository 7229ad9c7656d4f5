"""A prepared dataset's label statistics: what decides how many unannotated labels are false negatives.

Every SPML method is a bet on that share: with k positives per image and C classes, a single observed positive
leaves k − 1 false negatives among C − 1 unannotated entries. ``spml stats DATASET`` prints these for any
prepared dataset (the embedded ones, or a real one read from its own annotation files), so the embedded
benchmark's statistics can be set beside the real dataset's (docs/embedded-benchmark.md).
"""

from __future__ import annotations

import numpy as np

from pipeline.tables import LabelTable


def label_statistics(table: LabelTable) -> list[str]:
    """Lines describing the training split of ``table``."""
    labels = table.labels[table.rows("train")].astype(np.int64)
    if len(labels) == 0:
        return [f"{table.meta.get('dataset', 'dataset')}: no training rows"]
    count = labels.sum(1)
    classes = labels.shape[1]
    histogram = np.bincount(count, minlength=2)
    share = labels.mean(0)
    order = np.argsort(-share, kind="stable")
    names = table.class_names
    fn_share = (count - 1).clip(min=0).sum() / (len(labels) * (classes - 1)) if classes > 1 else 0.0
    dist = ", ".join(f"{k}: {n} ({100 * n / len(labels):.1f} %)" for k, n in enumerate(histogram) if n)
    return [
        f"{table.meta.get('dataset', 'dataset')}: {len(labels)} training images, {classes} classes",
        f"positives per image: mean {count.mean():.3f}",
        f"images by label count: {dist}",
        f"false negatives among the unannotated entries (one observed positive): {100 * fn_share:.2f} %",
        "images per class (share of training images): "
        + ", ".join(f"{names[i]} {100 * share[i]:.1f} %" for i in order),
    ]
