"""Scale the grid out: one scheduler job per (dataset, method, seed) cell, results shared through DVC's
remote and run-cache (``spml grid submit | status | collect``; docs/cluster.md).

`dvc repro` runs one stage at a time per workspace, and `dvc queue` is unreliable with several workers, so a
cluster runs each cell of dvc.yaml's ``train``/``ablate``/``train-vl`` matrices as its own job in its own clone
(pipeline/grid_job.py), which pushes the cell's outputs and run-cache entry to the DVC remote. ``collect``
then runs one ``dvc repro --pull`` in the submitting workspace, which restores every cell from the run-cache
instead of training it, and aggregates.

**Which cells are done: the remote's run-cache, looked up by key.** DVC's run-cache entry for a stage lives at
``<remote>/runs/<key[:2]>/<key>/<value>``; ``key`` is the SHA-256 of the stage's lock entry without output
hashes (command, every dependency's hash, the params values), ``value`` a YAML copy of the full lock entry
(with output hashes). ``dvc repro --pull`` restores a stage from the newest entry under its key. So, in the
submitting workspace, with the upstream stages (data, pretrained trunk) reproduced, we compute each cell's
key exactly as DVC does (``Stage.save_deps`` + ``dvc.stage.cache._get_stage_hash``; tests/test_grid.py pins
it against a real job) and read the entries under it on the remote. A cell is *done* when an entry's outputs
are all on the remote. Tried and rejected: ``dvc repro --dry`` (does not consult the run-cache, and reads
dependency hashes from dvc.lock), ``dvc status --cloud`` (knows dvc.lock's outputs, not the run-cache), and
``dvc pull --run-cache`` (downloads every output of every entry just to decide).

**Crash safety.** Jobs push outputs before the run-cache entry (``dvc push --run-cache`` alone uploads the
entries first), so an entry never names outputs the remote lacks, and a cell whose job died anywhere is simply
not done: the next ``submit`` resubmits it (and only it). An entry with missing outputs can still come from
elsewhere (an interrupted ``dvc push --run-cache`` in some workspace); ``dvc repro --pull`` might pick it and
retrain, so ``collect`` refuses while one exists and names it.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import SpmlError
from pipeline.grid_job import CellJob, read_state, run_cell, stage_name

GRID_DIR = Path(".spml") / "grid"   # per-submission state (git- and dvc-ignored)
CELL_GROUPS = ("train", "ablate", "train-vl")  # dvc.yaml's matrix stages: one job per cell
EXECUTORS = ("slurm", "local")
UPSTREAM_MODES = ("pull", "rebuild")
ACTIVE = ("queued", "running")
STATES = ("done", "running", "queued", "failed", "not submitted")


@dataclass(frozen=True)
class Resources:
    """What each job asks for. Slurm reads all of it; the local executor only time_min and gpus_per_job."""

    partition: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None       # None: the partition's default limit (local: a week)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: dict = field(default_factory=dict)   # --slurm-arg KEY=VALUE: any other sbatch option


@dataclass
class Cell:
    name: str                       # train@synthetic-an-0
    upstream: tuple[str, ...]       # stages it needs, pulled (or rebuilt) by the job
    raw_commands: tuple[str, ...]   # commands of its raw-data stages (outputs not pushed)
    key: str = ""                   # run-cache key in the submitting workspace


@dataclass
class RemoteResult:
    complete: list[str] = field(default_factory=list)                   # entry names with every output there
    broken: list[tuple[str, list[str]]] = field(default_factory=list)   # (entry path, missing outputs)

    @property
    def done(self) -> bool:
        return bool(self.complete)


# --- running git and dvc ------------------------------------------------------------------------------------

def _env(root: Path) -> dict:
    """Subprocess environment: this checkout's code first (what DVC hashes is what runs), the venv's tools."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path,
                PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def _dvc_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _dvc(root: Path, *args: str, what: str) -> None:
    """Run dvc in the workspace, its output to the terminal; one-line error if it fails."""
    print(f"$ dvc {' '.join(args)}", file=sys.stderr, flush=True)
    code = subprocess.run(_dvc_cmd() + list(args), cwd=root, env=_env(root), check=False).returncode
    if code != 0:
        raise SpmlError(f"`dvc {' '.join(args)}` failed (exit {code}) while {what}; see its output above")


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SpmlError(f"`git {' '.join(args)}` failed in {root}: {result.stderr.strip().splitlines()[-1:]}; "
                        "jobs clone the submitting commit, so the workspace must be a git repository")
    return result.stdout


