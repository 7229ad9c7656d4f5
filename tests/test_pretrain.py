"""Stage `pretrain`: the smallcnn trunk pretrained on a disjoint source task, and how train cells use it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets.synthetic import SHAPES, SOURCE_SHAPES, _shape_mask
from pipeline.models import build_model, weight_files
from pipeline.pretrain import PretrainParams, render_source
from tests.conftest import tiny_params, write_params
from tests.helpers import sh, tiny_repo

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_source_task_never_uses_a_benchmark_class():
    assert len(SOURCE_SHAPES) == 20 and not set(SOURCE_SHAPES) & set(SHAPES)
    # not only other names: no source shape is a benchmark shape at any rotation (best IoU over 72 angles)
    for name, source in SOURCE_SHAPES.items():
        a = _shape_mask(source, 48, 24, 24, 20, 0.0)
        for other, shape in SHAPES.items():
            best = max(((a & b).sum() / (a | b).sum()) for b in
                       (_shape_mask(shape, 48, 24, 24, 20, t) for t in np.linspace(0, 2 * np.pi, 72)))
            assert best < 0.9, (name, other, best)


def test_source_rendering_is_deterministic_and_labels_match_the_drawn_shapes():
    p = PretrainParams(num_images=30, holdout_fraction=0.2, image_size=32, seed=5,
                       objects_per_image=[0.5, 0.5], object_size=[0.3, 0.45], min_visible=0.6,
                       epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0)
    images, labels = render_source(p)
    again, labels_again = render_source(p)
    assert images.shape == (30, 32, 32, 3) and labels.shape == (30, 20)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert set(labels.sum(1)) <= {1.0, 2.0} and labels.sum() > 30


@pytest.mark.parametrize("change, fragment", [
    ({"epochs": 0}, "params pretrain.smallcnn.epochs must be >= 1"),
    ({"objects_per_image": [0.5, 0.6]}, "objects_per_image must be 1 to 20"),
    ({"object_size": [0.5, 0.2]}, "object_size must be [min, max]"),
    ({"num_images": 20, "holdout_fraction": 0.01}, "leaves an empty split"),
])
def test_bad_pretrain_params_are_one_line_errors(workspace, change, fragment):
    params = tiny_params()
    params["pretrain"]["smallcnn"].update(change)
    write_params(workspace, params)
    one_line_error(invoke("pretrain"), fragment)


def test_missing_pretrain_block_is_one_line_error(workspace):
    params = tiny_params()
    del params["pretrain"]
    write_params(workspace, params)
    one_line_error(invoke("pretrain"), "params pretrain.smallcnn is missing")


def test_pretrain_then_train_starts_from_the_pretrained_trunk(tiny_workspace):
    assert invoke("pretrain").exit_code == 0
    metrics = json.loads((tiny_workspace / "data/pretrained/smallcnn/metrics.json").read_text())
    assert metrics["source_classes"] == list(SOURCE_SHAPES) and 0 <= metrics["holdout_map"] <= 100
    saved = torch.load(tiny_workspace / "data/pretrained/smallcnn/trunk.pt", weights_only=True)
    model = build_model("smallcnn", 20, width=8, weights="pretrained")
    for key, value in saved["trunk"].items():
        assert torch.equal(model.trunk.state_dict()[key], value), key
    scratch = build_model("smallcnn", 20, width=8, weights="none")
    assert not torch.equal(scratch.trunk[0][0].weight, model.trunk[0][0].weight)
    # a run's resume key hashes the trunk file, so a retrained trunk never resumes a stale run
    assert weight_files("smallcnn", {"width": 8, "weights": "pretrained"}) == [
        tiny_workspace.joinpath("data/pretrained/smallcnn/trunk.pt").relative_to(tiny_workspace)]
    assert weight_files("smallcnn", {"width": 8, "weights": "none"}) == []

    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())
    params["models"]["smallcnn"]["weights"] = "pretrained"
    write_params(tiny_workspace, params)
    result = invoke("train", "synthetic", "an", "--out", "runs/x")
    assert result.exit_code == 0, result.output
    assert json.loads((tiny_workspace / "runs/x/config.json").read_text())["model_kwargs"]["weights"] == "pretrained"

    params["models"]["smallcnn"]["width"] = 6
    write_params(tiny_workspace, params)
    one_line_error(invoke("train", "synthetic", "an", "--out", "runs/y"), "has width 8", "rerun `spml pretrain`")


def test_train_without_the_pretrain_output_is_one_line_error(tiny_workspace):
    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())
    params["models"]["smallcnn"]["weights"] = "pretrained"
    write_params(tiny_workspace, params)
    one_line_error(invoke("train", "synthetic", "an", "--out", "runs/x"),
                   "pretrained smallcnn trunk data/pretrained/smallcnn/trunk.pt does not exist", "spml pretrain")


def test_pretrain_refuses_a_folder_holding_user_files(tiny_workspace):
    user = tiny_workspace / "data/pretrained/smallcnn/notes.txt"
    user.parent.mkdir(parents=True)
    user.write_text("mine")
    one_line_error(invoke("pretrain"), "holds files that are not the pretrain stage's")
    assert user.read_text() == "mine"


def _status(repo) -> set[str]:
    out = json.loads(sh(repo, "dvc", "status", "--json"))
    return set(out)


@pytest.mark.slow
def test_pretrain_is_a_train_dependency_and_reruns_only_for_its_own_params(tmp_path):
    repo = tiny_repo(tmp_path / "repo", methods=("an",), seeds=(0,), epochs=1)
    sh(repo, "dvc", "repro")
    assert _status(repo) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["default"]["lr"] = 1e-3  # a train param: train cells only
    write_params(repo, params)
    assert _status(repo) == {"train@synthetic-an-0"}

    params["pretrain"]["smallcnn"]["epochs"] = 2  # its own param: pretrain, and every train cell after it
    write_params(repo, params)
    changed = _status(repo)
    assert "pretrain" in changed and "train@synthetic-an-0" in changed
    out = sh(repo, "dvc", "repro", "pretrain")
    assert "Running stage 'pretrain'" in out and "Running stage 'train" not in out
    status = json.loads(sh(repo, "dvc", "status", "--json"))
    assert "pretrain" not in status
    assert any("data/pretrained/smallcnn" in json.dumps(entry) for entry in status["train@synthetic-an-0"])
