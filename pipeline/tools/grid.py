"""Scale the grid out: one scheduler job per (dataset, method, seed) cell, results shared through DVC's
remote and run-cache (``spml grid submit | status | collect``; docs/cluster.md).

`dvc repro` runs one stage at a time per workspace, and `dvc queue` is unreliable with several workers, so a
cluster runs each cell of dvc.yaml's ``train``/``ablate``/``train-vl`` matrices as its own job in its own clone
(pipeline/tools/grid_job.py), which pushes the cell's outputs and run-cache entry to the DVC remote. ``collect``
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
from pipeline.tools.grid_job import CellJob, read_state, run_cell, stage_name

GRID_DIR = Path(".spml") / "grid"   # per-submission state (git- and dvc-ignored)
CELL_GROUPS = ("train", "ablate", "train-vl")  # dvc.yaml's matrix stages: one job per cell
EXECUTORS = ("slurm", "local")
UPSTREAM_MODES = ("pull", "rebuild")
ACTIVE = ("queued", "running")
STATES = ("done", "running", "queued", "failed", "stale", "not submitted")


@dataclass(frozen=True)
class Resources:
    """What a job asks for (one Slurm job array per distinct value). Slurm reads all of it, resolved from
    params ``grid:`` and the command line (:func:`resolve_resources`); the local executor only time_min and
    gpus_per_job, from the command line."""

    partition: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None       # None: local executor only (a week)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: tuple = ()                 # other sbatch options: (name, value), value True for a flag
    setup: tuple = ()                 # shell lines the job script runs before the job (module load, ...)
    job_name: str = "spml-grid-{stamp}"
    origin: tuple = field(default=(), compare=False)  # (field, where its value came from), for error messages

    def where(self, name: str) -> str:
        return dict(self.origin).get(name, "")


# params grid.default (every key) / grid.datasets.<name> / grid.methods.<name> (any subset): the checks
GRID_KEYS = {"time": "a time limit (minutes, H:MM:SS or D-HH:MM:SS; submitit requeues a job shortly before it)",
             "mem_gb": "a number of GB > 0, or null", "cpus_per_job": "an integer >= 1, or null",
             "gpus_per_job": "an integer >= 0, or null", "partition": "a partition name, or null",
             "account": "an account name, or null", "qos": "a QOS name, or null",
             "constraint": "a feature constraint, or null",
             "sbatch": "a list of sbatch options, each --NAME, --NAME=VALUE or --NAME VALUE",
             "setup": "a list of shell lines", "job_name": "a job name (may hold {stamp})"}
CLI_FLAGS = {"time": "--time", "mem_gb": "--mem-gb", "cpus_per_job": "--cpus-per-job",
             "gpus_per_job": "--gpus-per-job", "partition": "--partition", "account": "--account", "qos": "--qos",
             "constraint": "--constraint", "sbatch": "--sbatch"}


def _check_grid_value(name: str, value, where: str):
    """A grid block's value, checked (one-line error naming the param); times in minutes, lists as tuples."""
    what = f"params {where}.{name}"
    bad = SpmlError(f"{what} must be {GRID_KEYS[name]}, got {value!r}")
    if name in ("sbatch", "setup"):
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise bad
        return tuple(sbatch_option(v, what) for v in value) if name == "sbatch" else tuple(value)
    if value is None:
        if name in ("job_name", "time"):
            raise bad
        return None
    if name == "time":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad
        return parse_time(str(value), what)
    if name == "mem_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise bad
        return float(value)
    if name in ("cpus_per_job", "gpus_per_job"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "cpus_per_job" else 0):
            raise bad
        return value
    if not isinstance(value, str) or not value.strip():
        raise bad
    return value


def sbatch_option(text: str, where: str) -> tuple[str, str | bool]:
    """``--exclusive`` -> (exclusive, True); ``--exclude=node07`` or ``--exclude node07`` -> (exclude, node07)."""
    line = text.strip()
    if line.startswith("#SBATCH"):
        line = line[len("#SBATCH"):].strip()
    match = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ]\s*(.*))?", line)
    if not match:
        raise SpmlError(f"{where}: sbatch option {text!r}: use the long form --NAME, --NAME=VALUE or --NAME VALUE, "
                        "e.g. --exclusive or --exclude=node07")
    name, value = match.groups()
    return name, True if value is None else value