@contextmanager
def _dvc_repo(root: Path):
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(os.fspath(root)) as repo:
            yield repo
    except DvcException as exc:
        raise SpmlError(f"dvc could not read the pipeline in {root}: {exc}") from None


# --- the grid as DVC sees it --------------------------------------------------------------------------------

def list_cells(root: Path) -> tuple[list[Cell], list[str]]:
    """The grid's cells (stages of the CELL_GROUPS matrices) in dvc.yaml order, and every stage upstream of
    them (data, pretrained trunk) in dependency order."""
    import networkx as nx

    with _dvc_repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {stage_name(stage, root): stage for stage in repo.index.stages}
        cells, upstream = [], set()
        for name, stage in by_name.items():
            if name.split("@")[0] not in CELL_GROUPS:
                continue
            needs = nx.descendants(graph, stage)
            raw = [s for s in needs if s.outs and all(not out.can_push for out in s.outs)]
            rest = sorted(stage_name(s, root) for s in needs if s not in raw)
            commands = tuple(" && ".join(s.cmd) if isinstance(s.cmd, list) else s.cmd
                             for s in sorted(raw, key=lambda s: stage_name(s, root)))
            cells.append(Cell(name, tuple(rest), commands))
            upstream.update(stage_name(s, root) for s in needs)
        names = (stage_name(s, root) for s in reversed(list(nx.topological_sort(graph))))
        order = [name for name in names if name in upstream]
    if not cells:
        raise SpmlError(f"dvc.yaml in {root} has no {' or '.join(CELL_GROUPS)} cells: nothing to submit")
    return cells, order


def default_remote(root: Path) -> tuple[str, str | None]:
    """The default DVC remote's name, and its absolute path when it is a local folder (jobs' clones sit
    elsewhere, so a relative path would point somewhere else)."""
    with _dvc_repo(root) as repo:
        name = repo.config["core"].get("remote")
        remotes = repo.config["remote"]
    if not name or name not in remotes:
        raise SpmlError("no default DVC remote: jobs share results through it; add one every node can reach, "
                        "e.g. `dvc remote add -d store /shared/spml-dvc` (docs/cluster.md)")
    url = str(remotes[name]["url"])  # DVC's config already resolved a relative path against .dvc/
    return name, None if re.match(r"^[a-z][a-z0-9+.-]*://", url) else os.path.abspath(url)


def compute_keys(root: Path, cells: list[Cell]) -> None:
    """Fill each cell's run-cache key from the workspace (upstream outputs must be present)."""
    from dvc.exceptions import DvcException
    from dvc.stage.cache import _can_hash, _get_stage_hash

    with _dvc_repo(root) as repo:
        by_name = {stage_name(stage, root): stage for stage in repo.index.stages}
        for cell in cells:
            stage = by_name[cell.name]
            try:
                stage.save_deps()
            except DvcException as exc:  # a missing dependency: the upstream stages did not run
                raise SpmlError(f"{cell.name}: cannot hash its dependencies ({exc}); run `dvc repro` of its "
                                "upstream stages first") from None
            if not _can_hash(stage):
                raise SpmlError(f"{cell.name} cannot be run-cached (a persistent or uncached output?); "
                                "the grid needs every cell in DVC's run-cache")
            cell.key = _get_stage_hash(stage)


