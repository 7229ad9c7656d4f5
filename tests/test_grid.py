"""`spml grid submit | status | collect` (pipeline/tools/grid.py, docs/cluster.md).

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

from pipeline.tools import grid
from pipeline.cli import app
from pipeline.tools.grid_job import CellJob, _gpu_env, read_state
from tests import slurm_cluster
from tests.real_fixtures import make_voc
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
    (["--executor", "local", "--sbatch", "exclude"], "--sbatch: sbatch option 'exclude': use the long form --NAME"),
    (["--executor", "local", "--slurm-arg", "exclude=x"], "--slurm-arg is now --sbatch"),
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


GRID_BLOCK = {
    "default": {"time": "1:00:00", "mem_gb": 8, "cpus_per_job": 4, "gpus_per_job": 1, "partition": "gpu",
                "account": None, "qos": None, "constraint": None, "sbatch": ["--requeue"],
                "setup": ["module load cuda"], "job_name": "spml-{stamp}"},
    "datasets": {"coco2014": {"time": "8:00:00", "mem_gb": 64}, "voc2012": {"partition": "preempt"}},
    "methods": {"vlpl": {"gpus_per_job": 2, "sbatch": ["--exclusive", "--exclude=node07"]}},
}


def _grid_of(tmp_path: Path, block: dict) -> tuple:
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["grid"] = block
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return grid.grid_params(tmp_path)


def test_grid_block_resolves_per_dataset_then_method_then_command_line(tmp_path):
    block = _grid_of(tmp_path, GRID_BLOCK)
    no_cli = dict.fromkeys(grid.CLI_FLAGS)
    coco = grid.resolve_resources(block, "coco2014", "an", no_cli)
    voc = grid.resolve_resources(block, "voc2012", "vlpl", no_cli)
    assert (coco.time_min, coco.mem_gb, coco.partition, coco.gpus_per_job) == (480, 64.0, "gpu", 1)
    assert (voc.time_min, voc.mem_gb, voc.partition, voc.gpus_per_job) == (60, 8.0, "preempt", 2)
    assert voc.extra == (("exclusive", True), ("exclude", "node07"))  # the method's list replaces the default's
    assert coco.where("time") == "params grid.datasets.coco2014.time"
    assert sorted(grid.sbatch_lines(coco, 5, 3, "S")) == sorted([
        "--array=0-2%3", "--cpus-per-task=4", "--gpus-per-node=1", "--job-name=spml-S", "--mem=64G", "--nodes=1",
        "--open-mode=append", "--partition=gpu", "--requeue", "--signal=USR2@90", "--time=480", "--wckey=submitit",
        "setup: module load cuda"])
    assert "--partition=preempt" in grid.sbatch_lines(voc, 5, 1, "S") and "--exclusive" in grid.sbatch_lines(voc, 5, 1, "S")
    # the command line wins over every block; --sbatch adds options (a flag: True)
    cli = {**no_cli, "time": 30, "sbatch": (("exclusive", "user"), ("comment", "x"))}
    mixed = grid.resolve_resources(block, "voc2012", "vlpl", cli)
    assert mixed.time_min == 30 and mixed.where("time") == "--time"
    assert mixed.extra == (("exclude", "node07"), ("exclusive", "user"), ("comment", "x"))
    assert coco != voc and grid.resolve_resources(block, "coco2014", "an", no_cli) == coco  # one array per shape


@pytest.mark.parametrize("change, expected", [
    ({"default": {"time": "soon"}}, "params grid.default.time 'soon': use minutes"),
    ({"default": {"cpus_per_job": 0}}, "params grid.default.cpus_per_job must be an integer >= 1"),
    ({"default": {"sbatch": ["-x node07"]}}, "sbatch option '-x node07': use the long form"),
    ({"datasets": {"imagenet": {}}}, "params grid.datasets.imagenet: unknown dataset"),
    ({"methods": {"an": {"memory": 3}}}, "unknown params grid.methods.an.memory"),
    ({"default": {"job_name": None}}, "params grid.default.job_name must be a job name"),
    ({"datasets": {"voc2012": {"time": None}}}, "params grid.datasets.voc2012.time must be a time limit"),
])
def test_grid_block_refuses_bad_values_in_one_line(tmp_path, change, expected):
    block = {key: {**GRID_BLOCK[key], **change.get(key, {})} for key in GRID_BLOCK}
    with pytest.raises(grid.SpmlError, match=re.escape(expected)):
        _grid_of(tmp_path, block)


def test_an_sbatch_refusal_is_one_line_naming_the_option(tmp_path):
    shape = grid.resolve_resources(_grid_of(tmp_path, GRID_BLOCK), "coco2014", "an", dict.fromkeys(grid.CLI_FLAGS))
    said = "sbatch: error: Batch job submission failed: Invalid partition name specified\nTraceback ...\n"
    error = grid.sbatch_refusal(said, shape, ["train@coco2014-an-0"])
    assert str(error) == ("sbatch refused the jobs of train@coco2014-an-0: Batch job submission failed: Invalid "
                          "partition name specified; check params grid.default.partition (gpu); nothing was submitted")


def test_status_compares_each_cells_key_with_its_submissions(tmp_path):
    """With the current keys: a job of the same key gives its state, only older keys give `stale`, a result on
    the remote is `done` whatever the submissions say."""
    folder = tmp_path / ".spml/grid/20990101-000000"
    folder.mkdir(parents=True)
    (folder / "cells").mkdir()
    records = {name: {"key": "old", "job_id": "1_0", "stdout": "-", "stderr": "-"} for name in ("a", "b", "c")}
    records["d"] = {"key": "k-d", "job_id": "1_3", "stdout": "-", "stderr": "-"}
    for name in records:
        (folder / "cells" / f"{name}.json").write_text(json.dumps({"state": "done", "seconds": 3, "host": "n1"}))
    state = {"stamp": "20990101-000000", "executor": "local-x", "folder": str(folder), "cells": records,
             "done_before": {"e": {"key": "old", "detail": "on the remote when submitted"}}}
    (tmp_path / ".spml/grid/20990101-000000.json").write_text(json.dumps(state))
    names = ["a", "b", "d", "e", "f"]
    keys = {name: f"k-{name}" for name in names}
    states = {s.cell: s for s in grid.cell_states(tmp_path, names, keys, {"a": True, "d": False})}
    assert [states[n].state for n in names] == ["done", "stale", "failed", "stale", "not submitted"]
    assert "job 1_0 (done) for an older version" in states["b"].detail
    assert "its result is not on the remote" in states["d"].detail
    assert "a result on the remote for an older version" in states["e"].detail
    # without keys: each cell's latest submission, as before
    assert grid.cell_states(tmp_path, ["b", "e"])[0].state == "done"


def test_a_jobs_resume_folder_is_its_keys_alone(tmp_path):
    """Jobs of one run-cache key share runs/.resume (a requeued or resubmitted job continues); another key
    (other code, params or inputs) never sees that checkpoint."""
    from pipeline.tools.grid_job import _link_resume, resume_root

    saved = resume_root(tmp_path / "grid", "key-a") / "synthetic/an/0"
    saved.mkdir(parents=True)
    (saved / "last.pt").write_bytes(b"state")
    for key, seen in (("key-a", True), ("key-b", False)):
        clone = tmp_path / key
        clone.mkdir()
        lock = _link_resume(_job(key=key, grid_dir=str(tmp_path / "grid")), clone)
        assert (clone / "runs/.resume/synthetic/an/0/last.pt").exists() is seen
        lock.close()


def test_sbatch_option_is_written_as_params_grid_writes_it(tmp_path):
    result, text = _cli("grid", "submit", "--executor", "local", "--root", str(tmp_path), "--sbatch", "-x node07")
    assert result.exit_code == 2 and "use the long form --NAME, --NAME=VALUE or --NAME VALUE" in text, text
    assert grid.sbatch_option("--exclusive", "--sbatch") == ("exclusive", True)
    assert grid.sbatch_option("--exclude=node07", "--sbatch") == ("exclude", "node07")


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


def _settle(repo: Path, cells: list[str] = CELLS) -> dict[str, grid.CellState]:
    """Wait until no cell is queued or running; their final states."""
    def ended():
        states = grid.cell_states(repo, cells)
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


def _changed_method_is_stale(repo: Path, env: dict | None = None) -> None:
    """A committed change of one method's params: its cells are no longer done (their run-cache keys moved),
    whatever the earlier submissions say; the other method's cells still are."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["method_params"]["full"] = {"default": {}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(repo, "full: params changed")
    status = spml(repo, "grid", "status", env=env).stdout
    for cell in CELLS:
        expected = "stale" if "-full-" in cell else "done"
        assert re.search(rf"^{re.escape(cell)}\s+{expected}\s", status, re.M), status
    assert "2 done, 2 stale" in status and "for an older version of the cell" in status, status


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
    _changed_method_is_stale(repo, slurm.env)


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
    _changed_method_is_stale(repo)


