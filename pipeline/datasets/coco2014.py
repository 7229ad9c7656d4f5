"""MS-COCO 2014 instance labels, formatted as Cole et al. do.

From ``annotations/instances_{train,val}2014.json`` (official val -> our test split):

* class index = position of the category in the JSON ``categories`` list (sorted by id, so the rank of
  the id); train and val must have identical category lists;
* rows = the images that occur in at least one annotation (crowd annotations count), ordered by image
  id **sorted as decimal strings** ("100000" before "9"), as the community does;
* label 1 iff the image has an annotation of that category;
* paths ``{split}2014/COCO_{split}2014_{id:012d}.jpg`` relative to the COCO root.

Two loaders give identical results: ``pycocotools`` (the community's) and the default ``arrow``, which
parses only ``annotations[*].{image_id,category_id}`` and ``categories`` with pyarrow's JSON reader
(C++, skipping segmentation polygons without building Python objects) so that the 2014 files are read
in about a second with a few hundred MB instead of pycocotools' ~1 GB of Python dicts.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.datasets import DatasetParams, OfficialSplits, SplitRows, check_path, register_dataset
from pipeline.datasets.formats import require_images
from pipeline.download import Archive, obtain
from pipeline.errors import SpmlError

ARCHIVES = [
    Archive("annotations_trainval2014.zip",
            ("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",),
            252_872_794, "0a379cfc70b0e71301e0f377548639bd"),
    Archive("train2014.zip", ("http://images.cocodataset.org/zips/train2014.zip",),
            13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88"),
    Archive("val2014.zip", ("http://images.cocodataset.org/zips/val2014.zip",),
            6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
]
HINT = ("pass the COCO 2014 zips or the extracted folder (annotations/, train2014/, val2014/): "
        "`spml download coco2014 --source PATH`")
MAX_ARROW_BYTES = (1 << 31) - 2  # pyarrow's JSON block size is an int32


def annotation_file(raw_dir: Path, phase: str) -> Path:
    path = raw_dir / "annotations" / f"instances_{phase}2014.json"
    if not path.is_file():
        raise SpmlError(f"annotation file {path} does not exist; {HINT}")
    return path


def _read_arrow(path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(categories, image_id per annotation, category_id per annotation) via pyarrow's JSON reader."""
    import pyarrow as pa
    import pyarrow.json as pj

    size = path.stat().st_size
    if size > MAX_ARROW_BYTES:
        return _read_pycocotools(path)
    annotation = pa.struct([("image_id", pa.int64()), ("category_id", pa.int64())])
    category = pa.struct([("id", pa.int64()), ("name", pa.string()), ("supercategory", pa.string())])
    schema = pa.schema([("annotations", pa.list_(annotation)), ("categories", pa.list_(category))])
    try:  # the system allocator hands the file-sized buffers back at once (jemalloc's lazy purging may not
        # under CPU load, which would stack the train and val files' buffers in the peak)
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=size + 1, use_threads=False),
                             parse_options=pj.ParseOptions(explicit_schema=schema, newlines_in_values=True,
                                                           unexpected_field_behavior="ignore"),
                             memory_pool=pa.system_memory_pool())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        first = str(exc).splitlines()[0]
        raise SpmlError(f"annotation file {path} is not a valid COCO instances JSON ({first}); {HINT}") from None
    if table.num_rows != 1:
        raise SpmlError(f"annotation file {path} must hold one JSON object, found {table.num_rows}; {HINT}")
    annotations, categories = table.column("annotations").combine_chunks(), table.column("categories")
    if annotations.null_count or categories.null_count:
        key = "annotations" if annotations.null_count else "categories"
        raise SpmlError(f"annotation file {path} has no {key!r} list; {HINT}")
    flat = annotations.flatten()
    image_ids, category_ids = flat.field("image_id"), flat.field("category_id")
    if image_ids.null_count or category_ids.null_count:
        raise SpmlError(f"annotation file {path} has annotations without image_id or category_id; {HINT}")
    return (categories.to_pylist()[0], image_ids.to_numpy(zero_copy_only=False),
            category_ids.to_numpy(zero_copy_only=False))


