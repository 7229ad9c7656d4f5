"""`spml check-lock`: which `dvc status` entries mean a stale dvc.lock, and the repository's own lock.

The detection on a real trained repository (params, stage file, command and grid edits) is in
tests/test_dvc_cache.py, which shares its trained temporary clone.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tools.check_lock import Stale, classify
from tests.conftest import copy_repo
from tests.helpers import run, sh

OUTS = ["data/raw/synthetic", "data/prepared/synthetic.parquet", "data/sampled/synthetic.parquet",
        "runs/synthetic/an/0/best.pt", "runs/synthetic/an/0/metrics.json", "reports/results.md"]
STAGES = ["download@synthetic", "prepare@synthetic", "train@synthetic-an-0", "aggregate"]


def test_missing_outputs_and_data_dependencies_are_not_staleness():
    # What `dvc status --json` says in a fresh clone without the DVC cache.
    status = {
        "download@synthetic": [{"changed outs": {"data/raw/synthetic": "not in cache"}}],
        "prepare@synthetic": [{"changed deps": {"data/raw/synthetic": "deleted"}},
                              {"changed outs": {"data/prepared/synthetic.parquet": "not in cache"}}],
        "train@synthetic-an-0": [{"changed deps": {"data/prepared/synthetic.parquet": "deleted",
                                                   "data/sampled/synthetic.parquet": "modified"}},
                                 {"changed outs": {"runs/synthetic/an/0/best.pt": "deleted"}}],
        # `runs` is a directory that contains outputs of other stages: a data dependency too.
        "aggregate": [{"changed deps": {"runs": "deleted"}}, "always changed"],
    }
    assert classify(status, OUTS, STAGES, set(STAGES)) == []


def test_command_params_and_source_changes_are_staleness():
    status = {
        "prepare@synthetic": [{"changed deps": {"data/raw/synthetic": "deleted",
                                                "params.yaml": {"split": "modified", "extra": "new"}}}],
        "train@synthetic-an-0": [{"changed deps": {"pipeline/train.py": "modified",
                                                   "pipeline/methods/an.py": "deleted"}}],
        "aggregate": ["changed command"],
    }
    assert classify(status, OUTS, STAGES, set(STAGES)) == [
        Stale("prepare@synthetic", "param 'split' in params.yaml modified"),
        Stale("prepare@synthetic", "param 'extra' in params.yaml new"),
        Stale("train@synthetic-an-0", "dependency pipeline/train.py modified"),
        Stale("train@synthetic-an-0", "dependency pipeline/methods/an.py deleted"),
        Stale("aggregate", "changed command"),
    ]


def test_a_stage_without_lock_entry_is_reported_once():
    status = {"train@synthetic-an-0": [{"changed deps": {"pipeline/train.py": "modified",
                                                         "params.yaml": "new"}}]}
    assert classify(status, OUTS, STAGES, set(STAGES) - {"train@synthetic-an-0"}) == [
        Stale("train@synthetic-an-0", "not in dvc.lock (never run)")]


def test_a_source_file_next_to_an_output_is_not_mistaken_for_data():
    # "runs.py" is neither an output, nor inside one, nor a parent of one.
    status = {"aggregate": [{"changed deps": {"pipeline/runs.py": "modified"}}]}
    assert classify(status, ["pipeline/runs"], ["aggregate"], {"aggregate"}) == [
        Stale("aggregate", "dependency pipeline/runs.py modified")]


def test_check_lock_outside_a_pipeline_is_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["check-lock", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "no dvc.yaml in" in result.output


@pytest.mark.slow
def test_committed_dvc_lock_matches_committed_code_and_params(tmp_path):
    """The CI freshness check on this repository: in a clean copy (no data, no DVC cache), every stage's
    command, params and source dependencies match dvc.lock. If this fails, run `dvc repro` and commit
    dvc.lock and reports/ (the message lists what changed)."""
    repo = copy_repo(tmp_path / "repo")
    sh(repo, "git", "init", "-q")
    result = run(repo, "spml", "check-lock", check=False)
    assert result.returncode == 0, result.stderr
