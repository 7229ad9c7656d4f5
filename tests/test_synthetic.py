import json

import numpy as np
from PIL import Image

from pipeline.datasets.synthetic import CLASS_NAMES, SHAPES, generate
from pipeline.tables import read_label_table
from tests.conftest import tiny_params


def test_twenty_shape_classes_and_enough_positives_per_image():
    assert len(CLASS_NAMES) == 20 == len(SHAPES)
    probs = np.array(tiny_params()["data"]["synthetic"]["objects_per_image"])
    assert (np.arange(1, len(probs) + 1) * probs).sum() >= 2.2  # expected objects (distinct classes) per image


def test_generation_is_seeded(tmp_path):
    params = {**tiny_params()["data"]["synthetic"], "num_train": 6, "num_test": 2, "image_size": 32, "seed": 7}
    generate(tmp_path / "a", params)
    generate(tmp_path / "b", params)
    a, b = (json.loads((tmp_path / d / "annotations.json").read_text()) for d in "ab")
    assert a == b
    for rec in a["images"]:
        img_a = np.asarray(Image.open(tmp_path / "a" / "images" / rec["file"]))
        img_b = np.asarray(Image.open(tmp_path / "b" / "images" / rec["file"]))
        assert np.array_equal(img_a, img_b)


def test_labels_and_instance_masks_agree(tiny_workspace):
    table = read_label_table("data/prepared/synthetic.parquet")
    stats = table.meta["stats"]
    assert stats["num_train"] + stats["num_val"] == 120 and stats["num_test"] == 40
    assert stats["mean_positives_train"] >= 2.0
    assert (table.labels.sum(1) >= 1).all() and (table.labels.sum(1) <= 4).all()
    freq = table.labels.mean(0)
    assert freq.max() > 2 * freq.min()  # unequal class frequencies
    root = table.meta["image_root"]
    for i in range(10):
        classes = table.extras["instance_classes"][i]
        assert sorted(classes) == sorted(np.flatnonzero(table.labels[i]).tolist())
        inst = np.asarray(Image.open(f"{root}/{table.extras['mask_path'][i]}"))
        # every object keeps visible pixels after occlusion
        assert set(range(1, len(classes) + 1)) <= set(np.unique(inst).tolist())
