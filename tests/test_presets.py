"""The paper presets resolve for every dataset x method of their tables, with the paper's settings."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.config import load_params, preset_grid
from pipeline.train import resolve_run_config
from tests.conftest import REPO

PAPER = {"voc2012", "coco2014", "nuswide", "cub"}


def preset_params(tmp_path, preset):
    """params.yaml with ``preset`` active and its grid set, as `spml exp PRESET` runs it."""
    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["preset"] = preset
    params.update(preset_grid(params, preset))  # what `spml exp PRESET` passes to DVC with -S
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


@pytest.mark.parametrize("preset,model,optimizer,scheduler,gamma", [
    ("paper-resnet50", "resnet50", "adam", "none", 0.4), ("paper-q2l", "q2l", "adamw", "onecycle", 0.8)])
def test_paper_preset(tmp_path, preset, model, optimizer, scheduler, gamma):
    params = preset_params(tmp_path, preset)
    assert set(params["datasets"]) == PAPER and "ignore" in params["methods"] and "an" in params["methods"]
    for dataset in params["datasets"]:
        for method in params["methods"]:
            run = resolve_run_config(params, dataset, method, 0)
            assert run.train.model == model and run.train.image_size == 448 and not run.train.amp
            assert run.model_kwargs["weights"] == "imagenet"
        # every row runs its authors' protocol (tests/test_protocols.py checks each against docs/protocols.md);
        # IGNORE's own row: batch 16, 25 epochs, the model's optimizer and schedule
        run = resolve_run_config(params, dataset, "ignore", 0)
        assert run.train.batch_size == 16 and run.train.epochs == 25
        assert run.train.optimizer == optimizer and run.train.scheduler == scheduler
        ignore = run.method_params
        assert ignore["cam_threshold"] == gamma and ignore["warmup_epochs"] == 3
    # the per-dataset loss weights of the paper's section 4.1
    weights = {ds: resolve_run_config(params, ds, "ignore", 0).method_params for ds in PAPER}
    if model == "q2l":
        assert weights["coco2014"]["reg_weight"] == 0.1 and weights["voc2012"]["reg_weight"] == 0.5
        assert all(w["spbc_weight"] == 0.5 for w in weights.values())
        assert "plc-lac" in params["methods"]
    else:
        assert weights["cub"]["spbc_weight"] == 0.5 and weights["voc2012"]["spbc_weight"] == 0.1
        assert resolve_run_config(params, "voc2012", "ignore", 0).train.head_lr_mult == 10.0
        assert resolve_run_config(params, "voc2012", "an", 0).train.head_lr_mult == 1.0  # Cole: one lr


def test_a_preset_whose_grid_differs_from_dvcs_grid_is_refused(tmp_path):
    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["preset"] = "all-methods"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(Exception, match="run `spml exp all-methods`"):
        load_params(path)


def test_spml_exp_passes_the_presets_grid_to_dvc(monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["exp", "paper-resnet50", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dvc exp run -S preset=paper-resnet50" in result.output
    assert """'datasets=["voc2012","coco2014","nuswide","cub"]'""" in result.output
    assert "'seeds=[0]'" in result.output
