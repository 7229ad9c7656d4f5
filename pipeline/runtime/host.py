"""The host side of a run: glibc's malloc and how many CPU threads torch gets."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Mapping
from pathlib import Path

from pipeline.errors import SpmlError

# mallopt(3) parameters; the thresholds are glibc's limits on 64-bit Linux (mmap threshold at most 32 MiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**30


def cache_host_memory() -> bool:
    """Make glibc's malloc keep freed blocks (up to 32 MiB each, up to 1 GiB at the heap's top) for reuse.

    By default glibc serves large blocks from fresh ``mmap`` pages and trims the heap after a big
    ``free``, so every training step page-faults its activations in again once the working set is large
    enough: for the synthetic model on this project's 2-core CPU, IGNORE's step took 6,600-10,000 faults
    and about an eighth of its time (AN's none; ``spml bench --host-malloc system|cache`` prints both;
    ``docs/bench-cpu.md``). The process keeps its peak working set instead, which the next step
    reuses. Results do not change (torch's CPU tensors are 64-byte aligned either way). A no-op
    returning False off glibc or where ``mallopt`` refuses a value; idempotent.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # both together: setting either one alone turns off glibc's dynamic mmap threshold and makes it worse
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


THREADS_ENV = "SPML_THREADS"


def usable_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the machine's cores, which a container or ``taskset`` may not grant us.
    The quota is cgroup v2's ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") or v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1: none), rounded up (1.5 CPUs of quota can keep 2 threads busy half
    the time). ``cgroup_root`` is a parameter so tests can point it at fake files.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = (root / "cpu.max").read_text().split()
        if fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            v1_quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            if v1_quota > 0:
                quota, period = v1_quota, int((root / "cpu" / "cpu.cfs_period_us").read_text())
    if quota is not None and period:
        cpus = min(cpus, max(1, -(-quota // period)))
    return max(1, cpus)


def torch_threads(configured: int | None, environ: Mapping[str, str] | None = None) -> int:
    """How many intra-op threads torch gets: $SPML_THREADS, else params ``train.threads``, else all usable CPUs.

    Why this order: ``train.threads`` is a property of the experiment (tracked by DVC), while running N
    cells side by side (``SPML_THREADS=1 dvc exp run -j 2``) is a property of one invocation, which only
    the launcher knows; each process cannot tell how many siblings it has. Auto takes every usable CPU,
    the fastest choice for one run at a time; side by side, the launcher should give each a share
    (usable CPUs / N), or OpenMP's spinning threads oversubscribe the cores (``spml bench --parallel N``).
    """
    environ = os.environ if environ is None else environ
    text = environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise SpmlError(f"environment variable {THREADS_ENV}={text!r} must be a positive integer; "
                            "unset it for the automatic choice")
        return int(text)
    return configured if configured is not None else usable_cpus()