def grid_params(root: Path) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """params.yaml's ``grid:`` block, checked: (defaults, per-dataset overrides, per-method overrides), each
    a dict of checked values (times in minutes)."""
    from pipeline.config import load_params
    from pipeline.datasets import dataset_names
    from pipeline.registry import METHODS

    params = load_params(root / "params.yaml")
    block = params.get("grid")
    if not isinstance(block, dict) or set(block) != {"default", "datasets", "methods"}:
        raise SpmlError("params grid must be a mapping with default, datasets and methods "
                        f"(got {sorted(block) if isinstance(block, dict) else block!r}); see docs/cluster.md")

    def checked(values, where: str, complete: bool) -> dict:
        if not isinstance(values, dict):
            raise SpmlError(f"params {where} must be a mapping of {', '.join(GRID_KEYS)}, got {values!r}")
        unknown = sorted(set(values) - set(GRID_KEYS))
        if unknown:
            raise SpmlError(f"unknown params {', '.join(f'{where}.{k}' for k in unknown)}; valid: {', '.join(GRID_KEYS)}")
        missing = sorted(set(GRID_KEYS) - set(values)) if complete else []
        if missing:
            raise SpmlError(f"params {', '.join(f'{where}.{k}' for k in missing)} missing; add them to params.yaml")
        return {name: _check_grid_value(name, value, where) for name, value in values.items()}

    default = checked(block["default"], "grid.default", True)
    overrides = []
    for kind, known in (("datasets", dataset_names()), ("methods", METHODS.names())):
        group = block[kind] or {}
        if not isinstance(group, dict):
            raise SpmlError(f"params grid.{kind} must be a mapping of {kind[:-1]} name to overrides, got {group!r}")
        for name in group:
            if name not in known:
                raise SpmlError(f"params grid.{kind}.{name}: unknown {kind[:-1]}; valid: {', '.join(sorted(known))}")
        overrides.append({name: checked(values, f"grid.{kind}.{name}", False) for name, values in group.items()})
    return default, overrides[0], overrides[1]


def resolve_resources(grid: tuple[dict, dict, dict], dataset: str, method: str, cli: dict) -> Resources:
    """One cell's Slurm resources: grid.default, then grid.datasets.<dataset>, then grid.methods.<method>
    (a later value replaces an earlier one, lists too), then the command line's options; ``--sbatch``
    options are added to the sbatch lines (replacing one of the same name)."""
    default, datasets, methods = grid
    values, origin = {}, {}
    for where, block in (("grid.default", default), (f"grid.datasets.{dataset}", datasets.get(dataset, {})),
                         (f"grid.methods.{method}", methods.get(method, {}))):
        for name, value in block.items():
            values[name], origin[name] = value, f"params {where}.{name}"
    for name, value in cli.items():
        if name == "sbatch":
            if value:
                given = dict(value)
                values["sbatch"] = tuple((k, v) for k, v in values["sbatch"] if k not in given) + tuple(value)
                origin["sbatch"] = f"{origin['sbatch']} and --sbatch"
        elif value is not None:
            values[name], origin[name] = value, CLI_FLAGS[name]
    return Resources(partition=values["partition"], gpus_per_job=values["gpus_per_job"],
                     cpus_per_job=values["cpus_per_job"], mem_gb=values["mem_gb"], time_min=values["time"],
                     account=values["account"], qos=values["qos"], constraint=values["constraint"],
                     extra=values["sbatch"], setup=values["setup"], job_name=values["job_name"],
                     origin=tuple(sorted(origin.items())))


@dataclass
class Cell:
    name: str                       # train@synthetic-an-0
    upstream: tuple[str, ...]       # stages it needs, pulled (or rebuilt) by the job
    raw_commands: tuple[str, ...]   # commands of its raw-data stages (outputs not pushed)
    key: str = ""                   # run-cache key in the submitting workspace
    dataset: str = ""               # from its command (`spml train DATASET METHOD --seed N`)
    method: str = ""


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


