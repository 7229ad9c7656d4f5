"""Parquet label tables: the full label table (``prepare``) and the observed-label table (``sample``).

Both are written with pyarrow (zstd, fixed row order) and carry a JSON document under the schema
metadata key ``spml``: dataset name, class names, image root and provenance. Readers validate the
schema and raise :class:`SpmlError` naming the file and what is wrong.

Row order: the official train split first, in the community's row order (``official_index``), then
the official test split in its row order. ``split`` is ``train``/``val`` (the 80/20 split of the
official train split) or ``test`` (the official val/test split).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SpmlError
from pipeline.io import atomic_file

META_KEY = b"spml"
SPLITS = ("train", "val", "test")
OFFICIAL_SPLITS = ("train", "test")


@dataclass
class LabelTable:
    """Rows of one dataset with a dense (N, C) label matrix and JSON-able metadata."""

    image_id: np.ndarray  # (N,) str
    path: np.ndarray  # (N,) str, relative to meta["image_root"]
    official_split: np.ndarray  # (N,) str in OFFICIAL_SPLITS
    official_index: np.ndarray  # (N,) int64, row index within the official split file
    split: np.ndarray  # (N,) str in SPLITS
    labels: np.ndarray  # (N, C) int8; full labels {0,1}, observed labels {-1,0,1}
    meta: dict[str, Any]
    extras: dict[str, list] = field(default_factory=dict)  # optional columns, e.g. instance masks

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1]

    def __len__(self) -> int:
        return len(self.image_id)

    def rows(self, split: str) -> np.ndarray:
        """Indices of the rows of ``split`` (train/val/test), in table order."""
        return np.flatnonzero(self.split == split)

    def official_rows(self, official_split: str) -> np.ndarray:
        rows = np.flatnonzero(self.official_split == official_split)
        return rows[np.argsort(self.official_index[rows], kind="stable")]


def labels_hash(labels: np.ndarray, image_id: np.ndarray) -> str:
    """Content hash of a label matrix and its row ids (independent of the Parquet encoding)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(labels, dtype=np.int8).tobytes())
    digest.update(str(labels.shape).encode())
    digest.update("\n".join(map(str, image_id)).encode())
    return digest.hexdigest()


# values a label column may hold: full labels are 0/1, observed labels -1 (observed negative), 0 or 1
LABEL_VALUES = {"labels": (0, 1), "observed": (-1, 0, 1)}
NUM_EXAMPLES = 5


def check_labels(labels: np.ndarray, image_id: np.ndarray, split: np.ndarray, label_column: str, what: str,
                 hint: str) -> None:
    """Refuse values outside :data:`LABEL_VALUES` and, for full labels, a split with no positive at all.

    Single rows without a positive exist in the community's files (sampling observes nothing there), but a
    split without any makes single-positive training observe nothing (train) or mAP undefined (val/test).
    """
    allowed = LABEL_VALUES[label_column]
    bad = ~np.isin(labels, allowed)
    if bad.any():
        values = np.unique(labels[bad])[:NUM_EXAMPLES].tolist()
        rows = np.flatnonzero(bad.any(axis=1))
        raise SpmlError(f"{what} has {label_column} values {values} (allowed: {', '.join(map(str, allowed))}) in "
                        f"{len(rows):,} rows, e.g. {', '.join(map(str, image_id[rows[:NUM_EXAMPLES]]))}; {hint}")
    if label_column != "labels":
        return
    for name in SPLITS:
        rows = np.flatnonzero(split == name)
        if len(rows) and not (labels[rows] == 1).any():
            raise SpmlError(f"{what}: its {len(rows):,} {name} rows have no positive label at all; "
                            f"single-positive learning needs positives; {hint}")


