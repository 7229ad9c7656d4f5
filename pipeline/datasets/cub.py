"""CUB-200-2011 with its 312 binary attributes as classes, formatted as Cole et al. do.

Rows are the images of ``images.txt`` in file (image id) order, split by ``train_test_split.txt``
(1 -> train, else -> test). Labels are the ``is_present`` column of
``attributes/image_attribute_labels.txt`` (certainty is ignored, as in the community). The community
walks that file assuming 312 consecutive rows per image; we place each row by its (image id, attribute id)
instead and check that every pair occurs exactly once, which gives the same matrix on the official file
and a clear error on a broken one. Lines are parsed defensively (first four fields only).

Two extraction layouts are accepted: plain ``tar -xf`` (``attributes.txt`` next to ``CUB_200_2011/``;
LL, IGNORE, AckTheUnknown) and Cole's ``tar -xf -C CUB_200_2011`` (one more ``CUB_200_2011/`` level).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.datasets import ArchiveParams, OfficialSplits, SplitRows, register_dataset
from pipeline.datasets.formats import find_first, read_lines, require_images
from pipeline.download import Archive, obtain
from pipeline.errors import SpmlError

NUM_ATTRIBUTES = 312
ARCHIVES = [
    Archive("CUB_200_2011.tgz", ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",),
            1_150_585_339, "97eceeb196236b17998738112f37df78"),
]
HINT = "pass CUB_200_2011.tgz or its extracted folder: `spml download cub --source PATH`"


def find_dirs(raw_dir: Path) -> tuple[Path, Path | None]:
    """(folder holding images.txt, attributes.txt or None) for either extraction layout."""
    cub = find_first([raw_dir / "CUB_200_2011" / "images.txt", raw_dir / "CUB_200_2011" / "CUB_200_2011" / "images.txt",
                      raw_dir / "images.txt"], "CUB images.txt", HINT).parent
    names = [raw_dir / "attributes.txt", raw_dir / "CUB_200_2011" / "attributes.txt", cub / "attributes.txt",
             cub / "attributes" / "attributes.txt"]
    return cub, next((p for p in names if p.is_file()), None)


def _pairs(path: Path, expect: str) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(read_lines(path, HINT), start=1):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise SpmlError(f"{path}:{number}: malformed line {line!r}; expected '{expect}'")
        out.append((fields[0], fields[1].strip()))
    return out


def read_attribute_labels(path: Path, image_ids: list[str]) -> np.ndarray:
    """(N, 312) is_present matrix, rows in ``image_ids`` order."""
    import pandas as pd  # here, not at module level: every stage imports all dataset modules

    if not path.is_file():
        raise SpmlError(f"annotation file {path} does not exist; {HINT}")
    try:  # extra trailing fields are tolerated: only the first four columns are read
        frame = pd.read_csv(path, sep=r"\s+", header=None, names=range(8), engine="c", skip_blank_lines=True)
        frame = frame.iloc[:, :4]
        values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    except (ValueError, pd.errors.ParserError) as exc:
        raise SpmlError(f"{path} has a malformed line ({str(exc).splitlines()[0]}); expected "
                        "'<image_id> <attribute_id> <is_present> <certainty_id> ...'") from None
    bad = np.flatnonzero(np.isnan(values).any(1) | (values != np.round(values)).any(1))
    if len(bad):
        raise SpmlError(f"{path}: malformed line {int(bad[0]) + 1} (row {frame.iloc[bad[0]].tolist()}); expected "
                        "'<image_id> <attribute_id> <is_present> <certainty_id> ...'")
    values = values.astype(np.int64)
    image_col, attribute_col, present = values[:, 0], values[:, 1], values[:, 2]
    ids = np.asarray([int(i) for i in image_ids], dtype=np.int64)
    order = np.argsort(ids)
    slot = np.minimum(np.searchsorted(ids, image_col, sorter=order), len(ids) - 1)
    row = order[slot]
    problems = [
        (ids[row] != image_col, "an image id that is not in images.txt"),
        ((attribute_col < 1) | (attribute_col > NUM_ATTRIBUTES), f"an attribute id outside 1..{NUM_ATTRIBUTES}"),
        (~np.isin(present, (0, 1)), "an is_present value other than 0/1"),
    ]
    for mask, what in problems:
        if mask.any():
            line = int(np.flatnonzero(mask)[0]) + 1
            raise SpmlError(f"{path}: line {line} has {what}")
    if len(values) != NUM_ATTRIBUTES * len(ids):
        raise SpmlError(f"{path} has {len(values):,} rows, expected {NUM_ATTRIBUTES} x {len(ids):,} images = "
                        f"{NUM_ATTRIBUTES * len(ids):,}; the file is truncated or from another release")
    cell = row * NUM_ATTRIBUTES + (attribute_col - 1)
    counts = np.bincount(cell, minlength=NUM_ATTRIBUTES * len(ids))
    if (counts != 1).any():
        first = int(np.flatnonzero(counts != 1)[0])
        raise SpmlError(f"{path}: image {image_ids[first // NUM_ATTRIBUTES]} attribute "
                        f"{first % NUM_ATTRIBUTES + 1} occurs {int(counts[first])} times, expected once")
    labels = np.zeros(NUM_ATTRIBUTES * len(ids), dtype=np.int8)
    labels[cell] = present
    return labels.reshape(len(ids), NUM_ATTRIBUTES)


@register_dataset("cub")
class Cub:
    """Download: ``CUB_200_2011.tgz`` (resumable, MD5-checked), or ``--source`` the tgz or an extracted folder."""

    Params = ArchiveParams  # source, url, check_images

    def download(self, raw_dir: Path, params: ArchiveParams, source: Path | None) -> None:
        url = params.url
        obtain(ARCHIVES, "cub", raw_dir, source, {ARCHIVES[0].filename: url} if url is not None else None)
        find_dirs(raw_dir)

    def load_official(self, raw_dir: Path, params: ArchiveParams) -> OfficialSplits:
        cub, attributes_file = find_dirs(raw_dir)
        images = _pairs(cub / "images.txt", "<image_id> <path>")
        split_of = dict(_pairs(cub / "train_test_split.txt", "<image_id> <is_training_image>"))
        missing = [i for i, _ in images if i not in split_of]
        if missing:
            raise SpmlError(f"{cub / 'train_test_split.txt'} has no entry for image {missing[0]} "
                            f"({len(missing)} images missing); {HINT}")
        try:
            [int(i) for i, _ in images]
        except ValueError:
            raise SpmlError(f"{cub / 'images.txt'} has a non-integer image id; {HINT}") from None
        labels = read_attribute_labels(cub / "attributes" / "image_attribute_labels.txt", [i for i, _ in images])
        if attributes_file is not None:
            names = [name for _, name in _pairs(attributes_file, "<attribute_id> <name>")]
            if len(names) != NUM_ATTRIBUTES:
                raise SpmlError(f"{attributes_file} lists {len(names)} attributes, expected {NUM_ATTRIBUTES}")
        else:  # LAC's layout has no attributes.txt; only the names are lost
            names = [f"attribute_{k:03d}" for k in range(1, NUM_ATTRIBUTES + 1)]
        is_train = np.asarray([split_of[i].strip() == "1" for i, _ in images])
        splits = {}
        for split, mask in (("train", is_train), ("test", ~is_train)):
            rows = np.flatnonzero(mask)
            splits[split] = SplitRows(image_ids=[images[r][0] for r in rows], paths=[images[r][1] for r in rows],
                                      labels=labels[rows])
        if params.check_images:
            for split in ("train", "test"):
                require_images(cub / "images", splits[split].paths, str(cub / "images.txt"), HINT)
        return OfficialSplits(
            class_names=names,
            image_root=str((cub / "images").relative_to(raw_dir)),
            train=splits["train"],
            test=splits["test"],
            provenance={"source": "CUB-200-2011 attributes/image_attribute_labels.txt (is_present)",
                        "attribute_names": str(attributes_file.relative_to(raw_dir)) if attributes_file else None,
                        "procedure": "cole2021 format_cub: images.txt order, train_test_split.txt (1 -> train), "
                                     "312 is_present labels, certainty ignored; official test -> test",
                        "npy_label_dtype": "int64"},
        )
