"""Helpers shared by the real-dataset sources: text files, image checks, the field's formatted .npy files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pipeline.datasets import SplitRows
from pipeline.errors import SpmlError

PHASES = {"train": "train", "test": "val"}  # our official split -> the formatted files' phase name
NUM_EXAMPLES = 5


def find_first(candidates: list[Path], what: str, hint: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise SpmlError(f"{what} not found (looked for {tried}); {hint}")


def read_lines(path: Path, hint: str) -> list[str]:
    """Non-blank lines of a text file; a missing or undecodable file is one SpmlError naming it."""
    if not path.is_file():
        raise SpmlError(f"annotation file {path} does not exist; {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpmlError(f"annotation file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {hint}") from None
    return [line for line in text.splitlines() if line.strip()]


def missing_images(root: Path, rel_paths: list[str]) -> list[str]:
    return [rel for rel in rel_paths if not os.path.isfile(os.path.join(root, rel))]


def require_images(root: Path, rel_paths: list[str], listed_in: str, hint: str) -> None:
    """Error (one line, with a count and examples) if any listed image is absent."""
    missing = missing_images(root, rel_paths)
    if missing:
        examples = ", ".join(missing[:NUM_EXAMPLES])
        raise SpmlError(f"{len(missing):,} of {len(rel_paths):,} images listed in {listed_in} are missing under "
                        f"{root} (e.g. {root / missing[0]}; {examples}); {hint}")


def report_missing_images(root: Path, rel_paths: list[str], what: str) -> dict[str, Any]:
    """Count absent images, warn on stderr, and return a JSON-able report (kept in the table's provenance)."""
    missing = missing_images(root, rel_paths)
    report = {"listed": len(rel_paths), "missing": len(missing), "examples": missing[:NUM_EXAMPLES]}
    if missing:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] {what}: {len(missing):,} of {len(rel_paths):,} listed images are missing "
            f"under {root} (e.g. {', '.join(missing[:NUM_EXAMPLES])}); training will fail on them until they are "
            "restored", highlight=False, soft_wrap=True)
    return report


# ------------------------------------------------------------------------------------- formatted .npy files


def formatted_names(phase: str) -> tuple[str, str]:
    return f"formatted_{phase}_images.npy", f"formatted_{phase}_labels.npy"


def _load_npy(path: Path, hint: str) -> np.ndarray:
    if not path.is_file():
        raise SpmlError(f"{path} does not exist; {hint}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise SpmlError(f"{path} holds Python objects (pickled); re-save it as a string array, e.g. "
                            "np.save(path, np.load(path, allow_pickle=True).astype(str))") from None
        raise SpmlError(f"{path} is not a valid .npy file ({exc}); {hint}") from None
    except (OSError, EOFError) as exc:
        raise SpmlError(f"{path} is not a valid .npy file ({exc}); {hint}") from None




def read_formatted(directory: Path, hint: str) -> tuple[dict[str, SplitRows], int, str]:
    """Read ``formatted_{train,val}_{images,labels}.npy``: rows per official split, #classes, label dtype."""
    from pipeline.tables import check_rows, inside_root  # pyarrow: only where tables are read or written

    rows: dict[str, SplitRows] = {}
    num_classes, dtype = None, None
    for split, phase in PHASES.items():
        images_file, labels_file = (directory / name for name in formatted_names(phase))
        images, labels = _load_npy(images_file, hint), _load_npy(labels_file, hint)
        if images.ndim != 1 or images.dtype.kind not in "US":
            raise SpmlError(f"{images_file} must be a 1-D array of image paths, got {images.dtype} {images.shape}")
        if images.shape[0] == 0:
            raise SpmlError(f"{images_file} lists no images (0 rows); {hint}")
        if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
            raise SpmlError(f"{labels_file} must be an (N, C) matrix with N = {images.shape[0]} rows (one per image "
                            f"in {images_file.name}), got shape {labels.shape}")
        if labels.shape[1] == 0:
            raise SpmlError(f"{labels_file} has 0 classes (shape {labels.shape}); it needs one column per class")
        outside = [name for name in images.astype(str).tolist() if not inside_root(name)]
        if outside:
            raise SpmlError(f"{images_file} has {len(outside):,} image paths that are absolute or leave the image "
                            f"root with '..' (e.g. {', '.join(outside[:NUM_EXAMPLES])}); paths must be relative "
                            "to --images and stay inside it")
        if labels.size and not np.isin(labels, (0, 1)).all():
            bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
            raise SpmlError(f"{labels_file} must hold only 0/1 labels, found {bad.tolist()}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise SpmlError(f"{labels_file} has {labels.shape[1]} classes but the train file has {num_classes}")
        num_classes, dtype = labels.shape[1], dtype or labels.dtype.name
        paths = images.astype(str).tolist()
        rows[split] = SplitRows(image_ids=list(paths), paths=paths, labels=labels.astype(np.int8))
    # the image paths are the ids: a path twice in one file, or in both files, would leak val images into train
    names = [name for split in rows for name in rows[split].paths]
    files = np.asarray([formatted_names(PHASES[split])[0] for split in rows for _ in rows[split].paths], dtype=object)
    check_rows(np.asarray(names, dtype=object), np.asarray(names, dtype=object), files,
               f"the formatted files in {directory}", "list each image once, in one of the two files")
    return rows, int(num_classes), str(dtype)