def _dvc(root: Path, *args: str, what: str, quiet: bool = False) -> None:
    """Run dvc in the workspace, its output to the terminal (``quiet``: only if it fails); one-line error if
    it fails."""
    if not quiet:
        print(f"$ dvc {' '.join(args)}", file=sys.stderr, flush=True)
    run = subprocess.run(_dvc_cmd() + list(args), cwd=root, env=_env(root), check=False,
                         **({"capture_output": True, "text": True} if quiet else {}))
    if run.returncode != 0:
        if quiet:
            print(f"$ dvc {' '.join(args)}\n{run.stdout}{run.stderr}", file=sys.stderr, end="", flush=True)
        raise SpmlError(f"`dvc {' '.join(args)}` failed (exit {run.returncode}) while {what}; see its output above")


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
            cmd = stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd)
            words = cmd.split()  # spml train DATASET METHOD --seed N (dvc.yaml's cell stages)
            dataset, method = (words[2], words[3]) if len(words) >= 4 and words[:2] == ["spml", "train"] else ("", "")
            cells.append(Cell(name, tuple(rest), commands, dataset=dataset, method=method))
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


def cell_states(root: Path, names: list[str] | None = None, keys: dict[str, str] | None = None,
                on_remote: dict[str, bool] | None = None) -> list[CellState]:
    """Each cell's state.

    With ``keys`` (each cell's run-cache key at the current commit, :func:`compute_keys`) and ``on_remote``
    (whether the remote holds a result for that key): done when the remote has it; else the state of the
    latest job submitted for *that key* (queued, running, failed); else ``stale`` when only jobs or results
    of older keys exist (another commit's code or params); else not submitted. Without them (right after a
    submission, whose keys are current by construction): the latest submission of each cell by name."""
    subs = _submissions(root)
    history: dict[str, list[tuple[dict, dict | None, str]]] = {}   # cell -> [(submission, job record, key)]
    for sub in subs:
        for name, record in sub["cells"].items():
            history.setdefault(name, []).append((sub, record, record.get("key", "")))
        for name, found in sub.get("done_before", {}).items():
            key = found.get("key", "") if isinstance(found, dict) else ""   # before keys were recorded: ""
            history.setdefault(name, []).append((sub, None, key))
    chosen: dict[str, tuple[dict, dict | None, str]] = {}
    stale_of: dict[str, tuple[dict, dict | None, str]] = {}
    for name in names if names is not None else list(history):
        entries = history.get(name, [])
        if keys is None:
            if entries:
                chosen[name] = entries[-1]
            continue
        same = [e for e in entries if e[2] == keys[name]]
        if same:
            chosen[name] = same[-1]
        elif entries:
            stale_of[name] = entries[-1]
    ids = {rec["job_id"] for sub, rec, _ in [*chosen.values(), *stale_of.values()] if rec and sub["executor"] == "slurm"}
    live, ended = _slurm_states(ids)
    states = []
    for name in names if names is not None else list(history):
        if on_remote is not None and on_remote.get(name):
            found = chosen.get(name)
            detail = "result on the remote"
            if found and found[1] is not None:
                ran = read_state(found[0]["folder"], name) or {}
                if ran.get("state") == "done":
                    detail = f"in {ran.get('seconds', 0):.0f} s on {ran.get('host')}"
            states.append(CellState(name, "done", detail, found[0]["stamp"] if found else "", keys[name]))
        elif name in chosen:
            sub, record, key = chosen[name]
            if record is None:
                if on_remote is None:
                    detail = sub["done_before"][name]
                    states.append(CellState(name, "done", detail if isinstance(detail, str) else detail["detail"],
                                            sub["stamp"], key))
                else:  # it was on the remote, and no longer is (removed, or another remote)
                    states.append(CellState(name, "not submitted", "its result has left the remote since "
                                            f"submission {sub['stamp']}", "", key))
                continue
            state = _job_state(sub, name, record, live, ended)
            if state.state == "done" and on_remote is not None:  # the job finished, the remote lacks it
                state.state, state.detail = "failed", f"job {record['job_id']} ended, but its result is not on the remote"
            states.append(state)
        elif name in stale_of:
            sub, record, key = stale_of[name]
            if record is None:
                was = "a result on the remote"
            else:
                old = _job_state(sub, name, record, live, ended)
                was = f"job {record['job_id']} ({old.state})"
            now = keys[name] if keys else ""
            states.append(CellState(name, "stale", f"{was} for an older version of the cell (run-cache key "
                                    f"{(key or '?')[:12]}, now {now[:12]}); `spml grid submit` submits this one",
                                    sub["stamp"], key))
        else:
            states.append(CellState(name, "not submitted", key=(keys or {}).get(name, "")))
    return states


