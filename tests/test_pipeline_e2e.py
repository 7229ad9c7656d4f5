"""End to end: the real `dvc repro` on a tiny params set, in a temporary copy of the repository."""

from __future__ import annotations

import pytest

from tests.helpers import sh
from tests.helpers import tiny_repo as make_tiny_repo


@pytest.fixture
def tiny_repo(tmp_path):
    return make_tiny_repo(tmp_path / "repo", methods=("an", "full"), seeds=(0,))


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_nothing_to_do(tiny_repo):
    out = sh(tiny_repo, "dvc", "repro")
    for stage in ("download@synthetic", "prepare@synthetic", "sample@synthetic",
                  "train@synthetic-an-0", "train@synthetic-full-0", "aggregate"):
        assert f"Running stage '{stage}'" in out
    results = (tiny_repo / "reports" / "results.md").read_text()
    assert "| an |" in results and "| full |" in results
    runs = (tiny_repo / "reports" / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("dataset,method,model,seed,protocol,val_map,test_map,best_epoch") and len(runs) == 3
    assert (tiny_repo / "runs/synthetic/an/0/metrics.json").exists()
    metrics = sh(tiny_repo, "dvc", "metrics", "show")
    assert "reports/summary.json" in metrics

    again = sh(tiny_repo, "dvc", "repro")
    assert "Running stage" not in again
    assert "up to date" in again

    # the table just made reproduces in a temporary copy, with the trunk DVC finds up to date
    out = sh(tiny_repo, "spml", "verify", "reports", "--all")
    assert "pretrained trunk: this workspace's (`dvc status pretrain`: up to date)" in out
    assert "2 cell(s) of reports reproduce bit for bit" in out
