"""One grid cell as a cluster job (`spml grid submit`, pipeline/tools/grid.py): what runs on the node.

A job works in its own clone of the submitting repository at the submitting commit, so jobs never share a
DVC workspace, lock or cache:

1. ``git clone`` + checkout of the commit; the submitter's ``.dvc/config.local`` and remote URL, and its
   ``dvc.lock`` (which pins the prepared tables and pretrained trunk the submitter built and pushed).
2. The raw data the cell reads images from (``data/raw/<dataset>``): the raw stage's own command
   (``spml download <dataset>``: the synthetic set is regenerated bit for bit, a real dataset is linked from
   ``data.<name>.source``, a path every node sees). Raw data is never on the DVC remote.
3. The upstream tables and trunk: ``dvc pull`` (default), or ``dvc repro`` to rebuild them with the raw
   data (``--upstream rebuild``, instead of step 2).
4. ``dvc repro --pull --single-item <cell>``: trains, or restores if the remote's run-cache has it by now.
5. The cell's run-cache key is checked against the key the submitter computed (same code, params and input
   hashes), so a job never publishes a result the submitter would not look up.
6. ``dvc push`` of the outputs, *then* ``dvc push --run-cache``: a run-cache entry never reaches the remote
   before the outputs it names, so a crash between the two leaves the cell "not done" (resubmitted), never
   "done" with missing outputs.

The job records its state in ``<submission>/cells/<cell>.json`` (running, requeued, done, failed + message);
a killed job leaves ``running`` behind and `spml grid status` asks the scheduler.

**Surviving pre-emption and time limits.** Training writes its resume checkpoint after every epoch to
``runs/.resume/`` (pipeline/runtime/checkpoint.py). In a job clone that folder is a symlink to
``.spml/grid/resume/<key>/`` in the submitting repository (a filesystem every node sees; :func:`resume_root`),
so a job that starts again for the same run-cache key, on any node and in a fresh clone, continues from the
last finished epoch; a checkpoint of another key (other code, params or inputs) sits in another folder and is
never seen, and the checkpoint's own fingerprint check still applies. On Slurm the job is a submitit
``Checkpointable`` (:class:`SlurmCell`): Slurm's warning signal before the time limit (submitit's
``--signal=USR2@90``), or the same signal sent on pre-emption (``scancel --signal=USR2``), makes submitit call
:meth:`SlurmCell.checkpoint`, which stops the job's processes, and requeue the job (``scontrol requeue``): the
same array task runs again and resumes. One job at a time trains a key (an flock next to its folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CellJob:
    """Everything a job needs, pickled by submitit (plain values: the node imports only this module)."""

    cell: str                   # DVC stage name, e.g. train@synthetic-an-0
    key: str                    # the cell's run-cache key in the submitting workspace
    repo: str                   # the submitting repository (a path every node sees)
    commit: str                 # the submitting commit
    submission: str             # .spml/grid/<stamp>: lock snapshot, state files, slots
    workdir: str                # the clone goes to <workdir>/<cell>
    remote: str                 # default DVC remote's name
    remote_url: str | None      # its absolute URL when the submitter's config names a local path
    raw_commands: tuple[str, ...]   # commands of the raw stages (push: false), run outside DVC
    upstream: tuple[str, ...]       # stages to pull (or rebuild) before the cell
    rebuild: bool               # rebuild upstream with `dvc repro` instead of pulling it
    slots: int | None           # local executor: at most this many cells run at once
    gpus_per_job: int | None    # local executor: GPUs given to each slot
    visible_gpus: str | None    # the submitter's CUDA_VISIBLE_DEVICES (local executor)
    bin_dir: str                # the submitter's venv bin (dvc, spml)
    keep_clone: bool = False
    grid_dir: str | None = None  # the submitter's .spml/grid (resume checkpoints live under it); None: in the clone


class CellFailed(Exception):
    """A step of the job failed; the message is what `spml grid status` shows."""


def state_path(submission: Path | str, cell: str) -> Path:
    return Path(submission) / "cells" / f"{cell}.json"


def write_state(submission: Path | str, cell: str, **fields) -> None:
    """Replace the cell's state file atomically (status may read it at any time)."""
    path = state_path(submission, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**fields, "time": time.time()}, indent=1))
    os.replace(tmp, path)


