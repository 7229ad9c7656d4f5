"""VOC 2012, COCO 2014, CUB-200-2011 and NUS-WIDE: community formatting on fixtures in each real layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from real_fixtures import (
    COCO_CATEGORIES,
    COCO_EXPECTED,
    COCO_TRAIN_ANNS,
    COCO_TRAIN_IMAGES,
    CUB_EXPECTED,
    CUB_IMAGES,
    VOC_EXPECTED,
    coco_json,
    make_coco,
    make_cub,
    make_nus,
    make_voc,
    positives,
)
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets import get_dataset
from pipeline.datasets.coco2014 import _read_arrow, _read_pycocotools, format_phase
from pipeline.datasets.nuswide import CLASS_NAMES as NUS_CLASSES
from pipeline.sampling import train_val_split
from pipeline.tables import read_label_table

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def prepared(name: str):
    return read_label_table(f"data/prepared/{name}.parquet")


def official(table, split):
    rows = table.official_rows(split)
    return list(table.image_id[rows]), table.labels[rows], list(table.path[rows])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # the console may wrap long lines
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)


# ------------------------------------------------------------------------------------------------- VOC 2012


def test_voc_rows_labels_and_split(workspace, tmp_path):
    make_voc(tmp_path / "src")
    assert invoke("download", "voc2012", "--source", tmp_path / "src").exit_code == 0
    assert invoke("prepare", "voc2012").exit_code == 0
    table = prepared("voc2012")
    assert table.class_names[0] == "aeroplane" and table.class_names[19] == "tvmonitor"
    for split in ("train", "test"):
        ids, labels, paths = official(table, split)
        assert ids == VOC_EXPECTED[split][0]
        assert positives(labels, table.class_names) == VOC_EXPECTED[split][1]
        assert paths == [f"{i}.jpg" for i in ids]
    assert Path(table.meta["image_root"]) == Path("data/raw/voc2012/VOCdevkit/VOC2012/JPEGImages")
    # the 80/20 split of the 3 official-train rows follows the community's RandomState(1200) rule
    _train_idx, val_idx = train_val_split(3, 0.2, 1200)
    rows = table.official_rows("train")
    assert list(np.flatnonzero(table.split[rows] == "val")) == list(val_idx) and len(val_idx) == 1
    assert (table.split[table.official_rows("test")] == "test").all()


def test_voc_bad_input(workspace, tmp_path):
    voc = make_voc(tmp_path / "src")
    assert invoke("download", "voc2012", "--source", tmp_path / "src").exit_code == 0
    raw = Path("data/raw/voc2012/VOCdevkit/VOC2012")
    (raw / "ImageSets/Main/cow_val.txt").unlink()
    assert_one_line_error(invoke("prepare", "voc2012"), "cow_val.txt does not exist")
    assert not Path("data/prepared/voc2012.parquet").exists()
    (raw / "ImageSets/Main/cow_val.txt").write_text((voc / "ImageSets/Main/cow_val.txt").read_text())
    (raw / "ImageSets/Main/dog_train.txt").unlink()  # raw files are hard links to the source: replace, not edit
    (raw / "ImageSets/Main/dog_train.txt").write_text("2008_000010 1\n2008_000002 yes\n")
    assert_one_line_error(invoke("prepare", "voc2012"), "dog_train.txt:2: malformed line")
    (raw / "ImageSets/Main/dog_train.txt").unlink()
    (raw / "ImageSets/Main/dog_train.txt").write_text((voc / "ImageSets/Main/dog_train.txt").read_text())
    (raw / "JPEGImages/2008_000002.jpg").unlink()
    assert_one_line_error(invoke("prepare", "voc2012"), "1 of 3 images", "2008_000002.jpg")
    assert not Path("data/prepared/voc2012.parquet").exists()


def test_voc_from_folder_that_is_not_voc(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("download", "voc2012", "--source", tmp_path / "empty"), "is an empty folder")
    assert not Path("data/raw/voc2012").exists()


# ------------------------------------------------------------------------------------------------ COCO 2014


@pytest.mark.parametrize("loader", ["arrow", "pycocotools"])
def test_coco_rows_sorted_as_strings_crowd_counted(workspace, tmp_path, loader):
    from conftest import tiny_params, write_params

    params = tiny_params()
    params["data"]["coco2014"]["loader"] = loader
    write_params(workspace, params)
    make_coco(tmp_path / "src")
    assert invoke("download", "coco2014", "--source", tmp_path / "src").exit_code == 0
    assert invoke("prepare", "coco2014").exit_code == 0
    table = prepared("coco2014")
    assert table.class_names == ["person", "bicycle", "car", "cat"]
    assert table.meta["provenance"]["loader"] == loader
    for split, phase in (("train", "train"), ("test", "val")):
        ids, labels, paths = official(table, split)
        assert ids == COCO_EXPECTED[split][0]
        assert positives(labels, table.class_names) == COCO_EXPECTED[split][1]
        assert paths == [f"{phase}2014/COCO_{phase}2014_{int(i):012d}.jpg" for i in ids]


def test_coco_arrow_loader_matches_pycocotools(tmp_path):
    """The fast reader is cross-checked against pycocotools on the same file, pretty-printed too."""
    rng = np.random.default_rng(5)
    images = rng.choice(10**6, 300, replace=False).tolist()
    anns = [(int(rng.choice(images[:250])), int(rng.choice([1, 2, 3, 17])), int(rng.random() < 0.1))
            for _ in range(900)]
    for pretty in (False, True):
        path = tmp_path / f"inst{pretty}.json"
        path.write_text(json.dumps(coco_json(images, anns, "train"), indent=1 if pretty else None))
        ours, theirs = _read_arrow(path), _read_pycocotools(path)
        assert ours[0] == theirs[0]
        a, b = format_phase(*ours, "train", path), format_phase(*theirs, "train", path)
        assert a.image_ids == b.image_ids and np.array_equal(a.labels, b.labels)
        # hand check of the ordering rule on this draw
        assert a.image_ids == sorted({str(i) for i, _, _ in anns})


def test_coco_bad_input(workspace, tmp_path):
    src = make_coco(tmp_path / "src")
    assert invoke("download", "coco2014", "--source", src).exit_code == 0
    ann = Path("data/raw/coco2014/annotations/instances_val2014.json")
    ann.unlink()
    ann.write_text(json.dumps(coco_json([1], [(1, 1, 0)], "val", categories=COCO_CATEGORIES[:3])))
    assert_one_line_error(invoke("prepare", "coco2014"), "different category lists")
    ann.unlink()
    ann.write_text('{"annotations": [{"image_id": 1, "category_id": 1}], "categories": [')  # truncated
    assert_one_line_error(invoke("prepare", "coco2014"), "instances_val2014.json is not a valid COCO")
    ann.unlink()
    ann.write_text(json.dumps(coco_json([1], [(1, 99, 0)], "val")))
    assert_one_line_error(invoke("prepare", "coco2014"), "category 99")
    ann.unlink()
    assert_one_line_error(invoke("prepare", "coco2014"), "instances_val2014.json does not exist")
    assert not Path("data/prepared/coco2014.parquet").exists()


def test_coco_missing_images(workspace, tmp_path):
    src = make_coco(tmp_path / "src")
    (src / f"train2014/COCO_train2014_{COCO_TRAIN_IMAGES[0]:012d}.jpg").unlink()
    assert invoke("download", "coco2014", "--source", src).exit_code == 0
    assert_one_line_error(invoke("prepare", "coco2014"), "1 of 4 images", "COCO_train2014_000000000009.jpg")
    assert len(COCO_TRAIN_ANNS) == 7


# ---------------------------------------------------------------------------------------------- CUB-200-2011


@pytest.mark.parametrize("layout", ["plain", "nested"])
def test_cub_both_layouts(workspace, tmp_path, layout):
    make_cub(tmp_path / "src", layout)
    assert invoke("download", "cub", "--source", tmp_path / "src").exit_code == 0
    assert invoke("prepare", "cub").exit_code == 0
    table = prepared("cub")
    assert len(table.class_names) == 312
    assert table.class_names[0] == "has_attr_001::value_1" and table.class_names[311] == "has_attr_312::value_312"
    paths = {i: p for i, p, _ in CUB_IMAGES}
    for split in ("train", "test"):
        ids, labels, rel = official(table, split)
        assert ids == CUB_EXPECTED[split][0]
        assert [list(np.flatnonzero(row) + 1) for row in labels] == CUB_EXPECTED[split][1]
        assert rel == [paths[i] for i in ids]
    nested = "CUB_200_2011/CUB_200_2011/images" if layout == "nested" else "CUB_200_2011/images"
    assert Path(table.meta["image_root"]) == Path("data/raw/cub") / nested
    assert table.meta["provenance"]["npy_label_dtype"] == "int64"


def test_cub_bad_input(workspace, tmp_path):
    make_cub(tmp_path / "src")
    assert invoke("download", "cub", "--source", tmp_path / "src").exit_code == 0
    labels_file = Path("data/raw/cub/CUB_200_2011/attributes/image_attribute_labels.txt")
    good = labels_file.read_text().splitlines(keepends=True)
    labels_file.unlink()
    labels_file.write_text("".join(good[:5] + ["3 6 maybe 2 1.0\n"] + good[6:]))
    assert_one_line_error(invoke("prepare", "cub"), "image_attribute_labels.txt: malformed line 6")
    labels_file.unlink()
    labels_file.write_text("".join(good[:-1]))
    assert_one_line_error(invoke("prepare", "cub"), "has 1,247 rows, expected 312 x 4")
    labels_file.unlink()
    labels_file.write_text("".join(good[:-1] + [good[0]]))
    assert_one_line_error(invoke("prepare", "cub"), "image 1 attribute 1 occurs 2 times")
    labels_file.unlink()
    assert_one_line_error(invoke("prepare", "cub"), "image_attribute_labels.txt does not exist")
    assert not Path("data/prepared/cub.parquet").exists()


# ------------------------------------------------------------------------------------------------- NUS-WIDE


def test_nuswide_from_formatted_files_reports_missing_images(workspace, tmp_path):
    arrays = make_nus(tmp_path / "nus", missing=3)
    assert_one_line_error(invoke("download", "nuswide"), "nuswide", "--source")
    result = invoke("download", "nuswide", "--source", tmp_path / "nus")
    assert result.exit_code == 0, result.output
    result = invoke("prepare", "nuswide")
    assert result.exit_code == 0, result.output
    assert "3 of 30 listed images are missing" in " ".join(result.output.split())
    table = prepared("nuswide")
    assert table.class_names == NUS_CLASSES and len(NUS_CLASSES) == 81
    report = table.meta["provenance"]["images_check"]
    assert report["train"]["missing"] == 3 and report["test"]["missing"] == 0
    assert report["train"]["examples"] == list(arrays["train"][0][:3])
    for split, phase in (("train", "train"), ("test", "val")):
        _ids, labels, paths = official(table, split)
        assert paths == list(arrays[phase][0])  # file order kept
        assert np.array_equal(labels, arrays[phase][1])  # all-zero rows kept
    assert Path(table.meta["image_root"]) == Path("data/raw/nuswide/Flickr")


def test_nuswide_wrong_class_count(workspace, tmp_path):
    make_nus(tmp_path / "nus", num_classes=80)
    assert invoke("download", "nuswide", "--source", tmp_path / "nus").exit_code == 0
    assert_one_line_error(invoke("prepare", "nuswide"), "has 80 classes, expected the 81")


def test_sources_are_registered():
    for name in ("voc2012", "coco2014", "nuswide", "cub"):
        assert get_dataset(name).name == name
