"""Dataset sources: how to obtain a dataset (``download``) and read its official splits (``load_official``).

Each source is one module in this package that registers a class with :func:`register_dataset`.
The generic ``prepare`` stage turns :class:`OfficialSplits` into the full label table, so a source
only knows its own file formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import unknown_name
from pipeline.registry import DATASETS


@dataclass
class SplitRows:
    """One official split in the community's row order."""

    image_ids: list[str]
    paths: list[str]  # relative to OfficialSplits.image_root
    labels: np.ndarray  # (N, C) {0, 1}
    extras: dict[str, list] = field(default_factory=dict)  # optional per-row columns


@dataclass
class OfficialSplits:
    class_names: list[str]
    image_root: str  # relative to the dataset's raw directory
    train: SplitRows
    test: SplitRows
    provenance: dict[str, Any] = field(default_factory=dict)


class DatasetSource(Protocol):
    name: str

    def download(self, raw_dir: Path, params: dict[str, Any], source: Path | None) -> None:
        """Fill ``raw_dir`` (a fresh, empty directory) from the network or from ``source``."""

    def load_official(self, raw_dir: Path, params: dict[str, Any]) -> OfficialSplits:
        """Read the official train and test splits from ``raw_dir``."""


# the registry itself is pipeline.registry.DATASETS (one module for methods, models and datasets)
register_dataset = DATASETS.register


def dataset_names() -> list[str]:
    """Built-in sources plus the datasets registered with ``spml import-npy`` (data/imported.json)."""
    from pipeline.datasets.imported import read_registry

    return sorted(set(DATASETS.names()) | set(read_registry()))


def get_dataset(name: str) -> DatasetSource:
    if name not in DATASETS:
        from pipeline.datasets.imported import imported_source

        imported = imported_source(name)
        if imported is None:
            raise unknown_name("dataset", name, dataset_names())
        return imported
    return DATASETS.get(name)()