def _read_pycocotools(path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
            coco = COCO(str(path))
        annotations = coco.dataset["annotations"]
        categories = [{k: c.get(k) for k in ("id", "name", "supercategory")} for c in coco.dataset["categories"]]
        image_ids = np.fromiter((a["image_id"] for a in annotations), dtype=np.int64, count=len(annotations))
        category_ids = np.fromiter((a["category_id"] for a in annotations), dtype=np.int64, count=len(annotations))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpmlError(f"annotation file {path} is not a valid COCO instances JSON ({exc!r}); {HINT}") from None
    return categories, image_ids, category_ids


def format_phase(categories: list[dict], image_ids: np.ndarray, category_ids: np.ndarray, phase: str,
                 where: Path) -> SplitRows:
    """The community's rows: annotated images, ids sorted as strings; labels by category position."""
    class_ids = np.asarray([c["id"] for c in categories], dtype=np.int64)
    if not len(class_ids):
        raise SpmlError(f"annotation file {where} has an empty categories list; {HINT}")
    if len(set(class_ids.tolist())) != len(class_ids):
        raise SpmlError(f"annotation file {where} lists a category id twice")
    id_order = np.argsort(class_ids, kind="stable")
    slot = np.searchsorted(class_ids, category_ids, sorter=id_order)
    slot = np.minimum(slot, len(class_ids) - 1)
    column = id_order[slot]
    unknown = class_ids[column] != category_ids
    if unknown.any():
        raise SpmlError(f"annotation file {where} has annotations of category {int(category_ids[unknown][0])}, "
                        "which is not in its categories list")
    unique_ids = np.unique(image_ids)  # numeric order
    string_order = np.argsort(unique_ids.astype(str), kind="stable")  # the community's row order
    row_of_unique = np.empty(len(unique_ids), dtype=np.int64)
    row_of_unique[string_order] = np.arange(len(unique_ids))
    rows = row_of_unique[np.searchsorted(unique_ids, image_ids)]
    labels = np.zeros((len(unique_ids), len(class_ids)), dtype=np.int8)
    labels[rows, column] = 1
    ordered = unique_ids[string_order].tolist()
    return SplitRows(image_ids=[str(i) for i in ordered],
                     paths=[f"{phase}2014/COCO_{phase}2014_{i:012d}.jpg" for i in ordered], labels=labels)


def _same_categories(a: list[dict], b: list[dict]) -> bool:
    key = ("id", "name", "supercategory")
    return [tuple(c.get(k) for k in key) for c in a] == [tuple(c.get(k) for k in key) for c in b]


@register_dataset("coco2014")
class Coco2014:
    """Download: the annotations zip and, unless ``images: false``, the train/val image zips (resumable,
    MD5-checked); or ``--source`` one zip, a folder holding the zips, or the extracted folder."""

    @dataclass
    class Params(DatasetParams):
        """``params.yaml: data.coco2014``; no defaults here, params.yaml holds every value."""

        source: str | None  # the zips, a folder of them or the extracted folder instead of downloading; download
        images: bool  # false: fetch the annotations zip only (labels without images); download
        loader: Literal["arrow", "pycocotools"]  # identical rows; arrow reads the JSON in a fraction of the memory
        check_images: bool  # prepare refuses a listed image that is absent

        def check(self, where: str) -> None:
            check_path(self.source, f"{where}.source")

    def download(self, raw_dir: Path, params: Params, source: Path | None) -> None:
        archives = ARCHIVES if params.images else ARCHIVES[:1]
        obtain(archives, "coco2014", raw_dir, source)
        for phase in ("train", "val"):
            annotation_file(raw_dir, phase)

    def load_official(self, raw_dir: Path, params: Params) -> OfficialSplits:
        loader = params.loader
        read = _read_arrow if loader == "arrow" else _read_pycocotools
        splits, categories = {}, {}
        for split, phase in (("train", "train"), ("test", "val")):
            path = annotation_file(raw_dir, phase)
            categories[phase], image_ids, category_ids = read(path)
            splits[split] = format_phase(categories[phase], image_ids, category_ids, phase, path)
            del image_ids, category_ids
        if not _same_categories(categories["train"], categories["val"]):
            raise SpmlError(f"{annotation_file(raw_dir, 'train')} and {annotation_file(raw_dir, 'val')} have "
                            "different category lists; both must come from the same COCO 2014 release")
        if params.check_images:
            for split, phase in (("train", "train"), ("test", "val")):
                require_images(raw_dir, splits[split].paths, os.fspath(annotation_file(raw_dir, phase)), HINT)
        return OfficialSplits(
            class_names=[c["name"] for c in categories["train"]],
            image_root=".",
            train=splits["train"],
            test=splits["test"],
            provenance={"source": "COCO 2014 annotations/instances_{train,val}2014.json", "loader": loader,
                        "procedure": "cole2021 format_coco: category index = position in categories, images with "
                                     ">=1 annotation (crowd included), ids sorted as strings; official val -> test",
                        "npy_label_dtype": "float64"},
        )
