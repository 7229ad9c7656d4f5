"""The paper presets resolve for every dataset x method of their tables, with the paper's settings."""

from __future__ import annotations

import pytest

from pipeline.config import compose_params, preset_names
from pipeline.errors import SpmlError
from pipeline.run_config import resolve_run_config
from tests.conftest import REPO

PAPER = {"voc2012", "coco2014", "nuswide", "cub"}


def preset_params(tmp_path, preset):
    """params.yaml composed with presets/PRESET.yaml, as `dvc exp run -S +presets=PRESET` composes it."""
    return compose_params(REPO / "params.yaml", [f"+presets={preset}"])


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


def test_every_preset_composes_and_resolves_for_its_whole_grid(tmp_path):
    """Each presets/*.yaml names its source, composes over params.yaml, and every cell of the grid it trains
    (datasets x (methods + ablations + vl_methods)) resolves to a valid run configuration."""
    names = preset_names(REPO)
    assert {"all-methods", "paper-resnet50", "paper-q2l", "ignore-paper", "cole-grid"} <= set(names)
    for name in names:
        text = (REPO / "presets" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name  # merged at the top level, as params.yaml
        assert "# Source:" in text, name
        params = preset_params(tmp_path, name)
        for dataset in params["datasets"]:
            for method in params["methods"] + params["ablations"] + params["vl_methods"]:
                resolve_run_config(params, dataset, method, 0)


def test_all_methods_preset_names_every_method_once():
    from pipeline.methods import get_method_class, method_names

    params = compose_params(REPO / "params.yaml", ["+presets=all-methods"])
    trained = params["methods"] + params["ablations"] + params["vl_methods"]
    assert sorted(trained) == sorted(set(method_names()) - {"plc-lac"})  # plc-lac needs Query2Label
    assert all(get_method_class(m).ablation_of == "ignore" for m in params["ablations"])
    assert sorted(params["vl_methods"]) == ["aevlp", "vlpl"]  # the CLIP-based ones train in train-vl
    assert params["seeds"] == [0, 1, 2]
    scratch = compose_params(REPO / "params.yaml", ["+presets=all-methods-scratch"])
    assert scratch["methods"] == params["methods"] and scratch["models"]["smallcnn"]["weights"] == "none"
    assert scratch["vl_methods"] == params["vl_methods"]


def test_paper_resnet50_preset_has_the_methods_after_ignore_with_real_clip():
    """GR Loss trains in `train`, VLPL and AEVLP in `train-vl` with their official CLIP models (pinned)."""
    from pipeline.clip import clip_params

    params = compose_params(REPO / "params.yaml", ["+presets=paper-resnet50"])
    assert "gr-loss" in params["methods"] and params["vl_methods"] == ["vlpl", "aevlp"]
    for dataset in params["datasets"]:
        vlpl, aevlp = clip_params(params, dataset, "vlpl"), clip_params(params, dataset, "aevlp")
        assert (vlpl.model, vlpl.image_size, vlpl.tiles, vlpl.text_gcn) == ("ViT-L-14-336", 336, 0, "none")
        assert (aevlp.model, aevlp.image_size, aevlp.text_gcn) == ("ViT-B-16", 224, "random")
        assert aevlp.tiles == (5 if dataset == "cub" else 4) and aevlp.prompt == "a photo of a {}."
        assert vlpl.random_init_config is None and aevlp.random_init_config is None
        assert vlpl.sha256.startswith("3035c92b") and aevlp.sha256.startswith("5806e77c")


def test_ignore_paper_preset_reaches_the_table_3_rows():
    params = compose_params(REPO / "params.yaml", ["+presets=ignore-paper"])
    for name in ("ignore", "ignore-gap", "an-cons"):
        run = resolve_run_config(params, "synthetic", name, 0)
        assert run.method_params["cam_threshold"] == 0.4 and run.method_params["warmup_mode"] == "an"
        # the published lambda, for the timeline rule to map (no hand-converted synthetic block)
        assert run.method_params["gap_decay"] == 0.999


def test_an_unknown_preset_is_a_one_line_error_naming_the_presets():
    with pytest.raises(SpmlError, match="presets: all-methods, "):
        compose_params(REPO / "params.yaml", ["+presets=no-such-preset"])
