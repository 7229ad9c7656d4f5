"""The prepare benchmark's generator and its equality check, at 1% of COCO 2014's size (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np

from pipeline.bench import prepared_data
from pipeline.bench_prepare import SHAPES, generate_coco, run


def test_generated_files_have_coco_shape(tmp_path):
    generate_coco(tmp_path, seed=1, scale=0.01)
    data = json.loads((tmp_path / "annotations" / "instances_val2014.json").read_text())
    images, annotated, annotations = (int(n * 0.01) for n in SHAPES["val"])
    assert len(data["images"]) == images and len(data["annotations"]) == annotations
    assert len({a["image_id"] for a in data["annotations"]}) == annotated
    assert len(data["categories"]) == 80 and any(a["iscrowd"] for a in data["annotations"])


def test_run_asserts_identical_outputs_and_the_bench_trains_on_its_rows(capsys):
    table = run("coco2014", seed=2, scale=0.005)
    out = capsys.readouterr().out
    assert "identical: yes" in out and "community" in out and "ours" in out
    data = prepared_data(table, seed=2)
    assert data.full.shape[1] == 80
    assert np.array_equal((data.observed.numpy() == 1).sum(1), (data.full.numpy().sum(1) > 0).astype(int))
    assert ((data.observed.numpy() == 1) <= (data.full.numpy() == 1)).all()
