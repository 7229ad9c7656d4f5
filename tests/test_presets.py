"""The paper presets resolve for every dataset x method of their tables, with the paper's settings."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.config import load_params
from pipeline.train import resolve_run_config
from tests.conftest import REPO

PAPER = {"voc2012", "coco2014", "nuswide", "cub"}


def _params(tmp_path, preset):
    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["preset"] = preset
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


@pytest.mark.parametrize("preset,model,optimizer,scheduler,gamma", [
    ("paper-resnet50", "resnet50", "adam", "none", 0.4), ("paper-q2l", "q2l", "adamw", "onecycle", 0.8)])
def test_paper_preset(tmp_path, preset, model, optimizer, scheduler, gamma):
    params = _params(tmp_path, preset)
    assert set(params["datasets"]) == PAPER and "ignore" in params["methods"] and "an" in params["methods"]
    for dataset in params["datasets"]:
        for method in params["methods"]:
            run = resolve_run_config(params, dataset, method, 0)
            assert run.train.model == model and run.train.image_size == 448 and run.train.batch_size == 16
            assert run.train.epochs == 25 and run.train.optimizer == optimizer and run.train.scheduler == scheduler
            assert run.model_kwargs["weights"] == "imagenet"
        ignore = resolve_run_config(params, dataset, "ignore", 0).method_params
        assert ignore["cam_threshold"] == gamma and ignore["warmup_epochs"] == 3
    # the per-dataset loss weights of the paper's section 4.1
    weights = {ds: resolve_run_config(params, ds, "ignore", 0).method_params for ds in PAPER}
    if model == "q2l":
        assert weights["coco2014"]["reg_weight"] == 0.1 and weights["voc2012"]["reg_weight"] == 0.5
        assert all(w["spbc_weight"] == 0.5 for w in weights.values())
        assert "plc-lac" in params["methods"]
    else:
        assert weights["cub"]["spbc_weight"] == 0.5 and weights["voc2012"]["spbc_weight"] == 0.1
        assert resolve_run_config(params, "voc2012", "an", 0).train.head_lr_mult == 10.0
