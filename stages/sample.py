"""Stage ``sample``: single-positive observed labels, exactly the community procedure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import load_params
from pipeline.datasets import get_dataset
from pipeline.errors import SpmlError
from pipeline.io import ensure_dir
from pipeline.sampling import PROCEDURE, sample_observed_labels
from pipeline.tables import LabelTable, read_label_table, write_observed_table


def observe(table: LabelTable, seed: int, num_positives: int = 1, num_negatives: int = 0) -> LabelTable:
    """Observed labels for every row; each official split is sampled on its own, in official order."""
    observed = np.zeros_like(table.labels)
    for official_split in ("train", "test"):
        rows = table.official_rows(official_split)
        observed[rows] = sample_observed_labels(table.labels[rows], seed, num_positives, num_negatives)
    meta = {
        "dataset": table.meta["dataset"],
        "class_names": table.class_names,
        "image_root": table.meta["image_root"],
        "procedure": PROCEDURE,
        "seed": seed,
        "num_positives": num_positives,
        "num_negatives": num_negatives,
        "source_labels_sha256": table.meta["provenance"]["labels_sha256"],
        "stats": table.meta.get("stats", {}),
    }
    return LabelTable(table.image_id, table.path, table.official_split, table.official_index, table.split,
                      observed, meta)


def run(dataset: str, params_path: Path = Path("params.yaml")) -> Path:
    get_dataset(dataset)
    params = load_params(params_path).get("sample") or {}
    seed, num_pos, num_neg = params.get("seed", 1200), params.get("num_positives", 1), params.get("num_negatives", 0)
    for key, value in (("seed", seed), ("num_positives", num_pos), ("num_negatives", num_neg)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpmlError(f"params sample.{key} must be a non-negative integer, got {value!r}")
    table = read_label_table(paths.label_table(dataset))
    out = paths.observed_table(dataset)
    ensure_dir(out.parent)
    write_observed_table(out, observe(table, seed, num_pos, num_neg))
    return out