def read_state(submission: Path | str, cell: str) -> dict | None:
    try:
        return json.loads(state_path(submission, cell).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _log(message: str) -> None:
    print(f"[spml grid] {message}", flush=True)


def _step(args: list[str] | str, cwd: Path, env: dict) -> None:
    """Run one command, its output into the job's log; raise CellFailed with its last stderr line."""
    shown = args if isinstance(args, str) else shlex.join(args)
    _log(f"$ {shown}")
    proc = subprocess.Popen(args, cwd=cwd, env=env, shell=isinstance(args, str), stderr=subprocess.PIPE,
                            text=True, errors="replace")
    last = [""]

    def tee() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.strip():
                last[0] = line.strip()
        sys.stderr.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    began = time.monotonic()
    code = proc.wait()
    reader.join()
    _log(f"({time.monotonic() - began:.1f} s, exit {code})")  # what each step costs: docs/cluster.md
    if code < 0:
        raise CellFailed(f"`{shown}` was killed by {signal.Signals(-code).name}" + (f": {last[0]}" if last[0] else ""))
    if code != 0:
        raise CellFailed(f"`{shown}` exited {code}: {last[0]}")


def _acquire_slot(job: CellJob):
    """Local executor: wait for one of ``job.slots`` slots (an flock each; the kernel frees it when the job
    dies, however it dies). Returns (slot index, open lock file)."""
    folder = Path(job.submission) / "slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(job.slots):
            handle = open(folder / f"{index}.lock", "a")  # noqa: SIM115 - held for the job's lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return index, handle
            except BlockingIOError:
                handle.close()
        time.sleep(0.5)


def _gpu_env(job: CellJob, slot: int | None, env: dict) -> dict:
    """Local executor: slot k gets GPUs k*G ... k*G+G-1 of the submitter's visible ones (G = gpus_per_job),
    or, without G, the submitter's own CUDA_VISIBLE_DEVICES (submitit's local executor blanks it). On Slurm the
    scheduler assigns GPUs."""
    if slot is None:
        return env
    env = dict(env)
    visible = None if job.visible_gpus is None else [g for g in job.visible_gpus.split(",") if g]
    if job.gpus_per_job:
        first = slot * job.gpus_per_job
        ids = range(first, first + job.gpus_per_job)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] for i in ids if i < len(visible)) \
            if visible is not None else ",".join(map(str, ids))
    elif job.visible_gpus is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = job.visible_gpus
    return env


def stage_name(stage, root: Path | str) -> str:
    """The stage's name as `dvc` run in ``root`` takes it (DVC's own ``addressing`` is relative to the cwd)."""
    dvcfile = os.path.relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _check_key(clone: Path, cell: str, expected: str) -> None:
    from dvc.repo import Repo
    from dvc.stage.cache import _get_stage_hash

    with Repo(os.fspath(clone)) as repo:
        (stage,) = [s for s in repo.index.stages if stage_name(s, clone) == cell]
        key = _get_stage_hash(stage)  # from the lock entry the repro just wrote
    if key != expected:
        raise CellFailed(f"the job's inputs differ from the submitting workspace's (run-cache key {key[:12]} "
                         f"!= {expected[:12]}): an upstream rebuild was not bit-identical, or the repository "
                         "changed; nothing was pushed")


RESUME_DIR = "resume"  # <grid_dir>/resume/<key>/: a cell's resume checkpoints, shared by every job of that key


def resume_root(grid_dir: Path | str, key: str) -> Path:
    """Where the jobs of run-cache key ``key`` keep the cell's resume checkpoints (the clone's runs/.resume)."""
    return Path(grid_dir) / RESUME_DIR / key


def _link_resume(job: CellJob, clone: Path):
    """Point the clone's runs/.resume at the key's shared folder; hold that key's lock (one trainer per key).
    Returns the open lock file (closed, and so released, when the job ends however it ends), or None."""
    if not job.grid_dir:
        return None
    target = resume_root(job.grid_dir, job.key)
    target.mkdir(parents=True, exist_ok=True)
    lock = open(target.with_name(f"{job.key}.lock"), "a")  # noqa: SIM115 - held for the job's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"another job trains key {job.key[:12]} (its lock {lock.name}); waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("last.pt"))
    if found:
        _log(f"resume checkpoint of this key found: {', '.join(found)} in {target}")
    (clone / "runs").mkdir(exist_ok=True)
    (clone / "runs" / ".resume").symlink_to(target, target_is_directory=True)
    return lock


def _drop_resume(job: CellJob) -> None:
    """After success: the key's folder, now empty (training removed its checkpoints). Its lock file stays (a
    job waiting on it must lock the same file)."""
    if job.grid_dir:
        with contextlib.suppress(OSError):  # not empty (a stage-1 folder of a failed attempt?) or gone: leave it
            resume_root(job.grid_dir, job.key).rmdir()


_REQUEUED = threading.Event()  # set by SlurmCell.checkpoint: the job ends because it is requeued, not failed


