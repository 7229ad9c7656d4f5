"""Sharing results through a DVC remote and the run-cache (docs/sharing.md), end to end.

A first clone runs the tiny pipeline, commits dvc.lock and reports/, and pushes cache + run-cache to a
temporary local remote. Fresh `git clone`s of it then restore instead of retraining, and regenerate
byte-identical reports. The same trained repository serves the `spml check-lock` detection tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_same_tree, git_commit_all, run, sh, tiny_repo

METHODS = ("an",)
TRAIN_STAGES = [f"train@synthetic-{m}-0" for m in METHODS]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """The first teammate: ran `dvc repro`, committed lock + reports, pushed with the run-cache."""
    root = tmp_path_factory.mktemp("share")
    repo = tiny_repo(root / "first", methods=METHODS, seeds=(0,), epochs=1)
    out = sh(repo, "dvc", "repro")
    for stage in TRAIN_STAGES:
        assert f"Running stage '{stage}'" in out
    sh(repo, "dvc", "remote", "add", "-d", "store", str(root / "remote"))
    git_commit_all(repo, "results")
    sh(repo, "dvc", "push", "--run-cache")
    return repo


def _fresh_clone(first: Path, name: str) -> Path:
    clone = first.parent / name
    sh(first.parent, "git", "clone", "-q", str(first), str(clone))
    for absent in (".dvc/cache", "data", "runs"):
        assert not (clone / absent).exists(), f"a fresh clone must not have {absent}"
    return clone


def _remote_files(first: Path) -> set[str]:
    remote = first.parent / "remote" / "files" / "md5"
    return {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}


def _lock_out_hash(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"][stage]["outs"] if o["path"] == path]
    return out["md5"]


def test_remote_holds_prepared_tables_checkpoints_and_metrics_but_not_raw_downloads(first):
    pushed = _remote_files(first)
    raw = _lock_out_hash(first, "download@synthetic", "data/raw/synthetic")
    assert raw not in pushed, "data/raw is `push: false` and must not reach the remote"
    for stage, path in [("prepare@synthetic", "data/prepared/synthetic.parquet"),
                        ("sample@synthetic", "data/sampled/synthetic.parquet"),
                        ("train@synthetic-an-0", "runs/synthetic/an/0/best.pt"),
                        ("train@synthetic-an-0", "runs/synthetic/an/0/metrics.json")]:
        assert _lock_out_hash(first, stage, path) in pushed, f"{path} was not pushed"
    runs = first.parent / "remote" / "runs"
    assert runs.is_dir() and any(p.is_file() for p in runs.rglob("*")), "the run-cache was not pushed"


def _remove_aggregate_outputs(repo: Path) -> None:
    """Delete what the aggregate stage writes (other committed files in reports/, e.g. all-methods/, stay)."""
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["aggregate"]
    for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
        (repo / (next(iter(entry)) if isinstance(entry, dict) else entry)).unlink()


def test_team_flow_pull_repro_push_restores_without_training(first):
    """pull --run-cache, repro, push --run-cache: nothing retrains, reports come back byte for byte."""
    clone = _fresh_clone(first, "teammate")
    sh(clone, "dvc", "pull", "--run-cache", "--allow-missing")  # raw downloads are not on the remote
    # Make `dvc repro` regenerate reports/ from the restored runs rather than keep the committed files.
    _remove_aggregate_outputs(clone)
    out = sh(clone, "dvc", "repro")
    assert "Running stage 'train@" not in out, out
    for stage in TRAIN_STAGES + ["prepare@synthetic", "sample@synthetic"]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'aggregate'" in out
    assert_same_tree(first / "reports", clone / "reports")
    assert_same_tree(first / "runs", clone / "runs")
    # The lock and the committed reports are unchanged: the restore reproduced the first clone exactly.
    assert sh(clone, "git", "status", "--porcelain", "--untracked-files=no") == ""
    sh(clone, "dvc", "push", "--run-cache")


def test_run_cache_restores_stages_missing_from_the_lock(first):
    """Without a committed dvc.lock (e.g. an uncommitted experiment) `dvc repro --pull` uses the run-cache."""
    clone = _fresh_clone(first, "run-cache-only")
    (clone / "dvc.lock").unlink()
    _remove_aggregate_outputs(clone)
    out = sh(clone, "dvc", "repro", "--pull")
    assert "Running stage 'train@" not in out, out
    for stage in TRAIN_STAGES:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert_same_tree(first / "reports", clone / "reports")
    assert (clone / "dvc.lock").read_bytes() == (first / "dvc.lock").read_bytes()


# --- `spml check-lock` (the CI freshness step) on a repository whose lock is known to be fresh ---------

def _check_lock(repo: Path):
    return run(repo, "spml", "check-lock", check=False)


def test_check_lock_passes_in_a_fresh_clone_without_data(first):
    clone = _fresh_clone(first, "fresh-check")
    status = run(clone, "dvc", "status", "--json")
    assert "not in cache" in status.stdout  # dvc status alone would call this clone dirty
    result = _check_lock(clone)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dvc.lock is fresh" in result.stderr


def _edit_params(repo: Path, edit) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("change, expected", [
    (lambda p: _edit_params(p, lambda d: d["train"]["default"].update(lr=0.5)),
     "train@synthetic-an-0: param 'train' in params.yaml modified"),
    (lambda p: _edit_params(p, lambda d: d["sample"].update(seed=7)),
     "sample@synthetic: param 'sample' in params.yaml modified"),
    (lambda p: (p / "stages/sample.py").write_text((p / "stages/sample.py").read_text() + "\n# edited\n"),
     "sample@synthetic: dependency stages/sample.py modified"),
    (lambda p: (p / "pipeline/methods/an.py").write_text((p / "pipeline/methods/an.py").read_text() + "\n"),
     "train@synthetic-an-0: dependency pipeline/methods"),
    (lambda p: (p / "dvc.yaml").write_text((p / "dvc.yaml").read_text().replace(
        "cmd: spml aggregate", "cmd: spml aggregate --out reports")),
     "aggregate: changed command"),
    (lambda p: _edit_params(p, lambda d: d.update(seeds=[0, 1])),
     "train@synthetic-an-1: not in dvc.lock"),
], ids=["train-param", "sample-param", "stage-file", "method-file", "command", "grid"])
def test_check_lock_fails_when_a_stage_changed_without_repro(first, tmp_path, change, expected):
    clone = tmp_path / "edited"
    sh(tmp_path, "git", "clone", "-q", str(first), str(clone))
    change(clone)
    result = _check_lock(clone)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dvc.lock is stale" in result.stderr
    assert expected in result.stderr