@pytest.mark.slow
def test_grid_resources_refusals_and_resume_on_a_real_slurm_cluster(slurm, tmp_path):
    """On the real one-node Slurm: (d) two resource shapes from params grid (per dataset, per method) give
    two job arrays with their resolved sbatch lines (--dry-run) and a setup line runs in the job; (b) a
    request sbatch refuses (a GPU on a node without GPUs) is one line, exit 2, and leaves nothing behind; (c)
    a cell whose job gets the pre-emption signal while it trains is requeued, resumes from its checkpoint
    and ends with the metrics of an uninterrupted run."""
    env = {**slurm.env, "SPML_NO_PROGRESS": "1"}
    repo = tiny_repo(tmp_path / "repo", methods=("an", "full"), seeds=(0,), epochs=60)
    sh(repo, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"] = ["synthetic", "voc2012"]  # a second dataset, for the dry run: a tiny fake VOC
    params["data"]["voc2012"]["source"] = str(make_voc(tmp_path / "voc").parent)
    marker = tmp_path / "setup-ran"
    params["grid"]["default"].update(time=10, cpus_per_job=1, setup=[f"echo $SLURM_JOB_ID >> {marker}"])
    params["grid"]["datasets"] = {"synthetic": {"mem_gb": 1}, "voc2012": {"mem_gb": 2, "time": "0:15:00"}}
    params["grid"]["methods"] = {"full": {"cpus_per_job": 2, "sbatch": ["--requeue", "--comment=full"]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(repo, "grid resources")

    dry = spml(repo, "grid", "submit", "--dry-run", env=env).stdout
    assert "4 job array(s), one per resource shape:" in dry, dry
    shapes, cell = {}, None
    for line in dry.split("one per resource shape:\n")[1].splitlines():
        if line.startswith("      "):
            shapes[cell].add(line.strip())
        else:
            cell = line.strip().rstrip(":")
            shapes[cell] = set()
    setup = f"setup: echo $SLURM_JOB_ID >> {marker}"
    assert {"--time=10", "--mem=1G", "--cpus-per-task=1", setup} <= shapes["train@synthetic-an-0"], dry
    assert {"--time=15", "--mem=2G", "--cpus-per-task=1", setup} <= shapes["train@voc2012-an-0"], dry
    assert {"--time=10", "--mem=1G", "--cpus-per-task=2", "--requeue", "--comment=full", setup} <= \
        shapes["train@synthetic-full-0"], dry
    assert {"--time=15", "--mem=2G", "--cpus-per-task=2", "--requeue"} <= shapes["train@voc2012-full-0"], dry
    assert not any("--requeue" in line or "--comment" in line for line in shapes["train@voc2012-an-0"])
    params["datasets"] = ["synthetic"]  # the fake VOC has no real images to train on; no cell's key moves
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(repo, "synthetic only")

    refused = spml(repo, "grid", "submit", "--gpus-per-job", "1", check=False, env=env)
    errors = [line for line in refused.stderr.splitlines() if "error" in line.lower()]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr
    assert errors[0].startswith("error: sbatch refused the jobs of train@synthetic-an-0") and \
        "Invalid generic resource (gres) specification; check --gpus-per-job (1)" in errors[0], errors
    assert "Traceback" not in refused.stderr
    assert not [p for p in (repo / grid.GRID_DIR).iterdir() if p.name != "resume"]  # no submission recorded
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env={**os.environ, **slurm.env})
    assert queue.stdout.strip() == ""

    out = spml(repo, "grid", "submit", "--keep-clones", env=env).stdout
    assert "2 cells: 0 already on the remote, 0 still queued or running, 2 submitted" in out, out
    sub = _submission(repo)
    record = sub["cells"]["train@synthetic-an-0"]
    resume = Path(grid.GRID_DIR, "resume", record["key"], "synthetic/an/0/last.pt")
    # generous limits: on a loaded machine a job's clone, pull and torch import take minutes
    _wait_until(lambda: (repo / resume).exists(), 1200, "the first epoch's resume checkpoint")
    subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, env={**os.environ, **slurm.env})
    _wait_until(lambda: (read_state(sub["folder"], "train@synthetic-an-0") or {}).get("state") == "requeued", 300,
                "the job to checkpoint and requeue itself")
    # Slurm holds a requeued job for two minutes (its BeginTime); the test does not wait for that
    _wait_until(lambda: subprocess.run(["scontrol", "update", f"JobId={record['job_id']}", "StartTime=now"],
                                       env={**os.environ, **slurm.env}, capture_output=True).returncode == 0,
                300, "the requeued job to be pending")
    states = _settle(repo, ["train@synthetic-an-0", "train@synthetic-full-0"])
    assert all(s.state == "done" for s in states.values()), states

    log = Path(record["stdout"]).read_text(errors="replace") + Path(record["stderr"]).read_text(errors="replace")
    assert "Caught signal SIGUSR2" in log and "resume checkpoint of this key found: synthetic/an/0/last.pt" in log
    assert "discarding the resume checkpoint" not in log
    assert log.count("Running stage 'train@synthetic-an-0'") == 2  # trained twice: before and after the requeue
    # the setup line ran at the start of each job: twice for the requeued one (one cell per shape: plain jobs)
    ids = [record["job_id"], sub["cells"]["train@synthetic-full-0"]["job_id"]]
    assert sorted(marker.read_text().split()) == sorted([ids[0], *ids]), (marker.read_text(), ids)
    assert not (repo / grid.GRID_DIR / "resume" / record["key"]).exists()  # removed once the cell is done

    # the uninterrupted run of the same cell, in the submitting workspace: the same metrics
    sh(repo, "spml", "train", "synthetic", "an", "--seed", "0", "--out", str(tmp_path / "uninterrupted"),
       env=_env(repo, env))
    resumed = json.loads((Path(sub["folder"]) / "clones/train@synthetic-an-0/runs/synthetic/an/0/metrics.json")
                         .read_text())
    reference = json.loads((tmp_path / "uninterrupted/metrics.json").read_text())
    assert set(resumed) == set(reference)
    assert {k: v for k, v in resumed.items() if k not in TIMING_COLUMNS} == \
        {k: v for k, v in reference.items() if k not in TIMING_COLUMNS}