def status(root: Path) -> list[CellState]:
    """Every cell's state at the current commit: its run-cache key computed as `submit` and `collect` do
    (after restoring the upstream stages), looked up on the remote and among the submissions."""
    root = Path(root).resolve()
    _check_root(root, "status")
    default_remote(root)
    cells, upstream_stages = list_cells(root)
    _dvc(root, "repro", "--pull", *upstream_stages, what="reproducing the upstream stages", quiet=True)
    compute_keys(root, cells)
    results = remote_results(root, cells)
    return cell_states(root, [c.name for c in cells], {c.name: c.key for c in cells},
                       {c.name: results[c.name].done for c in cells})


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


def parse_time(text: str, what: str = "--time") -> int:
    """A Slurm time limit (MINUTES, MINUTES:SECONDS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not match:
        raise SpmlError(f"{what} {text!r}: use minutes (120), H:MM:SS (2:00:00) or D-HH:MM:SS (1-00:00:00)")
    days, rest = match.groups()
    parts = [int(p) for p in rest.split(":")] + [0, 0]
    if days is None and rest.count(":") < 2:  # MINUTES or MINUTES:SECONDS
        minutes, seconds = parts[0], parts[1]
    else:                                     # H:MM:SS, or after "D-": H[:MM[:SS]]
        minutes, seconds = int(days or 0) * 1440 + parts[0] * 60 + parts[1], parts[2]
    minutes += 1 if seconds else 0
    if minutes < 1:
        raise SpmlError(f"{what} {text!r} is shorter than a minute")
    return minutes


def _slurm_parameters(slurm: Resources, jobs: int, count: int, stamp: str) -> dict:
    """submitit's SlurmExecutor parameters for one job array of ``count`` cells, at most ``jobs`` at once."""
    mem = None if not slurm.mem_gb else f"{int(slurm.mem_gb)}G" if slurm.mem_gb == int(slurm.mem_gb) \
        else f"{int(slurm.mem_gb * 1024)}M"
    params = {"job_name": slurm.job_name.replace("{stamp}", stamp), "time": slurm.time_min,
              "array_parallelism": min(jobs, count), "partition": slurm.partition,
              "gpus_per_node": slurm.gpus_per_job, "cpus_per_task": slurm.cpus_per_job, "mem": mem,
              "account": slurm.account, "qos": slurm.qos, "constraint": slurm.constraint,
              "additional_parameters": dict(slurm.extra) or None, "setup": list(slurm.setup) or None}
    return {k: v for k, v in params.items() if v is not None}


