"""Stage behaviour through the CLI: determinism, bad input, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tables import read_label_table, read_observed_table

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})


def invoke(*args):
    return runner.invoke(app, list(args))


def test_sample_twice_gives_identical_content(tiny_workspace):
    first = read_observed_table("data/sampled/synthetic.parquet")
    Path("data/sampled/synthetic.parquet").unlink()
    assert invoke("sample", "synthetic").exit_code == 0
    second = read_observed_table("data/sampled/synthetic.parquet")
    assert np.array_equal(first.labels, second.labels)
    assert list(first.image_id) == list(second.image_id)
    assert first.meta == second.meta
    assert first.meta["seed"] == 1200 and "cole2021" in first.meta["procedure"]
    labels = read_label_table("data/prepared/synthetic.parquet")
    assert first.meta["source_labels_sha256"] == labels.meta["provenance"]["labels_sha256"]
    # exactly one observed positive per row, and it is a true positive
    assert (first.labels.sum(1) == 1).all()
    assert ((first.labels == 1) <= (labels.labels == 1)).all()


def test_prepare_split_sizes_and_order(tiny_workspace):
    table = read_label_table("data/prepared/synthetic.parquet")
    assert (table.split == "train").sum() == 96 and (table.split == "val").sum() == 24
    assert (table.split == "test").sum() == 40
    train_rows = table.official_rows("train")
    assert list(table.official_index[train_rows]) == list(range(120))


@pytest.mark.parametrize("args, fragment", [
    (("prepare", "nosuchset"), "unknown dataset 'nosuchset'; valid datasets: "),
    (("train", "synthetic", "nosuchmethod"), "unknown method 'nosuchmethod'; valid methods: "),
])
def test_unknown_names_give_one_line_listing_valid_names(tiny_workspace, args, fragment):
    result = invoke(*args)
    assert result.exit_code == 2
    assert fragment in result.output
    assert "synthetic" in result.output or "an" in result.output
    assert "Traceback" not in result.output


def test_params_value_of_wrong_type_is_refused_and_nothing_written(tiny_workspace):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["default"]["epochs"] = "many"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = invoke("train", "synthetic", "an")
    assert result.exit_code == 2
    assert "train.epochs must be int" in result.output
    assert not Path("runs").exists() or not any(Path("runs").rglob("*"))


def test_wrong_table_schema_is_refused(tiny_workspace):
    path = Path("data/prepared/synthetic.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "labels": [1]}), path)
    result = invoke("sample", "synthetic")
    assert result.exit_code == 2
    assert "wrong schema" in result.output and "synthetic.parquet" in result.output


def test_missing_and_corrupt_images_are_named(tiny_workspace):
    table = read_label_table("data/prepared/synthetic.parquet")
    root = Path(table.meta["image_root"])
    victim = root / table.path[table.rows("val")[0]]
    victim.write_bytes(b"not a png")
    result = invoke("train", "synthetic", "an")
    assert result.exit_code == 2 and "corrupt" in result.output and victim.name in result.output
    victim.unlink()
    result = invoke("train", "synthetic", "an")
    assert result.exit_code == 2 and "missing" in result.output and victim.name in result.output
    assert not Path("runs/synthetic/an/0").exists()
    assert not list(Path("runs/synthetic/an").glob(".*tmp-*"))  # no temporaries left either


def test_failed_stage_keeps_previous_output_and_leaves_no_temporaries(tiny_workspace, monkeypatch):
    from stages import prepare

    before = Path("data/prepared/synthetic.parquet").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # like Ctrl-C in the middle of writing

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare.run("synthetic")
    assert Path("data/prepared/synthetic.parquet").read_bytes() == before
    assert not list(Path("data/prepared").glob(".*tmp-*"))


def test_train_writes_outputs_and_is_deterministic(tiny_workspace):
    from pipeline.train import load_checkpoint

    assert invoke("train", "synthetic", "an", "--seed", "1").exit_code == 0
    assert invoke("train", "synthetic", "an", "--seed", "1", "--out", "runs/again").exit_code == 0
    run = Path("runs/synthetic/an/1")
    first, second = (json.loads((p / "metrics.json").read_text()) for p in (run, Path("runs/again")))
    for key in ("val_map", "test_map", "best_epoch", "test_per_class_ap"):
        assert first[key] == second[key]
    assert len(first["test_per_class_ap"]) == 20 and 1 <= first["best_epoch"] <= 2
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 3
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["method"] == "an"
    checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["epoch"] == first["best_epoch"] and "head.weight" in checkpoint["model"]
