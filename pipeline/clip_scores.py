"""The CLIP score table of a (dataset, method): what stage ``clip-scores`` writes and the CLIP-based methods read.

Per training image (the prepared table's ``train`` rows, in table order, so row n is ``Batch.index`` n) it
holds the cosine similarities between CLIP's image embedding of a view and the class prompts' text
embeddings, for the view and its horizontal mirror image:

* ``global.npy``: (N, 2, C) float32, the whole image (index 1 of the second axis: flipped);
* ``tiles.npy``: (N, G, 2, C) float32, the G = g² tiles of a g×g grid in row-major order (G = 0: none);
* ``meta.json``: the CLIP model, its weights' SHA-256 (or the random-init config and seed), the prompt, the
  view settings, the class names, the prepared table's ``labels_sha256`` (row alignment), ``meaningful``:
  false for randomly initialised weights, whose scores are noise, ``official_inputs`` (the official files
  read, with their SHA-256) and ``substitutes``: the method's official inputs that ran on this project's
  substitute instead (pipeline/clip.py).

Cosines, not probabilities: the methods apply their own temperature softmax. The folder is written as a
whole (atomically); :func:`read_clip_scores` checks it against the run before a method uses it. No labels
are stored: CLIP scores are not labels, so a method may read this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import paths
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir

FORMAT = 1
FILES = ("global.npy", "tiles.npy", "meta.json")


@dataclass
class ClipScores:
    global_cos: np.ndarray  # (N, 2, C) float32: cosine(view, class prompt), unflipped and flipped
    tile_cos: np.ndarray  # (N, G, 2, C) float32: the same per tile (G = 0 without tiles)
    meta: dict[str, Any]

    @property
    def meaningful(self) -> bool:
        """False when the scores come from randomly initialised CLIP weights (noise, not a measurement)."""
        return bool(self.meta.get("meaningful"))

    @property
    def substitutes(self) -> list[str]:
        """The method's official inputs (class names, relation matrix, text features) that ran on a substitute."""
        return list(self.meta.get("substitutes") or [])

    def diagnostics(self) -> dict[str, float]:
        """The history columns a CLIP-based method reports every epoch, which the reports read to mark its rows:
        ``clip_meaningful`` (0: random CLIP weights) and ``clip_substitutes`` (how many official inputs ran on
        a substitute)."""
        return {"clip_meaningful": float(self.meaningful), "clip_substitutes": float(len(self.substitutes))}


def write_clip_scores(folder: Path, scores: ClipScores) -> Path:
    n, two, c = scores.global_cos.shape
    if two != 2 or scores.tile_cos.shape[0] != n or scores.tile_cos.shape[2:] != (2, c):
        raise ValueError(f"inconsistent CLIP score shapes {scores.global_cos.shape}, {scores.tile_cos.shape}")
    with atomic_dir(folder) as tmp:
        np.save(tmp / "global.npy", scores.global_cos.astype(np.float32))
        np.save(tmp / "tiles.npy", scores.tile_cos.astype(np.float32))
        meta = {"format": FORMAT, **scores.meta, "rows": n, "num_classes": c, "tiles": scores.tile_cos.shape[1]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def prepared_labels_hash(dataset: str) -> str | None:
    """``provenance.labels_sha256`` of the prepared table, from its Parquet metadata only (no labels read)."""
    import pyarrow.parquet as pq

    from pipeline.tables import META_KEY

    try:
        meta = json.loads((pq.read_schema(paths.label_table(dataset)).metadata or {}).get(META_KEY, b"{}"))
    except (OSError, ValueError):
        return None
    return (meta.get("provenance") or {}).get("labels_sha256")


def clip_score_files(dataset: str, method: str) -> list[Path]:
    """The files of ``method``'s CLIP score table on ``dataset`` (none before `spml clip-scores` ran): what a
    method that reads them lists in ``Method.input_files``, so new scores never resume an old run."""
    folder = paths.clip_scores_dir(dataset, method)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def read_clip_scores(dataset: str, method: str, num_train: int, num_classes: int) -> ClipScores:
    """The table of ``method`` on ``dataset``, checked against the run: every file, one row per training image,
    one column per class, and the prepared table it was computed from."""
    folder = paths.clip_scores_dir(dataset, method)
    redo = f"run `spml clip-scores {dataset} {method}`"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise SpmlError(f"method {method} reads CLIP scores from {folder}, which lacks {', '.join(missing)}; {redo}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        global_cos = np.load(folder / "global.npy", allow_pickle=False)
        tile_cos = np.load(folder / "tiles.npy", allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SpmlError(f"CLIP scores in {folder} are not readable ({type(exc).__name__}: {exc}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpmlError(f"{folder / 'meta.json'} is not a CLIP score table of format {FORMAT}; {redo}")
    expected = (num_train, 2, num_classes)
    if global_cos.shape != expected or tile_cos.ndim != 4 or tile_cos.shape[0] != num_train \
            or tile_cos.shape[2:] != (2, num_classes):
        raise SpmlError(f"CLIP scores in {folder} have shapes {global_cos.shape} and {tile_cos.shape}, but the run "
                        f"has {num_train} training images and {num_classes} classes; {redo}")
    if not (np.isfinite(global_cos).all() and np.isfinite(tile_cos).all()):
        raise SpmlError(f"CLIP scores in {folder} hold non-finite values; {redo}")
    current = prepared_labels_hash(dataset)
    if meta.get("labels_sha256") != current:
        raise SpmlError(f"CLIP scores in {folder} were computed from another {paths.label_table(dataset)} "
                        f"(rows or split differ); {redo}")
    return ClipScores(global_cos.astype(np.float32), tile_cos.astype(np.float32), meta)