def sbatch_lines(slurm: Resources, jobs: int, count: int, stamp: str) -> list[str]:
    """The ``#SBATCH`` lines (without log paths) and setup lines of the job script submitit writes for one
    array of ``count`` cells with these resources: what `--dry-run` shows."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="true", folder="/x", map_count=count if count > 1 else None,
                               **_slurm_parameters(slurm, jobs, count, stamp))
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")
             and not line.startswith(("#SBATCH --output", "#SBATCH --error"))]
    return [line[len("#SBATCH "):] for line in lines] + [f"setup: {line}" for line in slurm.setup]


def _executor(kind: str, folder: Path, jobs: int, count: int, slurm: Resources, stamp: str):
    """A submitit executor: Slurm (one job array, at most ``jobs`` array tasks at once) or local processes."""
    import submitit

    if kind == "slurm":
        if slurm.time_min is None:
            raise SpmlError(f"no time limit for the Slurm jobs ({slurm.where('time') or 'params grid.default.time'} "
                            "is null): submitit needs one to requeue a job before it; set it, e.g. --time 2:00:00")
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**_slurm_parameters(slurm, jobs, count, stamp))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=slurm.time_min or 7 * 24 * 60)
    return executor


# sbatch's refusals and the resource that causes each (matched in sbatch's message, lower-cased)
SBATCH_CAUSES = (("gres", "gpus_per_job"), ("gpu", "gpus_per_job"), ("partition", "partition"),
                 ("account", "account"), ("qos", "qos"), ("feature", "constraint"), ("constraint", "constraint"),
                 ("memory", "mem_gb"), ("time limit", "time"), ("cpu", "cpus_per_job"), ("processor", "cpus_per_job"))
RESOURCE_FIELDS = {"gpus_per_job": "gpus_per_job", "partition": "partition", "account": "account", "qos": "qos",
                   "constraint": "constraint", "mem_gb": "mem_gb", "time": "time_min", "cpus_per_job": "cpus_per_job"}


def sbatch_refusal(text: str, slurm: Resources, cells: list[str]) -> SpmlError:
    """One line for a job array sbatch refused (``text``: what sbatch and submitit said): sbatch's own
    message and the option that caused it."""
    found = [line for line in re.findall(r"sbatch: (?:error: )?([^\n]+)", text) if not line.startswith("Try ")]
    message = (found[-1] if found else next((line for line in reversed(text.splitlines()) if line.strip()),
                                             "(no message)")).strip()
    lower = message.lower()
    cause = next((name for word, name in SBATCH_CAUSES if word in lower), None)
    shown = ", ".join(cells[:3]) + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")
    if cause is not None:
        value = getattr(slurm, RESOURCE_FIELDS[cause])
        value = f"{value} min" if cause == "time" else value
        where = slurm.where(cause) or CLI_FLAGS.get(cause, cause)
        blame = f"check {where} ({value})"
    else:
        given = [f"{k}={v}" for k, v in slurm.extra]
        blame = "check the resources (`spml grid submit --dry-run` prints the sbatch lines)" + \
            (f", e.g. the sbatch options {', '.join(given)}" if given else "")
    return SpmlError(f"sbatch refused the jobs of {shown}: {message}; {blame}; nothing was submitted")


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
    shapes: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (cells, sbatch lines): one array each


def submit(root: Path, executor: str = "slurm", jobs: int | None = None, resources: Resources | dict = Resources(),
           upstream: str = "pull", workdir: Path | None = None, dry_run: bool = False, keep_clones: bool = False,
           say: Callable[[str], None] = print) -> SubmitResult:
    """Submit one job per cell of the grid that the remote's run-cache does not hold yet.

    ``resources``: for Slurm, the command line's values by params ``grid`` key (None: not given), resolved per
    cell with params ``grid:`` (:func:`resolve_resources`); cells of one shape go into one job array. The
    local executor takes a :class:`Resources` (or the same dict) from the command line alone."""
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
    cli = resources if isinstance(resources, dict) else _as_cli(resources)
    grid = grid_params(root) if executor == "slurm" else None
    remote, remote_url = default_remote(root)
    commit = _check_clean(root, _tracked_outputs(root))
    cells, upstream_stages = list_cells(root)
    if executor == "slurm":  # bad resources are refused before anything runs
        shape_of = {c.name: resolve_resources(grid, c.dataset, c.method, cli) for c in cells}
    else:
        local = Resources(gpus_per_job=cli.get("gpus_per_job"), time_min=cli.get("time"))
        shape_of = {c.name: local for c in cells}

    # The upstream stages run once here (restored from the run-cache when someone built them before), and
    # their outputs go to the remote, so that jobs pull them rather than each rebuild them.
    _dvc(root, "repro", "--pull", *upstream_stages, what="reproducing the upstream stages")
    if upstream == "pull" and not dry_run:
        _dvc(root, "push", *upstream_stages, what="pushing the upstream outputs for the jobs")
    compute_keys(root, cells)
    results = remote_results(root, cells)

    keys = {c.name: c.key for c in cells}
    earlier = {s.cell: s for s in cell_states(root, list(keys), keys)}
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
    groups: dict[Resources, list[Cell]] = {}
    for cell in todo:
        groups.setdefault(shape_of[cell.name], []).append(cell)
    cap = jobs or None
    shapes = [([c.name for c in group], sbatch_lines(shape, cap or len(group), len(group), stamp)
               if executor == "slurm" else _local_lines(shape, cap or 1))
              for shape, group in groups.items()]
    result = SubmitResult(stamp, [c.name for c in todo], done_before, active, broken, shapes)
    if dry_run:
        return result

    folder = root / GRID_DIR / stamp
    folder.mkdir(parents=True)
    try:
        submitted = _launch(root, folder, stamp, groups, commit, remote, remote_url, executor, jobs,
                            upstream == "rebuild", workdir, keep_clones) if todo else {}
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # ours, created above: no half-recorded submission
        raise
    state = {"stamp": stamp, "created": time.time(), "commit": commit, "executor": executor, "jobs": jobs,
             "folder": str(folder), "cells": submitted,
             "done_before": {name: {"key": keys[name], "detail": "on the remote when submitted"}
                             for name in done_before}}
    tmp = root / GRID_DIR / f".{stamp}.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, root / GRID_DIR / f"{stamp}.json")
    return result


def _as_cli(resources: Resources) -> dict:
    """A :class:`Resources` (the Python API's) as command-line values by params ``grid`` key."""
    return {"partition": resources.partition, "gpus_per_job": resources.gpus_per_job,
            "cpus_per_job": resources.cpus_per_job, "mem_gb": resources.mem_gb, "time": resources.time_min,
            "account": resources.account, "qos": resources.qos, "constraint": resources.constraint,
            "sbatch": tuple(resources.extra)}


def _local_lines(shape: Resources, slots: int) -> list[str]:
    return [f"local: {slots} at once", f"time limit {shape.time_min or 7 * 24 * 60} min"] + \
        ([f"{shape.gpus_per_job} GPU(s) per job"] if shape.gpus_per_job else [])


def _cancel(job_ids: list[str]) -> None:
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)


