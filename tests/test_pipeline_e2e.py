"""End to end: the real `dvc repro` on a tiny params set, in a temporary copy of the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_repo, tiny_params, write_params


def _env() -> dict:
    env = dict(os.environ, SPML_NO_PROGRESS="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def sh(cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    repo = copy_repo(tmp_path / "repo")
    params = tiny_params()
    params.update(datasets=["synthetic"], methods=["an", "full"], seeds=[0])
    write_params(repo, params)
    (repo / "dvc.lock").unlink(missing_ok=True)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    return repo


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_nothing_to_do(tiny_repo):
    out = sh(tiny_repo, "dvc", "repro")
    for stage in ("download@synthetic", "prepare@synthetic", "sample@synthetic",
                  "train@synthetic-an-0", "train@synthetic-full-0", "aggregate"):
        assert f"Running stage '{stage}'" in out
    results = (tiny_repo / "reports" / "results.md").read_text()
    assert "| an |" in results and "| full |" in results
    runs = (tiny_repo / "reports" / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("dataset,method,model,seed,val_map,test_map,best_epoch") and len(runs) == 3
    assert (tiny_repo / "runs/synthetic/an/0/metrics.json").exists()
    metrics = sh(tiny_repo, "dvc", "metrics", "show")
    assert "reports/summary.json" in metrics

    again = sh(tiny_repo, "dvc", "repro")
    assert "Running stage" not in again
    assert "up to date" in again
