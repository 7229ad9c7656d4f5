"""``spml export-npy``: our tables as the field's formatted files, for use in other SPML codebases.

Writes ``formatted_{train,val}_{images,labels,labels_obs}.npy``: phase ``train`` is the official train
split (train + val rows, before the 80/20 split, as the community files are) and phase ``val`` the
official test split, both in the community's row order. Labels use the dtype of the community's files
(float64; int64 for CUB); observed labels have the same dtype and hold 1 for the observed positive and
0 elsewhere (-1 only if params sample.num_negatives > 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.datasets import get_dataset
from pipeline.errors import SpmlError
from pipeline.io import atomic_file, ensure_dir
from pipeline.tables import read_label_table, read_observed_table

PHASES = {"train": "train", "val": "test"}  # file phase -> our official split


def run(dataset: str, out_dir: Path) -> list[Path]:
    get_dataset(dataset)
    table = read_label_table(paths.label_table(dataset))
    observed = read_observed_table(paths.observed_table(dataset))
    if observed.meta.get("source_labels_sha256") != table.meta["provenance"]["labels_sha256"]:
        raise SpmlError(f"{paths.observed_table(dataset)} was sampled from another version of "
                        f"{paths.label_table(dataset)}; rerun `spml sample {dataset}`")
    dtype = np.dtype(table.meta["provenance"].get("npy_label_dtype", "float64"))
    arrays: dict[str, np.ndarray] = {}
    for phase, official in PHASES.items():
        rows = table.official_rows(official)
        if not np.array_equal(observed.image_id[rows], table.image_id[rows]):
            raise SpmlError(f"{paths.observed_table(dataset)} rows do not match {paths.label_table(dataset)}; "
                            f"rerun `spml sample {dataset}`")
        arrays[f"formatted_{phase}_images.npy"] = np.asarray(table.path[rows].tolist(), dtype=str)
        arrays[f"formatted_{phase}_labels.npy"] = table.labels[rows].astype(dtype)
        arrays[f"formatted_{phase}_labels_obs.npy"] = observed.labels[rows].astype(dtype)
    out_dir = ensure_dir(out_dir)
    written = []
    for name, array in arrays.items():  # everything is computed before the first file is written
        with atomic_file(out_dir / name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
        written.append(out_dir / name)
    return written