def remote_results(root: Path, cells: list[Cell]) -> dict[str, RemoteResult]:
    """For each cell, the run-cache entries under its key on the default remote, checked against the
    remote's objects (an entry counts only if every output it names is there)."""
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException

    results = {}
    with _dvc_repo(root) as repo:
        try:
            legacy = repo.cloud.get_remote_odb(None, "spml grid", hash_name="md5-dos2unix")
            files = repo.cloud.get_remote_odb(None, "spml grid", hash_name="md5")
        except (NoRemoteError, DvcException) as exc:
            raise SpmlError(f"the DVC remote cannot hold a run-cache: {exc}") from None
        fs = legacy.fs
        for cell in cells:
            result = results[cell.name] = RemoteResult()
            folder = fs.join(legacy.path, "runs", cell.key[:2], cell.key)
            try:
                entries = sorted(fs.ls(folder, detail=False))
            except FileNotFoundError:
                entries = []
            for entry in entries:
                try:
                    lock = yaml.safe_load(fs.cat_file(entry))
                except (OSError, yaml.YAMLError):
                    result.broken.append((entry, ["(unreadable entry)"]))
                    continue
                missing = [out["path"] for out in lock.get("outs", [])
                           if not _on_remote(files if out.get("hash") == "md5" else legacy, out.get("md5"))]
                if missing:
                    result.broken.append((entry, missing))
                else:
                    result.complete.append(fs.name(entry))
    return results


def _on_remote(odb, md5: str | None) -> bool:
    if not md5:
        return False
    if not odb.exists(md5):
        return False
    if md5.endswith(".dir"):  # a directory output: its listing and every file in it
        listing = json.loads(odb.fs.cat_file(odb.oid_to_path(md5)))
        return all(odb.exists(item["md5"]) for item in listing)
    return True


# --- submissions: state files -------------------------------------------------------------------------------