def inside_root(name: str) -> bool:
    """True for a path that stays under its root: not empty, not absolute (POSIX or Windows), no '..' part."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and ":" not in parts[0] and ".." not in parts


def _examples(names: list[str]) -> str:
    return ", ".join(names[:NUM_EXAMPLES])


def check_rows(image_id: np.ndarray, path: np.ndarray, split: np.ndarray, what: str, hint: str) -> None:
    """Refuse rows that would leak or escape: a path that is absolute or leaves the image root, an image in two
    splits (by id, then by normalised path), an image id given twice. Each names the first offenders and their
    count.

    A repeated row or image is how test images end up in training (or val images in test) without any error:
    the mAP is then measured on images the model was trained on."""
    names = [str(value) for value in path]
    outside = [name for name in names if not inside_root(name)]
    if outside:
        raise SpmlError(f"{what} has {len(outside):,} image paths that are absolute or leave the image root "
                        f"with '..' (e.g. {_examples(outside)}); paths must be relative to the image root and "
                        f"stay inside it; {hint}")
    splits = [str(value) for value in split]
    ids = [str(value) for value in image_id]
    for kind, keys in (("id", ids), ("path", [posixpath.normpath(name.replace("\\", "/")) for name in names])):
        split_of: dict[str, set[str]] = {}
        for key, where in zip(keys, splits):
            split_of.setdefault(key, set()).add(where)
        shared = [f"{key} ({'/'.join(sorted(found))})" for key, found in split_of.items() if len(found) > 1]
        if shared:
            raise SpmlError(f"{what} has {len(shared):,} images in two splits (by {kind}; e.g. {_examples(shared)}); "
                            f"an image in two splits leaks test (or val) images into training; {hint}")
        if kind == "id" and len(split_of) < len(ids):
            counts: dict[str, int] = {}
            for key in ids:
                counts[key] = counts.get(key, 0) + 1
            repeated = [key for key, count in counts.items() if count > 1]
            raise SpmlError(f"{what} gives {len(repeated):,} image ids more than once (e.g. {_examples(repeated)}); "
                            f"each image must have one row; {hint}")


def _label_column(labels: np.ndarray) -> pa.Array:
    _, c = labels.shape
    flat = pa.array(np.ascontiguousarray(labels, dtype=np.int8).reshape(-1), type=pa.int8())
    return pa.FixedSizeListArray.from_arrays(flat, c)


def write_table(path: str | Path, table: LabelTable, label_column: str) -> None:
    columns = {
        "image_id": pa.array(table.image_id.astype(str), type=pa.string()),
        "path": pa.array(table.path.astype(str), type=pa.string()),
        "official_split": pa.array(table.official_split.astype(str), type=pa.string()),
        "official_index": pa.array(table.official_index.astype(np.int64), type=pa.int64()),
        "split": pa.array(table.split.astype(str), type=pa.string()),
        label_column: _label_column(table.labels),
    }
    for name, values in table.extras.items():
        columns[name] = pa.array(values)
    meta = dict(table.meta)
    meta["num_classes"] = int(table.labels.shape[1])
    arrow = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_file(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")


def read_table(path: str | Path, label_column: str, what: str, hint: str) -> LabelTable:
    path = Path(path)
    if not path.exists():
        raise SpmlError(f"{what} {path} does not exist; {hint}")
    try:
        arrow = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise SpmlError(f"{what} {path} is not a readable Parquet file ({exc}); {hint}") from None
    required = ("image_id", "path", "official_split", "official_index", "split", label_column)
    missing = [name for name in required if name not in arrow.column_names]
    raw_meta = (arrow.schema.metadata or {}).get(META_KEY)
    if missing or raw_meta is None:
        problem = f"missing columns {missing}" if missing else "no 'spml' schema metadata"
        raise SpmlError(f"{what} {path} has the wrong schema ({problem}); {hint}")
    meta = json.loads(raw_meta)
    column = arrow.column(label_column).combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or "class_names" not in meta:
        raise SpmlError(f"{what} {path} has the wrong schema (column {label_column!r} must be a "
                        f"fixed-size list with class names in the metadata); {hint}")
    num_classes = column.type.list_size
    if num_classes != len(meta["class_names"]):
        raise SpmlError(f"{what} {path} has {num_classes} label columns but "
                        f"{len(meta['class_names'])} class names; {hint}")
    raw_labels = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, num_classes)
    image_id = np.asarray(arrow.column("image_id").to_pylist(), dtype=object)
    split = np.asarray(arrow.column("split").to_pylist(), dtype=object)
    bad = set(split) - set(SPLITS)
    if bad:
        raise SpmlError(f"{what} {path} has unknown split values {sorted(bad)}; {hint}")
    check_labels(raw_labels, image_id, split, label_column, f"{what} {path}", hint)
    check_rows(image_id, np.asarray(arrow.column("path").to_pylist(), dtype=object), split, f"{what} {path}", hint)
    labels = raw_labels.astype(np.int8)
    extras = {name: arrow.column(name).to_pylist() for name in arrow.column_names if name not in required}
    return LabelTable(
        image_id=image_id,
        path=np.asarray(arrow.column("path").to_pylist(), dtype=object),
        official_split=np.asarray(arrow.column("official_split").to_pylist(), dtype=object),
        official_index=arrow.column("official_index").to_numpy(),
        split=split,
        labels=labels,
        meta=meta,
        extras=extras,
    )


def read_label_table(path: str | Path) -> LabelTable:
    return read_table(path, "labels", "label table", "rerun `spml prepare DATASET`")


def write_label_table(path: str | Path, table: LabelTable) -> None:
    what = f"label table of {table.meta.get('dataset')}"
    check_labels(table.labels, table.image_id, table.split, "labels", what,
                 "fix the dataset's labels, then rerun `spml prepare`")
    check_rows(table.image_id, table.path, table.split, what, "fix the dataset's files, then rerun `spml prepare`")
    write_table(path, table, "labels")


def read_observed_table(path: str | Path) -> LabelTable:
    return read_table(path, "observed", "observed-label table", "rerun `spml sample DATASET`")


def write_observed_table(path: str | Path, table: LabelTable) -> None:
    write_table(path, table, "observed")
