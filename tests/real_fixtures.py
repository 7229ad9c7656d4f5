"""Tiny fixtures in each real dataset's on-disk format, with hand-worked expectations next to them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.datasets import cub as cub_module
from pipeline.datasets.nuswide import CLASS_NAMES as NUS_CLASSES
from pipeline.datasets.voc2012 import CLASS_NAMES as VOC_CLASSES

# ------------------------------------------------------------------------------------------------- VOC 2012
# Per phase: image id -> {class: label}; every other class is -1. Hand-worked result below.
VOC_TRAIN = {
    "2008_000010": {"aeroplane": 1, "person": 1},
    "2008_000002": {"cat": 1, "dog": 0},  # dog only "difficult": negative
    "2007_000005": {"bicycle": 1},
    "2009_000001": {"chair": 0},  # only difficult: dropped
    "2008_000003": {},  # all -1: dropped
}
VOC_VAL = {
    "2010_000020": {"tvmonitor": 1, "sofa": 1, "person": 0},
    "2007_000100": {"train": 1},
}
VOC_EXPECTED = {
    "train": (["2007_000005", "2008_000002", "2008_000010"], [["bicycle"], ["cat"], ["aeroplane", "person"]]),
    "test": (["2007_000100", "2010_000020"], [["train"], ["sofa", "tvmonitor"]]),
}


def make_voc(root: Path, images: bool = True) -> Path:
    """``root/VOCdevkit/VOC2012/{ImageSets/Main,JPEGImages}``; returns the VOC2012 folder."""
    voc = root / "VOCdevkit" / "VOC2012"
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for phase, table in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        for name in VOC_CLASSES:
            lines = []
            for image_id, labels in table.items():  # file order is not sorted on purpose
                label = labels.get(name, -1)
                lines.append(f"{image_id}  1" if label == 1 else f"{image_id} {label}")
            (main / f"{name}_{phase}.txt").write_text("\n".join(lines) + "\n")
        if images:
            for image_id in table:
                (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"jpg")
    return voc


# ------------------------------------------------------------------------------------------------ COCO 2014
COCO_CATEGORIES = [{"supercategory": "person", "id": 1, "name": "person"},
                   {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
                   {"supercategory": "vehicle", "id": 3, "name": "car"},
                   {"supercategory": "animal", "id": 17, "name": "cat"}]
# (image_id, category_id, iscrowd); image 25 and 31 have no annotation and are dropped
COCO_TRAIN_ANNS = [(9, 17, 0), (100000, 1, 1), (1000, 2, 0), (1000, 3, 0), (9, 17, 0), (100000, 3, 0), (4, 1, 0)]
COCO_TRAIN_IMAGES = [9, 25, 100000, 1000, 31, 4]
COCO_VAL_ANNS = [(77, 2, 0), (8, 17, 1), (123, 1, 0)]
COCO_VAL_IMAGES = [8, 77, 123, 5]
COCO_EXPECTED = {  # ids sorted as strings: "1000" < "100000" < "4" < "9"
    "train": (["1000", "100000", "4", "9"], [["bicycle", "car"], ["person", "car"], ["person"], ["cat"]]),
    "test": (["123", "77", "8"], [["person"], ["bicycle"], ["cat"]]),
}


def coco_json(images: list[int], anns: list[tuple[int, int, int]], phase: str, categories=None) -> dict:
    return {
        "info": {"description": "fixture"}, "licenses": [],
        "images": [{"id": i, "file_name": f"COCO_{phase}2014_{i:012d}.jpg", "height": 4, "width": 4} for i in images],
        "annotations": [{"segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] if not crowd else {"counts": [1, 2],
                                                                                             "size": [4, 4]},
                         "area": 3.0, "iscrowd": crowd, "image_id": img, "bbox": [0, 0, 1, 1], "category_id": cat,
                         "id": k} for k, (img, cat, crowd) in enumerate(anns)],
        "categories": categories or COCO_CATEGORIES,
    }


def make_coco(root: Path, images: bool = True, pretty: bool = False, jpeg: tuple[int, int] | None = None) -> Path:
    """``jpeg=(width, height)``: real photo-like JPEGs of that size (pipeline.tools.coco_like), else 3-byte stand-ins."""
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for phase, ids, anns in (("train", COCO_TRAIN_IMAGES, COCO_TRAIN_ANNS), ("val", COCO_VAL_IMAGES, COCO_VAL_ANNS)):
        text = json.dumps(coco_json(ids, anns, phase), indent=2 if pretty else None)
        (root / "annotations" / f"instances_{phase}2014.json").write_text(text)
        if images:
            (root / f"{phase}2014").mkdir()
            for i in ids:
                path = root / f"{phase}2014" / f"COCO_{phase}2014_{i:012d}.jpg"
                if jpeg is None:
                    path.write_bytes(b"jpg")
                else:
                    from pipeline.tools.coco_like import photo_like

                    photo_like(rng, *jpeg).save(path, "JPEG", quality=90)
    return root


# ---------------------------------------------------------------------------------------------- CUB-200-2011
CUB_IMAGES = [("1", "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", "0"),
              ("2", "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", "1"),
              ("3", "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", "1"),
              ("4", "200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg", "0")]
# image id -> present attribute ids (1-based); certainty differs but is ignored
CUB_PRESENT = {"1": {1, 312}, "2": {2, 150, 151}, "3": set(), "4": {7}}
CUB_EXPECTED = {"train": (["2", "3"], [[2, 150, 151], []]), "test": (["1", "4"], [[1, 312], [7]])}


def make_cub(root: Path, layout: str = "plain", images: bool = True) -> Path:
    """``plain``: root/attributes.txt + root/CUB_200_2011/...; ``nested``: one more CUB_200_2011 level."""
    top = root if layout == "plain" else root / "CUB_200_2011"
    cub = top / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    (top / "attributes.txt").write_text(
        "".join(f"{k} has_attr_{k:03d}::value_{k}\n" for k in range(1, cub_module.NUM_ATTRIBUTES + 1)))
    (cub / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _ in CUB_IMAGES))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in CUB_IMAGES))
    lines = []
    for image_id, _, _ in CUB_IMAGES:
        for attribute in range(1, cub_module.NUM_ATTRIBUTES + 1):
            present = int(attribute in CUB_PRESENT[image_id])
            certainty = 1 + attribute % 4
            extra = " 0" if attribute % 50 == 0 else ""  # some official lines carry an extra field
            lines.append(f"{image_id} {attribute} {present} {certainty} 12.5{extra}\n")
    (cub / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    if images:
        for _, path, _ in CUB_IMAGES:
            (cub / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            (cub / "images" / path).write_bytes(b"jpg")
    return root


# ------------------------------------------------------------------------------------------------- NUS-WIDE
def nus_arrays(seed: int = 0, n_train: int = 30, n_val: int = 12, num_classes: int = len(NUS_CLASSES)):
    rng = np.random.default_rng(seed)
    out = {}
    for phase, n in (("train", n_train), ("val", n_val)):
        labels = (rng.random((n, num_classes)) < 0.05).astype(np.float64)
        labels[0] = 0  # an all-zero row, as in 22% of Cole's files
        labels[1, :3] = 1
        folders = ["actor", "zebra", "beach"]
        images = np.asarray([f"{folders[k % 3]}/{k:04d}_{1000 + k}.jpg" for k in range(n)])
        if phase == "val":
            images = np.asarray([f"{folders[k % 3]}/{k:04d}_{9000 + k}.jpg" for k in range(n)])
        out[phase] = (images, labels)
    return out


def make_nus(root: Path, missing: int = 0, seed: int = 0, num_classes: int = len(NUS_CLASSES)) -> dict:
    """Formatted npy files + Flickr/ with the first ``missing`` train images absent."""
    arrays = nus_arrays(seed, num_classes=num_classes)
    root.mkdir(parents=True, exist_ok=True)
    for phase, (images, labels) in arrays.items():
        np.save(root / f"formatted_{phase}_images.npy", images)
        np.save(root / f"formatted_{phase}_labels.npy", labels)
        for k, rel in enumerate(images):
            if phase == "train" and k < missing:
                continue
            (root / "Flickr" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "Flickr" / rel).write_bytes(b"jpg")
    return arrays


def positives(labels: np.ndarray, names: list) -> list[list]:
    return [[names[c] for c in np.flatnonzero(row)] for row in labels]
