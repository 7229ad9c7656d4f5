"""`spml verify`: a committed table's cells re-trained in a temporary copy reproduce bit for bit (whatever stale
data the workspace holds), and a metric edited by hand in runs.csv is an error naming the cell, both values and
the command. The end-to-end test (test_pipeline_e2e.py) verifies a `dvc repro`'d table, with its trunk."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SpmlError
from pipeline.tools.tiny_repo import REPO, tiny_params, write_params
from pipeline.tools.verify import Cell, choose, verify
from tests.real_fixtures import make_coco


@pytest.fixture
def tiny_table(tiny_workspace):
    """One tiny cell trained at 1 thread and aggregated into table/ (as a committed table would be)."""
    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())
    params.update(datasets=["synthetic"], methods=["an"], ablations=[], vl_methods=[], seeds=[0])
    (tiny_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runner = CliRunner()
    env = {"SPML_THREADS": "1"}
    assert runner.invoke(app, ["train", "synthetic", "an", "--seed", "0"], env=env).exit_code == 0
    result = runner.invoke(app, ["aggregate", "--out", "table"])
    assert result.exit_code == 0, result.output
    return tiny_workspace / "table"


def test_verify_passes_then_names_an_edited_cell(tiny_table):
    """One tiny training serves the three checks: what runs.csv records, a clean verify, an edited metric."""
    runs = pd.read_csv(tiny_table / "runs.csv")
    row = runs.iloc[0]
    assert row.threads == 1 and row.allocator in ("jemalloc", "tcmalloc", "glibc") and isinstance(row.torch, str)
    metrics = json.loads((tiny_table.parent / "runs/synthetic/an/0/metrics.json").read_text())
    assert row.test_map == metrics["test_map"]  # every digit, not a rounded copy

    lines = []
    assert verify(tiny_table, None, root=tiny_table.parent, report=lines.append) == ["synthetic/an/0"]
    assert lines[-1].startswith("synthetic/an/0: identical")
    assert "pretrained trunk: built in the copy (this workspace has none)" in lines

    # the copy builds its own label tables: stale ones in this workspace (an older spml's, other params')
    # are never taken, so they cannot make a table that reproduces look as if it did not
    for table in ("data/prepared/synthetic.parquet", "data/sampled/synthetic.parquet"):
        (tiny_table.parent / table).write_bytes(b"not the table this code makes")
    lines = []
    assert verify(tiny_table, None, root=tiny_table.parent, report=lines.append) == ["synthetic/an/0"]
    assert lines[-1].startswith("synthetic/an/0: identical")

    recorded = runs.loc[0, "test_map"]
    runs.loc[0, "test_map"] = recorded + 0.01
    runs.to_csv(tiny_table / "runs.csv", index=False)
    result = CliRunner().invoke(app, ["verify", str(tiny_table), "--all"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error:" in text and "Traceback" not in text
    assert f"synthetic/an/0: test_map recorded {recorded + 0.01}, re-trained {recorded}" in text
    assert "SPML_THREADS=1" in text and "spml train synthetic an --seed 0" in text

    with pytest.raises(SpmlError, match="records no thread count"):
        runs.drop(columns=["threads"]).to_csv(tiny_table / "runs.csv", index=False)
        verify(tiny_table, 1, root=tiny_table.parent)


def test_a_real_datasets_raw_folder_is_linked_into_the_copy(workspace, tmp_path, monkeypatch):
    """A real dataset cannot be fetched again offline, so the copy links this workspace's raw folder (here
    data.coco2014.source is null: the download took --source), never copies it (COCO's is 20 GB). The copy
    prepares and samples from the link, and the cell reproduces."""
    from pipeline.tools import verify as tool

    seen, build = [], tool.build_upstream

    def spy(work, *args):
        seen.append((work / "data/raw/coco2014").resolve() if (work / "data/raw/coco2014").is_symlink() else None)
        build(work, *args)

    monkeypatch.setattr(tool, "build_upstream", spy)
    params = tiny_params()
    params.update(datasets=["coco2014"], methods=["an"], ablations=[], vl_methods=[], seeds=[0])
    write_params(workspace, params)
    make_coco(tmp_path / "src", jpeg=(40, 30))
    runner = CliRunner()
    for args in (["download", "coco2014", "--source", str(tmp_path / "src")], ["prepare", "coco2014"],
                 ["sample", "coco2014"], ["train", "coco2014", "an", "--seed", "0"], ["aggregate", "--out", "table"]):
        result = runner.invoke(app, args, env={"SPML_THREADS": "1"})
        assert result.exit_code == 0, (args, result.output)
    lines = []
    assert verify(workspace / "table", None, root=workspace, report=lines.append) == ["coco2014/an/0"]
    assert lines[-1].startswith("coco2014/an/0: identical"), lines
    assert seen == [(workspace / "data/raw/coco2014").resolve()]


def test_the_workspaces_trunk_is_taken_only_when_known_to_be_current(tmp_path):
    """Without a trunk, without dvc.yaml, or with a preset that changes what `pretrain` reads, the copy builds
    its own (the up-to-date case: test_pipeline_e2e.py)."""
    from pipeline.tools.verify import stale_trunk

    assert stale_trunk(tmp_path, {}) == "this workspace has none"
    (tmp_path / "data" / "pretrained").mkdir(parents=True)
    assert "no dvc.yaml" in stale_trunk(tmp_path, {})
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = write_params(tmp_path, tiny_params())
    composed = yaml.safe_load(params.read_text())
    composed["pretrain"]["smallcnn"]["epochs"] += 1
    composed["models"]["smallcnn"]["width"] += 1
    assert stale_trunk(tmp_path, composed) == "the preset changes pretrain, models.smallcnn.width"


def test_cells_are_drawn_by_a_seed():
    cells = [Cell("synthetic", m, s, 1, None, None) for m in ("an", "em", "ignore") for s in range(3)]
    assert choose(cells, 3, 0) == choose(cells, 3, 0) and len(choose(cells, 3, 0)) == 3
    assert choose(cells, None, 0) == cells and choose(cells, 50, 0) == cells
    with pytest.raises(SpmlError, match="--cells must be at least 1"):
        choose(cells, 0, 0)


def test_a_cell_the_copy_cannot_build_is_one_error_line(workspace):
    """A table naming a dataset this checkout does not know: the failing stage's own message, once prefixed."""
    from tests.helpers import assert_one_line_error

    runs = pd.read_csv(REPO / "reports" / "runs.csv").head(1).assign(dataset="nope")
    (workspace / "table").mkdir()
    runs.to_csv(workspace / "table" / "runs.csv", index=False)
    assert_one_line_error(CliRunner().invoke(app, ["verify", "table", "--all"]),
                          "building the copy's data failed at `spml download nope`: unknown dataset 'nope'")


def test_cells_and_all_together_are_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path), "--cells", "2", "--all"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--cells 2 and --all: pass one of them" in lines[0]