def _launch(root: Path, folder: Path, stamp: str, groups: dict[Resources, list[Cell]], commit: str, remote: str,
            remote_url: str | None, executor: str, jobs: int | None, rebuild: bool,
            workdir: Path | None, keep_clones: bool) -> dict[str, dict]:
    """Submit the jobs with submitit (one Slurm job array per resource shape, or local processes); their
    records by cell. If sbatch refuses an array, the arrays submitted before it are cancelled."""
    from submitit.core.utils import UncompletedJobError

    from pipeline.tools.grid_job import SlurmCell

    shutil.copy2(root / "dvc.lock", folder / "dvc.lock")
    count = sum(len(group) for group in groups.values())
    clones = Path(workdir).resolve() / stamp if workdir else folder / "clones"
    local = executor == "local"
    records: dict[str, dict] = {}
    for index, (shape, group) in enumerate(groups.items()):
        cap = jobs or (len(group) if executor == "slurm" else 1)
        specs = [CellJob(cell=c.name, key=c.key, repo=str(root), commit=commit, submission=str(folder),
                         workdir=str(clones), remote=remote, remote_url=remote_url, raw_commands=c.raw_commands,
                         upstream=c.upstream, rebuild=rebuild, slots=(jobs or 1) if local else None,
                         gpus_per_job=shape.gpus_per_job if local else None,
                         visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
                         bin_dir=str(Path(sys.executable).parent), keep_clone=keep_clones,
                         grid_dir=str(root / GRID_DIR))
                 for c in group]
        subfolder = folder / "submitit" if len(groups) == 1 else folder / f"submitit-{index}"
        runner = _executor(executor, subfolder, cap, len(group), shape, stamp)
        task = run_cell if local else SlurmCell()
        # local: jobs are our children, kept off our output; Slurm: sbatch's own stderr, read for a refusal
        log = folder / ("executor.log" if local else f"sbatch-{index}.log")
        try:
            with _quiet_fds(log), runner.batch():
                handles = [runner.submit(task, spec) for spec in specs]
        except (UncompletedJobError, subprocess.SubprocessError, OSError) as exc:
            if local:
                raise
            _cancel(sorted({r["job_id"].split("_")[0] for r in records.values()}))
            said = log.read_text(errors="replace") if log.exists() else ""
            raise sbatch_refusal(f"{said}\n{exc}", shape, [c.name for c in group]) from None
        for spec, job in zip(specs, handles):
            record = {"key": spec.key, "job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                      "stderr": str(job.paths.stderr)}
            if local:
                record.update(started=_proc_start(int(job.job_id)), host=socket.gethostname())
            records[spec.cell] = record
    assert len(records) == count
    return records


def _check_root(root: Path, command: str) -> None:
    if not (root / "dvc.yaml").exists():
        raise SpmlError(f"no dvc.yaml in {root}; run `spml grid {command}` from the repository root")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        raise SpmlError(f"{root} is not the top of a git repository; jobs clone the submitting commit, so "
                        "`spml grid` runs from the root of a git checkout")


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
