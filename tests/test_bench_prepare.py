"""The prepare benchmark's generator and its equality check, at 1% of COCO 2014's size (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np

from pipeline.tools.bench import prepared_data
from pipeline.tools.bench_prepare import SHAPES, generate_coco, run
from tests.conftest import REPO


def test_generated_files_have_coco_shape(tmp_path):
    generate_coco(tmp_path, seed=1, scale=0.01)
    data = json.loads((tmp_path / "annotations" / "instances_val2014.json").read_text())
    images, annotated, annotations = (int(n * 0.01) for n in SHAPES["val"])
    assert len(data["images"]) == images and len(data["annotations"]) == annotations
    assert len({a["image_id"] for a in data["annotations"]}) == annotated
    assert len(data["categories"]) == 80 and any(a["iscrowd"] for a in data["annotations"])


def test_run_asserts_identical_outputs_and_the_bench_trains_on_its_rows(capsys):
    table = run("coco2014", seed=2, scale=0.005, params_path=REPO / "params.yaml")
    out = capsys.readouterr().out
    assert "identical: yes" in out and "community" in out and "ours" in out
    data = prepared_data(table, seed=2)
    assert data.full.shape[1] == 80
    assert np.array_equal((data.observed.numpy() == 1).sum(1), (data.full.numpy().sum(1) > 0).astype(int))
    assert ((data.observed.numpy() == 1) <= (data.full.numpy() == 1)).all()


def test_bench_prepare_steps_on_the_prepared_rows(monkeypatch, capsys):
    """`spml bench prepare coco2014`: the prepare benchmark (here at 0.5 % of COCO's size), then the step bench
    on its first rows at the prepared image size, with COCO's 80 classes."""
    import functools

    from pipeline.tools import bench, bench_prepare

    monkeypatch.setattr(bench_prepare, "run", functools.partial(bench_prepare.run, seed=2, scale=0.005))
    results, header = bench.run_bench(["an"], REPO / "params.yaml", steps=1, warmup=0, prepare="coco2014",
                                      device="cpu", threads=1, batch_size=4)
    assert "identical: yes" in capsys.readouterr().out
    assert [r.method for r in results] == ["an"] and header["image_size"] == bench.PREPARED_IMAGE_SIZE
