"""Protocols as data: every paper-preset row resolves to the protocol that docs/protocols.md lists for it,
and the protocol knobs (early stopping, weight EMA, drop_last, LAC views, two stages) do what they say."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.errors import SpmlError
from pipeline.run_config import resolve_run_config
from pipeline.train import should_stop
from tests.conftest import REPO
from tests.test_presets import preset_params

FIELDS = ("epochs", "batch_size", "lr", "head_lr_mult", "optimizer", "weight_decay", "scheduler", "drop_last",
          "eval_drop_last", "early_stop", "early_stop_value", "weight_ema", "augment", "two_stage")


def _value(text: str):
    if text == "-":
        return None
    if text.startswith("{"):  # a search over these values
        return {_value(part.strip()) for part in text.strip("{}").split(",")}
    return yaml.safe_load(text if not text[0].isdigit() else str(float(text)) if "e" in text else text)


# A checkable source: a file and its lines at a commit of a GitHub repository (owner/repo@commit:path#Lx-Ly),
# a paper's section, table or figure, or a statement that there is none.
REPO_REF = re.compile(r"`[\w.-]+/[\w.-]+@[0-9a-f]{7,40}:[^`\s#]+#L\d+(?:-L\d+)?`")
PAPER_REF = re.compile(r"\bpaper\b[^|]*?(?:section|§|Table|Fig\.)\s*\d", re.IGNORECASE)
NO_SOURCE = re.compile(r"no (?:checkable|external) source", re.IGNORECASE)


def has_source(text: str) -> bool:
    return bool(REPO_REF.search(text) or PAPER_REF.search(text) or NO_SOURCE.search(text))


def protocol_table() -> list[dict]:
    """The rows of the protocols table in docs/protocols.md."""
    lines = (REPO / "docs" / "protocols.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | dataset | model |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        cells["methods"] = [m.strip() for m in cells.pop("method").split(",")]
        rows.append(cells)
    return rows


def doc_row(rows, method, dataset, model) -> dict:
    matches = [r for r in rows if method in r["methods"] and r["dataset"] in (dataset, "*")
               and r["model"] in (model, "*")]
    assert matches, f"docs/protocols.md has no row for {method} on {dataset}/{model}"
    return max(matches, key=lambda r: (r["dataset"] != "*") + (r["model"] != "*"))


@pytest.mark.parametrize("preset", ["paper-resnet50", "paper-q2l"])
def test_every_paper_preset_row_resolves_to_the_documented_protocol(tmp_path, preset):
    params = preset_params(tmp_path, preset)
    rows = protocol_table()
    assert params["protocol"] == "original"
    checked = 0
    for dataset in params["datasets"]:
        for method in params["methods"] + params["vl_methods"]:
            run = resolve_run_config(params, dataset, method, 0)
            assert run.protocol == "original"
            row = doc_row(rows, method, dataset, run.train.model)
            for field in FIELDS:
                expected = _value(row[field])
                actual = getattr(run.train, field)
                if field == "early_stop_value" and expected is None:
                    continue  # the rule takes no value
                if isinstance(expected, set):  # a search: the points' values of this field
                    assert run.search, (method, dataset, field)
                    values = sorted({point[field] for point in run.search})
                    assert values == pytest.approx(sorted(float(v) for v in expected)), (method, dataset, field)
                    continue
                if isinstance(actual, float) or isinstance(expected, float):
                    assert actual == pytest.approx(float(expected)), (method, dataset, field)
                else:
                    assert actual == expected, (method, dataset, field, actual, expected)
            assert run.train.amp is False  # fp32 everywhere (Xie et al.'s scripts use AMP: docs/protocols.md)
            checked += 1
    assert checked == len(params["datasets"]) * len(params["methods"] + params["vl_methods"])


def test_every_paper_method_has_an_original_protocol_and_every_protocol_a_docs_row():
    # the methods of the paper presets run under their authors' protocol, so each has one; any other method may
    # have none (adding a method is one module and one params block: it then runs `unified`, tests/test_granularity)
    params = load_params(REPO / "params.yaml")
    rows = protocol_table()
    documented = {m for r in rows for m in r["methods"]}
    paper = set()
    for preset in ("paper-resnet50", "paper-q2l"):
        composed = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
        paper |= {m for key in ("methods", "ablations", "vl_methods") for m in composed.get(key) or []}
    assert len(paper) >= 15
    for name in sorted(paper):
        assert "original" in params["method_params"][name], name
    for name, block in params["method_params"].items():
        if "original" in block:
            assert name in documented, name  # a published protocol cites its source


def test_every_protocol_row_cites_a_checkable_source():
    rows = protocol_table()
    assert len(rows) >= 17
    for row in rows:
        assert has_source(row["source"]), f"docs/protocols.md row {row['methods']} / {row['dataset']} has no source " \
                                          f"reference (owner/repo@commit:file#Lx-Ly, a paper section or table, or " \
                                          f"'no checkable source'): {row['source']!r}"


def test_the_source_check_fails_on_a_row_without_a_reference():
    assert not has_source("Cole et al. 2021, `train.py`")  # a file without commit and line is not checkable
    assert not has_source("Zhou et al. 2022")
    assert not has_source("`Correr-Zhou/SPML-AckTheUnknown:main.py#L323`")  # no commit
    assert has_source("`Correr-Zhou/SPML-AckTheUnknown@9f960bc:main.py#L323-L325`")
    assert has_source("the IGNORE paper (ECCV 2024), section 4.1")
    assert has_source("ASL has no protocol of its own (no checkable source)")


def test_every_preset_source_line_is_checkable():
    from pipeline.config import preset_names

    for name in preset_names(REPO):
        text = (REPO / "presets" / f"{name}.yaml").read_text()
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("# Source:"))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("#")), len(lines))
        source = " ".join(line.lstrip("# ") for line in lines[start:end])  # the line and its continuation
        assert has_source(source), f"presets/{name}.yaml: its # Source: line cites nothing checkable: {source!r}"


def test_default_is_the_unified_protocol_in_fp32():
    run = resolve_run_config(load_params(REPO / "params.yaml"), "synthetic", "em", 0)
    assert run.protocol == "unified" and run.train.amp is False and run.train.epochs == 6


def test_unknown_protocol_is_a_one_line_error():
    from pipeline.errors import SpmlError

    params = load_params(REPO / "params.yaml")
    params["protocol"] = "authors"
    with pytest.raises(SpmlError, match="protocol must be one of unified, original"):
        resolve_run_config(params, "synthetic", "an", 0)
    del params["protocol"]
    with pytest.raises(SpmlError, match="params protocol is missing"):
        resolve_run_config(params, "synthetic", "an", 0)


def test_cole_grid_sweeps_batch_and_lr_of_every_cole_row_with_hydra():
    """`dvc exp run -S +presets=cole-grid -S cole_grid.batch_size=8 -S cole_grid.lr=1e-2` (one grid point of
    the Hydra sweep the preset documents) sets batch, eval batch and lr of all five Cole rows, nothing else."""
    from pipeline.config import compose_params

    params = compose_params(REPO / "params.yaml", ["+presets=cole-grid", "cole_grid.batch_size=8",
                                                   "cole_grid.lr=1e-2"])
    assert params["methods"] == ["an", "an-ls", "wan", "epr", "role"] and params["protocol"] == "original"
    for method in params["methods"]:
        run = resolve_run_config(params, "voc2012", method, 0)
        assert (run.train.batch_size, run.train.eval_batch_size, run.train.lr) == (8, 8, 0.01), method
        assert run.train.drop_last and run.train.epochs == 10  # the rest of Cole's protocol is untouched
    assert resolve_run_config(params, "voc2012", "em", 0).train.lr == 1.0e-5  # Zhou's row is not Cole's
    preset = (REPO / "presets" / "cole-grid.yaml").read_text()
    assert "-S 'cole_grid.batch_size=8,16' -S 'cole_grid.lr=1e-2,1e-3,1e-4,1e-5'" in preset


def test_spml_config_shows_the_official_ignore_defaults(monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["config", "synthetic", "ignore"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["method_params"]["cam_norm"] == "batch" and cfg["method_params"]["cam_threshold"] == 0.8
    assert cfg["train"]["amp"] is False and cfg["protocol"] == "unified"
    bad = CliRunner().invoke(app, ["config", "synthetic", "no-such-method"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


# ------------------------------------------------------------------------------------ the knobs
def H(*maps, ema=None):
    rows = [{"val_map": m} for m in maps]
    if ema is not None:
        for row, (raw, e) in zip(rows, ema):
            row.update(val_map_raw=raw, val_map_ema=e)
    return rows


@pytest.mark.parametrize("rule,value,history,stop", [
    ("none", 0, H(50, 40, 30), False),
    ("no_improvement", 0, H(50, 51), False),
    ("no_improvement", 0, H(50, 51, 51), True),  # a tie is not a new best
    ("drop", 3, H(50, 48), False),
    ("drop", 3, H(50, 46.9), True),
    ("patience", 2, H(50, 49, 49), False),  # 2 epochs since the best: not more than 2
    ("patience", 2, H(50, 49, 49, 49, ema=[(50, 40), (49, 41), (49, 42), (49, 41)]), True),
    ("patience", 2, H(50, 49, 49, 49, ema=[(50, 40), (49, 41), (49, 42), (49, 43)]), False),  # EMA at its best
    ("patience", 2, H(50, 49, 49, 49, ema=[(40, 50), (49, 41), (41, 42), (41, 41)]), False),  # raw best at 2
])
def test_early_stopping_rules(rule, value, history, stop):
    assert should_stop(rule, value, history) is stop


def test_weight_ema_tracks_weights_and_copies_counters():
    from pipeline.runtime.optim import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)
    assert torch.allclose(ema.model[0].weight, start + 0.1)
    assert int(ema.model[1].num_batches_tracked) == 5
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_a_two_stage_run_with_ema_lac_views_and_early_stopping(tiny_workspace):
    """PLC+LAC on a tiny Q2L: stage 1 (its stage-1 form, no LAC) then stage 2 from stage 1's best, with every
    protocol knob on, on the tiny synthetic data."""
    from stages import train
    from tests.test_plc_lac import TINY_Q2L

    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())
    params["protocol"] = "original"
    params["train"]["default"]["model"] = "q2l"
    params["models"]["q2l"] = {"weights": "none", **TINY_Q2L}
    params["method_params"]["plc-lac"]["default"].update(queue_size=16, proj_dim=8)
    params["method_params"]["plc-lac"]["original"] = {"default": {
        "epochs": 3, "batch_size": 16, "eval_batch_size": 16, "lr": 3.0e-3, "drop_last": True, "eval_drop_last": True,
        "early_stop": "no_improvement", "weight_ema": 0.5, "augment": "lac", "two_stage": True,
        "scheduler": "none", "optimizer": "adam", "weight_decay": 0.0}}
    (tiny_workspace / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = train.run("synthetic", "plc-lac", 0)
    assert metrics["protocol"] == "original" and metrics["stage1"]["method"] == "plc-lac"
    assert 2 <= metrics["stage1"]["epochs_run"] <= 3 and 2 <= metrics["epochs_run"] <= 3
    history = (tiny_workspace / "runs/synthetic/plc-lac/0/history.csv").read_text()
    assert "val_map_ema" in history.splitlines()[0] and "lac_loss" in history.splitlines()[0]
    config = json.loads((tiny_workspace / "runs/synthetic/plc-lac/0/config.json").read_text())
    assert config["train"]["two_stage"] and config["train"]["augment"] == "lac"
    assert config["method_params"]["stage1_epochs"] == 0  # stage 2 runs LAC from its first epoch
    assert not os.path.exists(tiny_workspace / "runs/.resume/synthetic/plc-lac/0")


def test_two_stage_for_a_method_without_a_stage_1_is_refused_before_training(tmp_path):
    params = load_params(REPO / "params.yaml")
    params["train"]["default"]["two_stage"] = True
    with pytest.raises(SpmlError, match="method 'em', which has no stage 1"):
        resolve_run_config(params, "synthetic", "em", 0)


# ------------------------------------------------------------------ strong view at full resolution
def test_strong_view_runs_randaugment_on_the_full_resolution_image_before_the_resize(tmp_path):
    """The official order: RandAugment(full-resolution PIL image) -> resize -> its own flip. The resize is torch's
    (pipeline.decode.resize_uint8), PIL's BILINEAR (the official code's) to within 1 level of 255."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import RandAugment

    from pipeline.data import TrainSet, load_images
    from pipeline.decode import resize_uint8

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "native.png")
    files = ["big.png", "native.png"]
    cached = load_images(tmp_path, files, 32)
    train = TrainSet(cached, torch.zeros(2, 3), torch.zeros(2, 3), strong=True, source=(tmp_path, files))
    for seed in range(5):
        torch.manual_seed(seed)
        torch.rand(())  # the weak view's flip comes first
        full = RandAugment(num_ops=3, magnitude=5)(Image.open(tmp_path / "big.png").convert("RGB"))
        pil = torch.from_numpy(np.asarray(full.resize((32, 32), Image.BILINEAR)).copy()).permute(2, 0, 1)
        expected = resize_uint8(torch.from_numpy(np.array(full)).permute(2, 0, 1), (32, 32))
        flip = bool(torch.rand(()) < 0.5)
        strong = train[(0, seed)]["strong"]
        assert torch.equal(strong, expected.flip(-1) if flip else expected)
        assert int(((strong.flip(-1) if flip else strong).int() - pil.int()).abs().max()) <= 1
        # an image stored at the training size augments the cached pixels (identical to its file)
        torch.manual_seed(seed)
        torch.rand(())
        native = RandAugment(num_ops=3, magnitude=5)(cached[1])
        native = native.flip(-1) if bool(torch.rand(()) < 0.5) else native
        assert torch.equal(train[(1, seed)]["strong"], native)
    # resizing first and augmenting after (the old order) gives other pixels
    torch.manual_seed(0)
    torch.rand(())
    resized_first = RandAugment(num_ops=3, magnitude=5)(cached[0])
    assert not torch.equal(train[(0, 0)]["strong"], resized_first)


