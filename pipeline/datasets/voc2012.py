"""PASCAL VOC 2012 (classification labels from ``ImageSets/Main``), formatted as Cole et al. do.

Per phase (official ``train`` -> our train split, official ``val`` -> our test split), every class file
``ImageSets/Main/<class>_<phase>.txt`` lists each image once as ``<id> <label>`` with label 1 (present),
-1 (absent) or 0 ("difficult"). Only 1 is a positive (difficult counts as negative), an image is kept
only if it has a positive, and rows are the file names ``<id>.jpg`` in sorted order. The last
whitespace field is the label because positives are right-aligned with two spaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.datasets import ArchiveParams, OfficialSplits, SplitRows, register_dataset
from pipeline.datasets.formats import find_first, read_lines, require_images
from pipeline.download import Archive, obtain
from pipeline.errors import SpmlError

CLASS_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
ARCHIVES = [
    Archive(
        filename="VOCtrainval_11-May-2012.tar",
        urls=(
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "https://data.pjreddie.com/files/VOCtrainval_11-May-2012.tar",
        ),
        size=1_999_639_040,
        md5="6cd6e144f989b92b3379bac3b3de84fd",
    ),
]
HINT = "pass the VOC 2012 trainval tar or its extracted folder: `spml download voc2012 --source PATH`"


def find_root(raw_dir: Path) -> Path:
    """The VOC2012 folder, whether the raw dir holds VOCdevkit/VOC2012, VOC2012 or its content."""
    candidates = [raw_dir / "VOCdevkit" / "VOC2012", raw_dir / "VOC2012", raw_dir]
    main = find_first([c / "ImageSets" / "Main" for c in candidates], "VOC 2012 ImageSets/Main", HINT)
    return main.parent.parent


def read_phase(root: Path, phase: str) -> SplitRows:
    positives: dict[str, np.ndarray] = {}
    for index, name in enumerate(CLASS_NAMES):
        path = root / "ImageSets" / "Main" / f"{name}_{phase}.txt"
        for number, line in enumerate(read_lines(path, HINT), start=1):
            fields = line.split()
            if len(fields) < 2 or fields[-1] not in ("1", "-1", "0"):
                raise SpmlError(f"{path}:{number}: malformed line {line!r}; expected '<image_id> <1|0|-1>'")
            row = positives.setdefault(fields[0], np.zeros(len(CLASS_NAMES), dtype=np.int8))
            if fields[-1] == "1":
                row[index] = 1
    kept = sorted(image_id for image_id, row in positives.items() if row.any())
    labels = np.stack([positives[i] for i in kept]) if kept else np.zeros((0, len(CLASS_NAMES)), np.int8)
    return SplitRows(image_ids=kept, paths=[f"{i}.jpg" for i in kept], labels=labels)


@register_dataset("voc2012")
class Voc2012:
    """Download: the trainval tar (resumable, MD5-checked), or ``--source`` the tar or an extracted folder."""

    Params = ArchiveParams  # source, url, check_images

    def download(self, raw_dir: Path, params: ArchiveParams, source: Path | None) -> None:
        url = params.url
        obtain(ARCHIVES, "voc2012", raw_dir, source, {ARCHIVES[0].filename: url} if url is not None else None)
        find_root(raw_dir)  # fail now, not at prepare, if the folder is not VOC

    def load_official(self, raw_dir: Path, params: ArchiveParams) -> OfficialSplits:
        root = find_root(raw_dir)
        train, test = read_phase(root, "train"), read_phase(root, "val")
        image_dir = root / "JPEGImages"
        if params.check_images:
            for rows, phase in ((train, "train"), (test, "val")):
                require_images(image_dir, rows.paths, f"{root}/ImageSets/Main/*_{phase}.txt", HINT)
        return OfficialSplits(
            class_names=list(CLASS_NAMES),
            image_root=str((root / "JPEGImages").relative_to(raw_dir)),
            train=train,
            test=test,
            provenance={"source": "PASCAL VOC 2012 ImageSets/Main/<class>_{train,val}.txt",
                        "procedure": "cole2021 format_pascal: label 1 positive (0 difficult and -1 negative), "
                                     "images with a positive, sorted names; official val -> test",
                        "npy_label_dtype": "float64"},
        )