def _submissions(root: Path) -> list[dict]:
    """Every submission's state, oldest first."""
    folder = root / GRID_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return found


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (guards against pid reuse), None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _slurm_states(job_ids: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(squeue states of live jobs, sacct states of ended ones where accounting is on) by job id."""
    live, ended = {}, {}
    if not job_ids or shutil.which("squeue") is None:
        return live, ended
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()],
                         capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        job, _, state = line.partition("|")
        live[job.strip()] = state.strip()
    if shutil.which("sacct"):
        bases = sorted({job.split("_")[0] for job in job_ids})
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)],
                             capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job, _, state = line.partition("|")
            ended[job.strip()] = state.strip()
    return live, ended


def _last_line(*paths: str | None) -> str:
    for path in paths:
        try:
            lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, TypeError):
            continue
        if lines:
            return lines[-1]
    return "(empty log)"


@dataclass
class CellState:
    cell: str
    state: str          # queued, running, done, failed, not submitted
    detail: str = ""
    submission: str = ""
    key: str = ""


SLURM_QUEUED = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED")
SLURM_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")


def _scheduled(sub: dict, record: dict, live: dict[str, str]) -> str | None:
    """'queued' or 'running' while the scheduler still has the job, None once it is gone. A local job is
    'queued' until its state file says it holds a slot."""
    if sub["executor"] == "slurm":
        state = live.get(record["job_id"])
        return "queued" if state in SLURM_QUEUED else "running" if state in SLURM_RUNNING else None
    return "queued" if _proc_start(int(record["job_id"])) == record.get("started") else None


def _job_state(sub: dict, name: str, record: dict, live: dict, ended: dict) -> CellState:
    folder = Path(sub["folder"])
    base = CellState(name, "", submission=sub["stamp"], key=record.get("key", ""))
    for _ in range(2):  # the job's own state file, else the scheduler; twice, as a job may end in between
        state = read_state(folder, name) or {}
        if state.get("state") == "done":
            base.state, base.detail = "done", f"in {state.get('seconds', 0):.0f} s on {state.get('host')}"
            return base
        if state.get("state") == "failed":
            base.state, base.detail = "failed", state.get("message", "")
            return base
        scheduled = _scheduled(sub, record, live)
        if scheduled:
            base.state = "running" if "running" in (scheduled, state.get("state")) else "queued"
            base.detail = f"job {record['job_id']}"
            return base
    why = ended.get(record["job_id"]) or "killed, pre-empted or timed out"
    base.state = "failed"
    base.detail = f"job {record['job_id']} ended without a result ({why}); log: " \
                  f"{_last_line(record.get('stderr'), record.get('stdout'))}"
    return base


def cell_states(root: Path, names: list[str] | None = None) -> list[CellState]:
    """Each cell's state from its latest submission (or 'done' when a submission found it on the remote)."""
    subs = _submissions(root)
    latest: dict[str, tuple[dict, dict | None]] = {}
    for sub in subs:
        for name, record in sub["cells"].items():
            latest[name] = (sub, record)
        for name in sub.get("done_before", {}):
            latest[name] = (sub, None)
    ids = {rec["job_id"] for sub, rec in latest.values() if rec and sub["executor"] == "slurm"}
    live, ended = _slurm_states(ids)
    states = []
    for name in names if names is not None else list(latest):
        if name not in latest:
            states.append(CellState(name, "not submitted"))
            continue
        sub, record = latest[name]
        if record is None:
            states.append(CellState(name, "done", sub["done_before"][name], sub["stamp"]))
        else:
            states.append(_job_state(sub, name, record, live, ended))
    return states


# --- submit -------------------------------------------------------------------------------------------------

def _check_clean(root: Path, tracked_outputs: set[str]) -> str:
    """HEAD's commit; refuse when the workspace differs from it (jobs run HEAD) beyond DVC-written files."""
    commit = _git(root, "rev-parse", "HEAD").strip()
    changed = []
    for line in _git(root, "status", "--porcelain", "--untracked-files=all").splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path == "dvc.lock" or path in tracked_outputs or path.startswith(".spml/"):
            continue
        changed.append(path)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise SpmlError(f"the workspace differs from its commit ({shown}); jobs run the committed code and "
                        "params, so commit (or stash) first")
    return commit


def _tracked_outputs(root: Path) -> set[str]:
    with _dvc_repo(root) as repo:
        return {os.path.relpath(out.fs_path, repo.root_dir) for out in repo.index.outs if not out.use_cache}


def _stamp(root: Path) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    taken = {p.stem for p in (root / GRID_DIR).glob("*")} if (root / GRID_DIR).is_dir() else set()
    suffix, candidate = 1, stamp
    while candidate in taken:
        suffix += 1
        candidate = f"{stamp}-{suffix}"
    return candidate


def parse_time(text: str) -> int:
    """A Slurm time limit (MINUTES, MINUTES:SECONDS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not match:
        raise SpmlError(f"--time {text!r}: use minutes (120), H:MM:SS (2:00:00) or D-HH:MM:SS (1-00:00:00)")
    days, rest = match.groups()
    parts = [int(p) for p in rest.split(":")] + [0, 0]
    if days is None and rest.count(":") < 2:  # MINUTES or MINUTES:SECONDS
        minutes, seconds = parts[0], parts[1]
    else:                                     # H:MM:SS, or after "D-": H[:MM[:SS]]
        minutes, seconds = int(days or 0) * 1440 + parts[0] * 60 + parts[1], parts[2]
    minutes += 1 if seconds else 0
    if minutes < 1:
        raise SpmlError(f"--time {text!r} is shorter than a minute")
    return minutes


def _executor(kind: str, folder: Path, jobs: int, count: int, slurm: Resources, name: str):
    """A submitit executor: Slurm (one job array, at most ``jobs`` array tasks at once) or local processes."""
    import submitit

    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        mem = None if not slurm.mem_gb else f"{int(slurm.mem_gb)}G" if slurm.mem_gb == int(slurm.mem_gb) \
            else f"{int(slurm.mem_gb * 1024)}M"
        params = {"job_name": name, "time": slurm.time_min, "array_parallelism": min(jobs, count),
                  "partition": slurm.partition, "gpus_per_node": slurm.gpus_per_job,
                  "cpus_per_task": slurm.cpus_per_job, "mem": mem, "account": slurm.account, "qos": slurm.qos,
                  "constraint": slurm.constraint, "additional_parameters": dict(slurm.extra) or None}
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=slurm.time_min or 7 * 24 * 60)
    return executor


@contextmanager
def _quiet_fds(log: Path):
    """Local jobs are child processes that outlive `submit`: keep them off our stdout/stderr (a caller
    reading our output to its end would otherwise wait for every job)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass
class SubmitResult:
    stamp: str
    submitted: list[str]
    done_before: list[str]
    active: dict[str, str]          # cell -> submission where it is still queued/running
    broken: dict[str, list]         # cell -> entries with missing outputs (warned)


def submit(root: Path, executor: str = "slurm", jobs: int | None = None, resources: Resources = Resources(),
           upstream: str = "pull", workdir: Path | None = None, dry_run: bool = False, keep_clones: bool = False,
           say: Callable[[str], None] = print) -> SubmitResult:
    """Submit one job per cell of the grid that the remote's run-cache does not hold yet."""
    root = Path(root).resolve()
    if executor not in EXECUTORS:
        raise SpmlError(f"unknown executor {executor!r}; use --executor slurm or --executor local")
    if upstream not in UPSTREAM_MODES:
        raise SpmlError(f"unknown --upstream {upstream!r}; use pull or rebuild")
    if jobs is not None and jobs < 1:
        raise SpmlError(f"--jobs {jobs}: it caps how many cells run at once, use N >= 1")
    if executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise SpmlError("--executor slurm: sbatch/srun not found (no Slurm on this machine); run on the cluster's "
                        "login node, or use --executor local")
    _check_root(root, "submit")
    remote, remote_url = default_remote(root)
    commit = _check_clean(root, _tracked_outputs(root))
    cells, upstream_stages = list_cells(root)

    # The upstream stages run once here (restored from the run-cache when someone built them before), and
    # their outputs go to the remote, so that jobs pull them rather than each rebuild them.
    _dvc(root, "repro", "--pull", *upstream_stages, what="reproducing the upstream stages")
    if upstream == "pull" and not dry_run:
        _dvc(root, "push", *upstream_stages, what="pushing the upstream outputs for the jobs")
    compute_keys(root, cells)
    results = remote_results(root, cells)

    earlier = {s.cell: s for s in cell_states(root, [c.name for c in cells])}
    todo, done_before, active, broken = [], [], {}, {}
    for cell in cells:
        found = results[cell.name]
        if found.broken:
            broken[cell.name] = found.broken
        previous = earlier.get(cell.name)
        if found.done:
            done_before.append(cell.name)
        elif previous and previous.state in ACTIVE and previous.key == cell.key:
            active[cell.name] = previous.submission
        else:
            todo.append(cell)
    for name, entries in broken.items():
        say(f"warning: {name}: run-cache entries on the remote name missing outputs "
            f"({', '.join(e for e, _ in entries)}); `spml grid collect` refuses until they are removed")
    stamp = _stamp(root)
    result = SubmitResult(stamp, [c.name for c in todo], done_before, active, broken)
    if dry_run:
        return result

    folder = root / GRID_DIR / stamp
    folder.mkdir(parents=True)
    submitted = _launch(root, folder, stamp, todo, commit, remote, remote_url, executor, jobs, resources,
                        upstream == "rebuild", workdir, keep_clones) if todo else {}
    state = {"stamp": stamp, "created": time.time(), "commit": commit, "executor": executor, "jobs": jobs,
             "folder": str(folder), "cells": submitted,
             "done_before": {name: "on the remote when submitted" for name in done_before}}
    tmp = root / GRID_DIR / f".{stamp}.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, root / GRID_DIR / f"{stamp}.json")
    return result


def _launch(root: Path, folder: Path, stamp: str, todo: list[Cell], commit: str, remote: str,
            remote_url: str | None, executor: str, jobs: int | None, resources: Resources, rebuild: bool,
            workdir: Path | None, keep_clones: bool) -> dict[str, dict]:
    """Submit the jobs with submitit (one Slurm job array, or local processes); their records by cell."""
    shutil.copy2(root / "dvc.lock", folder / "dvc.lock")
    cap = jobs or (len(todo) if executor == "slurm" else 1)
    clones = Path(workdir).resolve() / stamp if workdir else folder / "clones"
    local = executor == "local"
    specs = [CellJob(cell=c.name, key=c.key, repo=str(root), commit=commit, submission=str(folder),
                     workdir=str(clones), remote=remote, remote_url=remote_url, raw_commands=c.raw_commands,
                     upstream=c.upstream, rebuild=rebuild, slots=cap if local else None,
                     gpus_per_job=resources.gpus_per_job if local else None,
                     visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"), bin_dir=str(Path(sys.executable).parent),
                     keep_clone=keep_clones)
             for c in todo]
    runner = _executor(executor, folder / "submitit", cap, len(todo), resources, f"spml-grid-{stamp}")
    with _quiet_fds(folder / "executor.log") if local else _nothing(), runner.batch():
        handles = [runner.submit(run_cell, spec) for spec in specs]
    records = {}
    for spec, job in zip(specs, handles):
        record = {"key": spec.key, "job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                  "stderr": str(job.paths.stderr)}
        if local:
            record.update(started=_proc_start(int(job.job_id)), host=socket.gethostname())
        records[spec.cell] = record
    return records


def _check_root(root: Path, command: str) -> None:
    if not (root / "dvc.yaml").exists():
        raise SpmlError(f"no dvc.yaml in {root}; run `spml grid {command}` from the repository root")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        raise SpmlError(f"{root} is not the top of a git repository; jobs clone the submitting commit, so "
                        "`spml grid` runs from the root of a git checkout")


@contextmanager
def _nothing():
    yield


def wait(root: Path, names: list[str], poll_s: float = 2.0, say: Callable[[str], None] = print) -> list[CellState]:
    """Block until none of ``names`` is queued or running; report each state change."""
    seen: dict[str, str] = {}
    while True:
        states = cell_states(root, names)
        for state in states:
            if seen.get(state.cell) != state.state:
                seen[state.cell] = state.state
                say(f"{state.cell}: {state.state}" + (f" ({state.detail})" if state.state == "failed" else ""))
        if not any(s.state in ACTIVE for s in states):
            return states
        time.sleep(poll_s)


# --- collect ------------------------------------------------------------------------------------------------

def collect(root: Path, say: Callable[[str], None] = print) -> None:
    """Restore every cell from the remote's run-cache and aggregate; refuse if any cell has no result."""
    root = Path(root).resolve()
    _check_root(root, "collect")
    default_remote(root)
    cells, upstream_stages = list_cells(root)
    _dvc(root, "repro", "--pull", *upstream_stages, what="reproducing the upstream stages")
    compute_keys(root, cells)
    results = remote_results(root, cells)
    missing = [c.name for c in cells if not results[c.name].done]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise SpmlError(f"{len(missing)} of {len(cells)} cells have no result on the remote ({shown}); "
                        "run `spml grid submit` (and `spml grid status` to see why)")
    broken = [entry for c in cells for entry, _ in results[c.name].broken]
    if broken:
        raise SpmlError(f"run-cache entries on the remote name outputs it lacks ({', '.join(broken[:3])}); "
                        "`dvc repro --pull` could pick one and retrain: push their outputs or delete them")
    say(f"all {len(cells)} cells are on the remote; restoring them and aggregating")
    _dvc(root, "repro", "--pull", what="restoring the cells and aggregating")
