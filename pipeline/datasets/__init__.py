"""Dataset sources: how to obtain a dataset (``download``) and read its official splits (``load_official``).

Each source is one module in this package that registers a class with :func:`register_dataset`.
The generic ``prepare`` stage turns :class:`OfficialSplits` into the full label table, so a source
only knows its own file formats.

A source declares its ``params.yaml: data.<name>`` block as a ``Params`` dataclass, as methods and models
do: every key typed and range-checked (``Annotated[..., Range(...)]``), none with a default, so a missing
key is an error naming it and an unknown one too. :func:`dataset_params` parses the block once per stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import parse_dataclass
from pipeline.errors import SpmlError, unknown_name
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


class DatasetParams:
    """Base of every source's ``Params`` dataclass (``params.yaml: data.<name>``); no defaults in subclasses."""

    def check(self, where: str) -> None:
        """Refuse what one key's type and range cannot say (a list's length, a pair of keys); ``where`` is
        ``data.<name>``, since one Params class may serve two names (synthetic, synthetic-dense)."""


@dataclass
class ArchiveParams(DatasetParams):
    """``params.yaml: data.<name>`` of a dataset that is one archive at a URL (VOC 2012, CUB); no defaults here,
    params.yaml holds every value."""

    source: str | None  # the archive or its extracted folder instead of downloading (= --source); download
    url: str | None  # a mirror of the archive (its MD5 is still checked); download
    check_images: bool  # prepare refuses a listed image that is absent

    def check(self, where: str) -> None:
        check_path(self.source, f"{where}.source")
        check_url(self.url, f"{where}.url")


class DatasetSource(Protocol):
    name: str
    Params: type[DatasetParams]  # a dataclass: params.yaml's data.<name>, parsed by dataset_params

    def download(self, raw_dir: Path, params: DatasetParams, source: Path | None) -> None:
        """Fill ``raw_dir`` (a fresh, empty directory) from the network or from ``source``."""

    def load_official(self, raw_dir: Path, params: DatasetParams) -> OfficialSplits:
        """Read the official train and test splits from ``raw_dir``."""


def dataset_params(source: DatasetSource, params: dict[str, Any]) -> DatasetParams:
    """``data.<name>`` of the loaded params.yaml as the source's ``Params``: one-line errors naming
    ``data.<name>.<key>`` for a missing, unknown, mistyped or out-of-range key. An absent block reads as
    empty, so its keys are reported missing (an imported dataset's Params has none: ``data.NAME: {}``)."""
    where = f"data.{source.name}"
    block = (params.get("data") or {}).get(source.name)
    parsed = parse_dataclass(source.Params, {} if block is None else block, where)
    parsed.check(where)
    return parsed


def check_path(value: str | None, where: str) -> None:
    """A local path param (``source``, NUS-WIDE's ``images``): a non-empty string or null."""
    if value is not None and not value.strip():
        raise SpmlError(f"params {where} must be a path or null, got an empty string")


def check_url(value: str | None, where: str) -> None:
    """A mirror URL param: http(s), since downloads resume with HTTP Range requests; or null. A local file
    is ``source``'s job."""
    if value is not None and not value.startswith(("http://", "https://")):
        raise SpmlError(f"params {where} must be an http:// or https:// URL or null, got {value!r}; "
                        "give a local archive as `source` instead")


# what source_sha256 leaves out: the images (the image cache keys them by size and mtime; hashing their bytes
# would read the whole dataset on every run)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


def source_sha256(raw_dir: Path) -> str:
    """SHA-256 of what a dataset's label table is made from: every file under ``raw_dir`` but the images
    (names and bytes, links followed): annotations, label files, an import's source.json naming its images.

    ``prepare`` records it in the table; ``sample`` and ``train`` recompute it and refuse a table made from
    other raw data (a re-download with another seed, a re-import of other files)."""
    import os

    from pipeline.io import TMP_MARK, sha256_file

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(raw_dir, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES or TMP_MARK in name:
                continue
            path = Path(folder) / name
            digest.update(f"{path.relative_to(raw_dir).as_posix()}\n{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def check_source(meta: dict[str, Any], table_path: Path) -> None:
    """Refuse a prepared table whose raw data changed since ``prepare`` (or that records none)."""
    from pipeline import paths

    dataset = meta.get("dataset")
    recorded = (meta.get("provenance") or {}).get("source_sha256")
    redo = f"rerun `spml prepare {dataset}` and `spml sample {dataset}` (or `dvc repro`)"
    raw = paths.raw_dir(str(dataset))
    if recorded is None:
        raise SpmlError(f"label table {table_path} records no hash of the raw data it was made from (an older "
                        f"spml wrote it); {redo}")
    if not raw.is_dir():
        raise SpmlError(f"label table {table_path} was made from {raw}, which does not exist any more; run "
                        f"`spml download {dataset}`, then {redo}")
    if source_sha256(raw) != recorded:
        raise SpmlError(f"label table {table_path} was made from other raw data than {raw} holds now (it was "
                        f"downloaded or imported again since); {redo}")


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
