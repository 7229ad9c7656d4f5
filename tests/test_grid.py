"""`spml grid submit | status | collect` (pipeline/grid.py, docs/cluster.md).

The end-to-end tests run a tiny grid (2 methods x 2 seeds, 1 epoch) on a temporary copy of the pipeline with a
local-directory DVC remote: once on a real single-node Slurm the test starts itself (tests/slurm_cluster.py;
skipped, with the reason, where Slurm cannot start) and once with submitit's local executor (never skipped).
In both, one cell's job is killed while it trains; the next `submit` resubmits only that cell, `collect` then
restores every cell without training, and reports/ equal those of a serial `dvc repro` of the same grid.

"Equal" means: results.md, summary.json, diagnostics.md and diagnostics.png byte for byte, and runs.csv
identical in every column but `train_seconds` (wall time, which differs between any two runs). Every training
runs with SPML_THREADS=1, so CPU metrics are bit-identical between the serial run and the jobs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import grid
from pipeline.cli import app
from pipeline.grid_job import CellJob, _gpu_env, read_state
from tests import slurm_cluster
from tests.helpers import git_commit_all, run, sh, tiny_repo, tool_env

METHODS, SEEDS = ("an", "full"), (0, 1)
CELLS = [f"train@synthetic-{m}-{s}" for m in METHODS for s in SEEDS]
VICTIM = "train@synthetic-an-0"
TIMING_COLUMNS = ["train_seconds"]
REPORT_FILES = ["results.md", "summary.json", "diagnostics.md", "diagnostics.png"]


def _env(repo: Path, extra: dict | None = None) -> dict:
    return {"PYTHONPATH": str(repo), "SPML_THREADS": "1", **(extra or {})}


def grid_repo(dest: Path) -> Path:
    """A tiny grid repository with a local-directory DVC remote (committed in .dvc/config)."""
    repo = tiny_repo(dest / "repo", methods=METHODS, seeds=SEEDS, epochs=1)
    sh(repo, "dvc", "remote", "add", "-d", "store", str(dest / "remote"))
    git_commit_all(repo, "remote")
    return repo


def spml(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(repo, "spml", *args, check=check, env=_env(repo, env))


def assert_same_reports(serial: Path, grid_run: Path) -> None:
    for name in REPORT_FILES:
        assert (serial / name).read_bytes() == (grid_run / name).read_bytes(), f"reports/{name} differs"
    a = pd.read_csv(serial / "runs.csv").drop(columns=TIMING_COLUMNS)
    b = pd.read_csv(grid_run / "runs.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(a) == len(CELLS)


# --- bad input: one line, exit 2 ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _isolated_dvc_config(monkeypatch):
    """In-process DVC reads the same isolated global/system config as the subprocesses (tests/helpers.py)."""
    for name in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(name, tool_env()[name])


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args), color=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, " ".join(" ".join(lines).split())


@pytest.mark.parametrize("args, expected", [
    (["--executor", "pbs"], "unknown executor 'pbs'; use --executor slurm or --executor local"),
    (["--executor", "local", "--jobs", "0"], "--jobs 0: it caps how many cells run at once"),
    (["--executor", "local", "--upstream", "copy"], "unknown --upstream 'copy'; use pull or rebuild"),
    (["--executor", "local", "--time", "soon"], "--time 'soon': use minutes"),
    (["--executor", "local", "--slurm-arg", "exclude"], "--slurm-arg 'exclude': use KEY=VALUE"),
])
def test_submit_refuses_bad_options_in_one_line(args, expected, tmp_path):
    result, text = _cli("grid", "submit", "--root", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    assert text.startswith("error: ") and expected in text, text


def test_submit_on_slurm_without_slurm_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on PATH
    result, text = _cli("grid", "submit", "--executor", "slurm", "--root", str(tmp_path))
    assert result.exit_code == 2
    assert "sbatch/srun not found" in text and "--executor local" in text


def test_submit_without_a_dvc_remote_names_the_fix(tmp_path):
    repo = tiny_repo(tmp_path / "repo", methods=("an",), epochs=1)
    result, text = _cli("grid", "submit", "--executor", "local", "--root", str(repo))
    assert result.exit_code == 2, result.output
    assert "no default DVC remote" in text and "dvc remote add -d" in text


def test_submit_refuses_uncommitted_changes(tmp_path):
    repo = grid_repo(tmp_path)
    (repo / "pipeline/methods/an.py").write_text((repo / "pipeline/methods/an.py").read_text() + "\n# edit\n")
    result, text = _cli("grid", "submit", "--executor", "local", "--root", str(repo))
    assert result.exit_code == 2, result.output
    assert "differs from its commit (pipeline/methods/an.py)" in text and "commit" in text


def test_cells_are_the_train_and_ablate_matrices_with_what_each_needs(tmp_path):
    repo = tiny_repo(tmp_path / "repo", methods=("an",), seeds=(0, 1), epochs=1)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ablations"] = ["an-cons"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cells, upstream = grid.list_cells(repo)
    assert [c.name for c in cells] == ["train@synthetic-an-0", "train@synthetic-an-1",
                                       "ablate@synthetic-an-cons-0", "ablate@synthetic-an-cons-1"]
    for cell in cells:  # raw data by its own command (never on the remote), the rest pulled
        assert cell.raw_commands == ("spml download synthetic",)
        assert cell.upstream == ("prepare@synthetic", "pretrain", "sample@synthetic")
    assert upstream.index("download@synthetic") < upstream.index("prepare@synthetic") < \
        upstream.index("sample@synthetic")


@pytest.mark.parametrize("text, minutes", [("90", 90), ("90:30", 91), ("2:00:00", 120), ("1-00:00:00", 1440),
                                           ("1-2", 1560), ("0:30:00", 30)])
def test_time_limits_read_like_slurm(text, minutes):
    assert grid.parse_time(text) == minutes


def _job(**changes) -> CellJob:
    base = {"cell": "c", "key": "k", "repo": "/r", "commit": "0" * 40, "submission": "/s", "workdir": "/w",
            "remote": "store", "remote_url": None, "raw_commands": (), "upstream": (), "rebuild": False, "slots": 2,
            "gpus_per_job": None, "visible_gpus": None, "bin_dir": "/bin"}
    return CellJob(**{**base, **changes})


def test_local_slots_get_their_own_gpus():
    assert _gpu_env(_job(gpus_per_job=2), 1, {})["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert _gpu_env(_job(gpus_per_job=1, visible_gpus="4,6"), 1, {})["CUDA_VISIBLE_DEVICES"] == "6"
    # without --gpus-per-job a job sees what the submitter saw (submitit's local executor would blank it)
    assert _gpu_env(_job(visible_gpus="1"), 0, {"CUDA_VISIBLE_DEVICES": ""})["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in _gpu_env(_job(), 0, {"CUDA_VISIBLE_DEVICES": ""})
    assert _gpu_env(_job(slots=None, gpus_per_job=1), None, {"X": "1"}) == {"X": "1"}  # Slurm assigns GPUs


def test_status_reports_a_vanished_job_as_failed_with_its_logs_last_line(tmp_path):
    """A local job that died without writing a result (SIGKILL, OOM killer) is `failed`, not `running`."""
    folder = tmp_path / ".spml/grid/20990101-000000"
    (folder / "submitit").mkdir(parents=True)
    log = folder / "submitit/1_0_log.err"
    log.write_text("Running stage 'train@synthetic-an-0':\nepoch 1/6\n\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"key": "k", "job_id": str(dead.pid), "stdout": str(log), "stderr": str(log), "started": "1"}
    state = {"stamp": "20990101-000000", "executor": "local", "folder": str(folder), "cells": {VICTIM: record},
             "done_before": {"train@synthetic-an-1": "on the remote when submitted"}}
    (tmp_path / ".spml/grid/20990101-000000.json").write_text(json.dumps(state))
    states = {s.cell: s for s in grid.cell_states(tmp_path, [VICTIM, "train@synthetic-an-1", "other"])}
    assert states[VICTIM].state == "failed"
    assert "ended without a result" in states[VICTIM].detail and states[VICTIM].detail.endswith("epoch 1/6")
    assert states["train@synthetic-an-1"].state == "done"
    assert states["other"].state == "not submitted"


def test_the_test_slurm_says_why_it_cannot_start(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm_cluster, "BINARIES", (*slurm_cluster.BINARIES, "no-such-slurm-daemon"))
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="not installed: no-such-slurm-daemon"):
        slurm_cluster.start(tmp_path)


# --- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serial_reports(tmp_path_factory) -> Path:
    """reports/ of a plain serial `dvc repro` of the tiny grid (the reference)."""
    repo = tiny_repo(tmp_path_factory.mktemp("serial") / "repo", methods=METHODS, seeds=SEEDS, epochs=1)
    out = sh(repo, "dvc", "repro", env=_env(repo))
    assert all(f"Running stage '{cell}'" in out for cell in CELLS), out
    return repo / "reports"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real one-node Slurm on localhost for this module, or a skip that prints why not."""
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.SlurmUnavailable as exc:
        print(f"\nreal Slurm unavailable: {exc}")
        pytest.skip(f"real Slurm unavailable: {exc}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # for squeue/scancel from this process too
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _submission(repo: Path) -> dict:
    """The latest submission's state file."""
    return json.loads(max((repo / grid.GRID_DIR).glob("*.json")).read_text())


def _wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_while_training(repo: Path, kill) -> None:
    """Wait until VICTIM's job runs its training stage, then kill the job."""
    sub = _submission(repo)
    record = sub["cells"][VICTIM]

    def training() -> bool:
        log = Path(record["stdout"])
        return log.exists() and f"Running stage '{VICTIM}'" in log.read_text(errors="replace")

    _wait_until(training, 300, f"{VICTIM} to start training")
    kill(sub, record)


def _settle(repo: Path) -> dict[str, grid.CellState]:
    """Wait until no cell is queued or running; their final states."""
    def ended():
        states = grid.cell_states(repo, CELLS)
        return None if any(s.state in grid.ACTIVE for s in states) else states

    return {s.cell: s for s in _wait_until(ended, 600, "every job to end")}


def _grid_flow(tmp_path: Path, serial_reports: Path, executor: list[str], kill, env: dict | None = None) -> Path:
    """submit -> kill VICTIM while it trains -> the rest finish -> collect refuses -> submit resubmits only
    VICTIM -> collect restores every cell without training -> reports equal the serial run's."""
    repo = grid_repo(tmp_path)
    out = spml(repo, "grid", "submit", *executor, "--jobs", "2", env=env)
    assert "4 cells: 0 already on the remote, 0 still queued or running, 4 submitted" in out.stdout, out.stdout
    _kill_while_training(repo, kill)
    states = _settle(repo)
    assert states[VICTIM].state == "failed", states[VICTIM]
    assert all(states[c].state == "done" for c in CELLS if c != VICTIM), states

    status = spml(repo, "grid", "status", env=env).stdout
    assert re.search(rf"{re.escape(VICTIM)}\s+failed", status) and "3 done, 1 failed" in status, status
    refused = spml(repo, "grid", "collect", check=False, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"1 of 4 cells have no result on the remote ({VICTIM})" in " ".join(refused.stderr.split())
    assert "spml grid submit" in refused.stderr

    again = spml(repo, "grid", "submit", *executor, "--jobs", "2", "--wait", env=env)
    assert "4 cells: 3 already on the remote, 0 still queued or running, 1 submitted" in again.stdout, again.stdout
    assert f"submitted {VICTIM}" in again.stdout and again.stdout.count("  submitted ") == 1
    assert f"{VICTIM}: done" in again.stdout

    collected = spml(repo, "grid", "collect", env=env)
    text = collected.stdout + collected.stderr
    assert "Running stage 'train@" not in text and "Running stage 'ablate@" not in text, text
    for cell in CELLS:
        assert f"Stage '{cell}' is cached - skipping run, checking out outputs" in text, text
    assert "Running stage 'aggregate'" in text
    assert_same_reports(serial_reports, repo / "reports")
    nothing = spml(repo, "grid", "submit", *executor, env=env)
    assert "4 cells: 4 already on the remote, 0 still queued or running, 0 submitted" in nothing.stdout
    return repo


@pytest.mark.slow
def test_grid_on_a_real_slurm_cluster(slurm, serial_reports, tmp_path):
    """Every cell is a Slurm array task; one is scancelled while it trains and resubmitted alone."""
    def scancel(sub, record):
        subprocess.run(["scancel", record["job_id"]], check=True, env={**os.environ, **slurm.env})

    repo = _grid_flow(tmp_path, serial_reports, ["--executor", "slurm", "--cpus-per-job", "1", "--time", "10"],
                      scancel, env=slurm.env)
    for sub in sorted((repo / grid.GRID_DIR).glob("*.json")):
        state = json.loads(sub.read_text())
        for cell, record in state["cells"].items():
            assert re.fullmatch(r"\d+(_\d+)?", record["job_id"]), record
            ran = read_state(state["folder"], cell)
            if ran["state"] == "done":
                assert ran["slurm_job_id"] == record["job_id"], (cell, ran)  # it ran as that Slurm job
    first = min((repo / grid.GRID_DIR).glob("*/submitit/*_submission.sh"))
    assert "#SBATCH --array=0-3%2" in first.read_text()  # one job array, at most 2 tasks at once


@pytest.mark.slow
def test_grid_with_the_local_executor(serial_reports, tmp_path):
    """The same flow with submitit's local executor (never skipped): the killed job is SIGKILLed, its whole
    process group (git, dvc, spml train) at once, as a pre-emption or the OOM killer would."""
    def kill(sub, record):
        ran = _wait_until(lambda: read_state(sub["folder"], VICTIM), 30, "the job's state file")
        os.killpg(ran["pgid"], signal.SIGKILL)

    repo = _grid_flow(tmp_path, serial_reports, ["--executor", "local"], kill)

    # A crash between the output push and the run-cache push leaves the cell not done: resubmitted.
    entries = sorted((tmp_path / "remote/runs").glob("*/*"))
    assert len(entries) == len(CELLS)
    key_of = {record["key"]: cell for sub in (repo / grid.GRID_DIR).glob("*.json")
              for cell, record in json.loads(sub.read_text())["cells"].items()}
    victim_entry = next(e for e in entries if key_of.get(e.name) == VICTIM)
    moved = tmp_path / "entry-aside"
    victim_entry.rename(moved)
    dry = spml(repo, "grid", "submit", "--executor", "local", "--dry-run")
    assert "3 already on the remote" in dry.stdout and f"would submit {VICTIM}" in dry.stdout, dry.stdout
    moved.rename(victim_entry)

    # An entry naming outputs the remote lacks (someone's interrupted `dvc push --run-cache`): refused.
    (entry,) = victim_entry.iterdir()
    lock = yaml.safe_load(entry.read_text())
    lock["outs"][0]["md5"] = "0" * 32
    (victim_entry / ("f" * 64)).write_text(yaml.safe_dump(lock))
    refused = spml(repo, "grid", "collect", check=False)
    assert refused.returncode == 2 and "name outputs it lacks" in refused.stderr, refused.stderr
