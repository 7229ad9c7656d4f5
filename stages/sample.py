"""Stage ``sample``: single-positive observed labels, exactly the community procedure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import load_params, parse_dataclass
from pipeline.datasets import check_source, get_dataset
from pipeline.io import ensure_dir
from pipeline.sampling import PROCEDURE, SampleParams, sample_observed_labels
from pipeline.tables import LabelTable, read_label_table, write_observed_table


def observe(table: LabelTable, seed: int, num_positives: int, num_negatives: int) -> LabelTable:
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
    params = parse_dataclass(SampleParams, load_params(params_path).get("sample") or {}, "sample")
    table = read_label_table(paths.label_table(dataset))
    check_source(table.meta, paths.label_table(dataset))
    out = paths.observed_table(dataset)
    ensure_dir(out.parent)
    write_observed_table(out, observe(table, params.seed, params.num_positives, params.num_negatives))
    return out
