"""Stage ``prepare``: the full label table of a dataset, with the community's 80/20 train/val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import load_params, parse_dataclass
from pipeline.datasets import DatasetParams, dataset_params, get_dataset, source_sha256
from pipeline.errors import SpmlError
from pipeline.io import ensure_dir
from pipeline.sampling import SplitParams, train_val_split
from pipeline.tables import LabelTable, labels_hash, write_label_table


def build_label_table(dataset: str, raw_dir: Path, data_params: DatasetParams, val_fraction: float,
                      split_seed: int) -> LabelTable:
    official = get_dataset(dataset).load_official(raw_dir, data_params)
    num_classes = len(official.class_names)
    for name, rows in (("train", official.train), ("test", official.test)):
        if rows.labels.ndim != 2 or rows.labels.shape[1] != num_classes or len(rows.image_ids) != len(rows.labels):
            raise SpmlError(f"dataset {dataset}: official {name} split has labels of shape {rows.labels.shape}, "
                            f"expected ({len(rows.image_ids)}, {num_classes})")
    n_train, n_test = len(official.train.image_ids), len(official.test.image_ids)
    train_idx, val_idx = train_val_split(n_train, val_fraction, split_seed)
    split = np.empty(n_train, dtype=object)
    split[train_idx], split[val_idx] = "train", "val"
    labels = np.concatenate([official.train.labels, official.test.labels]).astype(np.int8)
    image_id = np.asarray(official.train.image_ids + official.test.image_ids, dtype=object)
    extras = {key: official.train.extras[key] + official.test.extras[key]
              for key in official.train.extras if key in official.test.extras}
    train_rows = labels[:n_train][train_idx]
    meta = {
        "dataset": dataset,
        "class_names": official.class_names,
        "image_root": str(raw_dir / official.image_root),
        "procedure": "official train split -> train/val by RandomState(seed).permutation (cole2021); official test -> test",
        "split_seed": split_seed,
        "val_fraction": val_fraction,
        "stats": {
            "num_train": len(train_idx), "num_val": len(val_idx), "num_test": int(n_test),
            # k of EPR/ROLE: mean number of true positives per training image
            "mean_positives_train": float(train_rows.sum(1).mean()) if len(train_rows) else 0.0,
            "class_frequency_train": train_rows.mean(0).round(6).tolist() if len(train_rows) else [],
            # images with 0, 1, 2, ... positives: the label-count distribution (docs/embedded-benchmark.md)
            "label_count_train": np.bincount(train_rows.sum(1).astype(np.int64)).tolist() if len(train_rows) else [],
        },
        "provenance": {**official.provenance, "labels_sha256": labels_hash(labels, image_id),
                       "source_sha256": source_sha256(raw_dir)},
    }
    return LabelTable(
        image_id=image_id,
        path=np.asarray(official.train.paths + official.test.paths, dtype=object),
        official_split=np.asarray(["train"] * n_train + ["test"] * n_test, dtype=object),
        official_index=np.concatenate([np.arange(n_train), np.arange(n_test)]),
        split=np.concatenate([split, np.full(n_test, "test", dtype=object)]),
        labels=labels,
        meta=meta,
        extras=extras,
    )


def run(dataset: str, params_path: Path = Path("params.yaml")) -> Path:
    source = get_dataset(dataset)  # unknown names fail before anything else
    params = load_params(params_path)
    split = parse_dataclass(SplitParams, params.get("split") or {}, "split")
    data_params = dataset_params(source, params)  # e.g. check_images, COCO's loader (dvc.yaml tracks data.<name>)
    raw = paths.raw_dir(dataset)
    if not raw.exists():
        raise SpmlError(f"{raw} does not exist; run `spml download {dataset}` first")
    out = paths.label_table(dataset)
    ensure_dir(out.parent)  # an unwritable data/ fails before the table is built
    table = build_label_table(dataset, raw, data_params, split.val_fraction, split.seed)
    write_label_table(out, table)
    return out