def test_every_preset_is_listed_with_its_source_in_the_docs():
    """Each presets/NAME.yaml has a docs/ignore.md row (the file itself carries a `# Source:` line, checked in
    tests/test_presets.py)."""
    from pipeline.config import preset_names

    docs = (REPO / "docs" / "ignore.md").read_text()
    for name in preset_names(REPO):
        assert f"`{name}`" in docs, name


def test_reports_say_which_protocol_produced_a_table():
    import pandas as pd

    from pipeline.report import RUN_COLUMNS, results_markdown

    runs = pd.DataFrame([{"dataset": "voc2012", "method": "em", "model": "resnet50", "seed": 0,
                          "protocol": "original", "val_map": 80.0, "test_map": 79.0, "best_epoch": 3, "epochs": 10,
                          "train_seconds": 1.0, "test_classes_without_positives": 0}])
    assert "protocol" in RUN_COLUMNS  # the long runs table (reports/runs.csv) carries it per run
    text = results_markdown(runs, ["em"], ["voc2012"])
    assert "Training protocol: original" in text


# ------------------------------------------------------------------------------------ Cole et al.'s search
def test_cole_original_protocol_is_their_eight_point_search_batch_outer():
    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    for method in ("an", "an-ls", "wan", "epr", "role", "full"):
        run = resolve_run_config(params, "voc2012", method, 0)
        assert [(p["batch_size"], p["eval_batch_size"], p["lr"]) for p in run.search] == [
            (b, b, lr) for b in (8, 16) for lr in (1e-2, 1e-3, 1e-4, 1e-5)], method
        assert run.to_dict()["search"] == run.search and run.train.drop_last and run.train.eval_drop_last
    assert resolve_run_config(params, "voc2012", "em", 0).search is None
    assert "search" not in resolve_run_config(params, "voc2012", "em", 0).to_dict()  # single runs: as before