def _stop_children() -> None:
    """Stop every other process of this job's process group (dvc, spml train): SIGTERM, SIGKILL after 20 s.
    Called before a requeue, so that no process of this run writes the resume folder once the next run starts."""
    group, me = os.getpgid(0), os.getpid()

    def members() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != me:
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                    pids.append(int(entry.name))
        return pids

    for sig, patience in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        pids = members()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + patience
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = members()
        if not pids:
            return


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit runs every job, so it is there
    _Checkpointable = object


class SlurmCell(_Checkpointable):
    """The Slurm job: :func:`run_cell`, requeued by submitit on the pre-emption/time-limit signal."""

    def __call__(self, job: CellJob) -> str:
        return run_cell(job)

    def checkpoint(self, job: CellJob):
        # the training state is already on the shared filesystem (the last finished epoch): stop this run's
        # processes and let submitit requeue the same call
        _REQUEUED.set()
        _log("pre-emption or time-limit signal: stopping, the job is requeued and resumes from its last epoch")
        write_state(job.submission, job.cell, state="requeued", host=socket.gethostname(), pid=os.getpid())
        _stop_children()
        return super().checkpoint(job)


def run_cell(job: CellJob) -> str:
    """The job: clone, restore inputs, train the cell, push outputs then run-cache. Returns the cell name."""
    try:
        os.setsid()  # this job's processes form one group: `kill -- -PGID` ends all of them
    except OSError:
        pass  # already a group leader
    started = time.time()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        slurm_job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    where = {"host": socket.gethostname(), "pid": os.getpid(), "pgid": os.getpgid(0), "slurm_job_id": slurm_job}
    slot = slot_lock = resume_lock = None
    if job.slots:
        write_state(job.submission, job.cell, state="queued", **where)
        slot, slot_lock = _acquire_slot(job)
    write_state(job.submission, job.cell, state="running", slot=slot, **where)
    clone = Path(job.workdir) / job.cell
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([job.bin_dir, os.environ.get("PATH", "")]))
    env = _gpu_env(job, slot, env)
    dvc = [str(Path(job.bin_dir) / "dvc")] if (Path(job.bin_dir) / "dvc").exists() else [sys.executable, "-m", "dvc"]
    try:
        placed = f"slurm job {slurm_job}" if slurm_job else f"local slot {slot}"
        _log(f"{job.cell} on {where['host']} ({placed}), clone {clone}")
        if clone.exists():
            shutil.rmtree(clone)
        clone.parent.mkdir(parents=True, exist_ok=True)
        _step(["git", "clone", "-q", "--no-checkout", job.repo, str(clone)], clone.parent, env)
        _step(["git", "checkout", "-q", "--detach", job.commit], clone, env)
        resume_lock = _link_resume(job, clone)
        local_config = Path(job.repo) / ".dvc" / "config.local"
        if local_config.exists():
            shutil.copy2(local_config, clone / ".dvc" / "config.local")
        if job.remote_url is not None:
            _step(dvc + ["remote", "modify", "--local", job.remote, "url", job.remote_url], clone, env)
        shutil.copy2(Path(job.submission) / "dvc.lock", clone / "dvc.lock")
        if job.rebuild and job.upstream:
            _step(dvc + ["repro", *job.upstream], clone, env)  # the raw stages too: they are upstream of these
        else:
            for command in job.raw_commands:
                _step(command, clone, env)
            if job.upstream:
                _step(dvc + ["pull", *job.upstream], clone, env)
        _step(dvc + ["repro", "--pull", "--single-item", job.cell], clone, env)
        _check_key(clone, job.cell, job.key)
        # outputs first, run-cache entry second: an entry on the remote always names outputs that are there
        _step(dvc + ["push", "--with-deps", job.cell], clone, env)
        _step(dvc + ["push", "--run-cache", "--with-deps", job.cell], clone, env)
        _drop_resume(job)
    except BaseException as exc:
        if not _REQUEUED.is_set():  # a requeue already wrote its state; the requeued job starts over
            message = str(exc) if isinstance(exc, CellFailed) else f"{type(exc).__name__}: {exc}"
            write_state(job.submission, job.cell, state="failed", message=message,
                        seconds=round(time.time() - started, 1), **where)
        raise
    finally:
        for lock in (slot_lock, resume_lock):
            if lock is not None:
                lock.close()
    if not job.keep_clone:
        shutil.rmtree(clone, ignore_errors=True)
    write_state(job.submission, job.cell, state="done", seconds=round(time.time() - started, 1), **where)
    _log(f"{job.cell} done in {time.time() - started:.0f} s")
    return job.cell