def test_the_selected_point_is_the_best_val_map_and_the_first_on_a_tie():
    from stages.train import best_point

    assert best_point([{"val_map": 50.0}, {"val_map": 52.0}, {"val_map": 51.0}]) == 1
    assert best_point([{"val_map": 50.0}, {"val_map": 52.0}, {"val_map": 52.0}]) == 1  # strictly better only


@pytest.mark.parametrize("search,fragment", [
    ([], "search must be a list of axes"),
    ([{"lr": [1.0e-3], "batch_size": [8, 16]}], "non-empty lists of the same length"),
    ([{"lr": []}], "non-empty lists of the same length"),
    ([{"lr": [-1.0]}], "lr must be > 0"),
    ([{"no_such_key": [1]}], "unknown params"),
])
def test_bad_searches_are_one_line_errors(search, fragment):
    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    params["method_params"]["an"]["original"] = {"default": {**params["method_params"]["an"]["original"]["default"],
                                                         "search": search}}
    with pytest.raises(SpmlError, match=fragment) as info:
        resolve_run_config(params, "voc2012", "an", 0)
    assert "\n" not in str(info.value)


def test_an_under_the_original_protocol_runs_and_selects_over_the_grid(tiny_workspace):
    """`protocol: original` for AN on the tiny data with a tiny grid (batch {8, 16} x lr {3e-3, 1e-7}, one
    epoch): every point is a full run, the cell keeps the best val mAP, and its metrics list every point."""
    from stages import train

    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())
    params["protocol"] = "original"
    cole = params["method_params"]["an"]["original"]["default"]
    cole.update(epochs=1, search=[{"batch_size": [8, 16], "eval_batch_size": [8, 16]}, {"lr": [3.0e-3, 1.0e-7]}])
    (tiny_workspace / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = train.run("synthetic", "an", 0)
    points = metrics["search"]
    assert [(p["batch_size"], p["lr"]) for p in points] == [(8, 3e-3), (8, 1e-7), (16, 3e-3), (16, 1e-7)]
    vals = [p["val_map"] for p in points]
    selected = metrics["search_selected"]
    assert selected == vals.index(max(vals)) and metrics["val_map"] == max(vals)
    assert metrics["test_map"] == points[selected]["test_map"] and metrics["protocol"] == "original"
    assert len(set(vals)) > 1  # the points are different runs
    config = json.loads((tiny_workspace / "runs/synthetic/an/0/config.json").read_text())
    assert (config["train"]["batch_size"], config["train"]["lr"]) == (points[selected]["batch_size"],
                                                                      points[selected]["lr"])
    assert "search" not in config and config["train"]["drop_last"]  # the selected point's own run config
    saved = json.loads((tiny_workspace / "runs/synthetic/an/0/metrics.json").read_text())
    assert saved["search"] == points and saved["search_selected"] == selected
    assert not list((tiny_workspace / "runs/.resume").rglob("*.search*"))  # nothing left behind


def test_a_method_without_an_original_block_runs_unified_and_the_report_says_so():
    import pandas as pd

    from pipeline.report import protocol_line

    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    del params["method_params"]["wan"]["original"]
    run = resolve_run_config(params, "synthetic", "wan", 0)
    assert run.protocol == "unified" and run.train.epochs == params["train"]["default"]["epochs"]
    assert run.reference.epochs is None  # no reference: its schedules (none) stay as set
    assert resolve_run_config(params, "synthetic", "an", 0).protocol == "original"
    runs = pd.DataFrame({"method": ["an", "wan"], "protocol": ["original", "unified"]})
    assert "Under `original`, wan ran `unified`: no `original` block" in protocol_line(runs)
    assert "ran `unified`" not in protocol_line(runs.iloc[:1])


def test_an_ablation_reads_its_methods_block():
    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    params["method_params"]["ignore"]["default"]["cam_threshold"] = 0.55
    params["method_params"]["ignore"]["original"]["default"]["epochs"] = 7
    for name in ("ignore-gap", "an-cons"):
        run = resolve_run_config(params, "synthetic", name, 0)
        assert run.method_params["cam_threshold"] == 0.55 and run.train.epochs == 7, name


def test_unread_params_are_named_with_what_overrides_them():
    from pipeline.unread import unread_params

    base = load_params(REPO / "params.yaml")
    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    params["train"]["default"]["lr"] = 0.5  # every grid method's own protocol sets lr: read by no cell
    params["train"]["default"]["eval_batch_size"] = 128  # read (no protocol of this grid sets it)
    params["method_params"]["ignore-gap"] = {"default": {"cam_threshold": 0.3}}
    params["ablations"] = ["ignore-gap"]
    found = {u.key: u for u in unread_params(params, base)}
    assert set(found) == {"train.default.lr", "method_params.ignore-gap"}
    assert {"method_params.em.original.default", "method_params.an.original (its search)"} <= set(found["train.default.lr"].overridden_by)
    assert "reads method_params.ignore" in found["method_params.ignore-gap"].message()
    assert unread_params(base, base) == []  # the repository's own values are not reported against themselves
    # a value for another grid's dataset or model is not unread, it is for that grid
    params = load_params(REPO / "params.yaml")
    params["train"]["coco2014"] = {"lr": 0.5}
    params["method_params"]["ignore"]["q2l"]["cam_threshold"] = 0.1
    assert unread_params(params, base) == []


def test_spml_config_names_the_preset_keys_no_cell_reads(tmp_path):
    """A preset that sets train.default.lr under protocol: original (every method's own protocol sets lr) is named
    on stderr, with what overrides it; the shipped paper presets set no such key."""
    import shutil
    import subprocess
    import sys

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    (tmp_path / "presets" / "dead-keys.yaml").write_text(
        "# @package _global_\nprotocol: original\ntrain:\n  default: {lr: 1.0e-5, optimizer: adam, image_size: 64}\n")

    def config(preset: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "synthetic", "an", "--preset", preset,
                               "--params", str(tmp_path / "params.yaml")], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)

    out = config("dead-keys")
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if line.startswith("warning: params")]
    assert {line.split()[2] for line in warned} == {"train.default.lr", "train.default.optimizer"}, out.stderr
    assert all("method_params.an.original" in line for line in warned)  # what overrides it, named
    for preset in ("paper-resnet50", "paper-q2l"):
        out = config(preset)
        assert out.returncode == 0 and "warning: params" not in out.stderr, (preset, out.stderr)
