"""The host side of a run: which malloc serves host memory, and how many CPU threads torch gets.

Host memory. A training step allocates and frees its activations every step. glibc's malloc serves blocks
above its mmap threshold (at most 32 MiB) from fresh pages and gives them back on free, so a big model's step
page-faults its activations in again every time. Two remedies, best first:

1. a caching allocator, jemalloc or tcmalloc (Debian: ``apt-get install libjemalloc2`` or
   ``libtcmalloc-minimal4``), loaded into the process by :func:`preload_allocator`: the CLI re-executes
   itself once, before torch is imported, with the library in ``LD_PRELOAD`` (and the library told to keep
   freed pages, :data:`ALLOCATOR_CONF`); an environment marker stops a second re-exec;
2. when none is installed (or ``runtime.host_allocator: glibc``): :func:`cache_host_memory`, glibc's own
   thresholds raised, which keeps blocks up to 32 MiB and covers the small models but not ResNet-50.

:func:`host_memory` (called by ``setup_process``) says which one runs and applies the glibc fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    and about an eighth of its time (AN's none; ``spml bench step --host-allocator glibc
    --no-host-malloc-cache`` and ``--host-malloc-cache`` print both;
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


ALLOCATORS = ("auto", "jemalloc", "tcmalloc", "glibc")  # params runtime.host_allocator / $SPML_ALLOCATOR
ALLOCATOR_ENV = "SPML_ALLOCATOR"  # overrides params runtime.host_allocator for one invocation
REEXEC_MARK = "SPML_ALLOCATOR_REEXEC"  # set in the re-executed process: it never re-executes again
# the shared objects of each library (Debian's packages libjemalloc2 and libtcmalloc-minimal4 first)
PRELOAD_LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
# Keep freed pages for reuse, as CUDA's caching allocator does (a user's own setting wins). jemalloc's default
# returns dirty pages to the OS over 10 s, which for steps of a second or more is a page fault per reused page
# (measured: IGNORE 16,900 faults per step on the synthetic model; 0 with these settings).
ALLOCATOR_CONF = {"jemalloc": ("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),
                  "tcmalloc": ("TCMALLOC_RELEASE_RATE", "0")}
INSTALL_HINT = "apt-get install libjemalloc2"
# the commands whose process trains or times a step (the others gain nothing from a re-exec)
PRELOAD_COMMANDS = ("train", "bench")


def library_dirs() -> list[Path]:
    """Where the dynamic linker's usual libraries live (multiarch first), as far as they exist."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib"]
    return [Path(d) for d in dirs if Path(d).is_dir()]


def find_allocator(requested: str, dirs: Sequence[Path] | None = None) -> tuple[str, Path] | None:
    """The library ``requested`` names (auto: jemalloc, else tcmalloc) as (name, path), or None: glibc asked
    for, or none of its files in ``dirs`` (default :func:`library_dirs`)."""
    if requested not in ALLOCATORS:
        raise SpmlError(f"host allocator {requested!r} must be one of {', '.join(ALLOCATORS)}")
    names = {"auto": ("jemalloc", "tcmalloc"), "glibc": ()}.get(requested, (requested,))
    dirs = library_dirs() if dirs is None else dirs
    for name in names:
        for directory in dirs:
            for filename in PRELOAD_LIBRARIES[name]:
                if (Path(directory) / filename).is_file():
                    return name, Path(directory) / filename
    return None


def running_allocator(maps: str | os.PathLike = "/proc/self/maps") -> tuple[str, Path | None]:
    """The malloc this process runs: ("jemalloc" | "tcmalloc", library) when one is mapped, else ("glibc",
    None). Read from the process's memory map, so a library preloaded by the user counts as well."""
    with contextlib.suppress(OSError):
        for line in Path(maps).read_text().splitlines():
            path = line.split()[-1] if line.split() else ""
            name = Path(path).name
            for allocator, filenames in PRELOAD_LIBRARIES.items():
                if any(name == f or name.startswith(f + ".") for f in filenames):
                    return allocator, Path(path)
    return "glibc", None


def reexec_command(requested: str, environ: Mapping[str, str], argv: Sequence[str], executable: str,
                   dirs: Sequence[Path] | None = None,
                   maps: str | os.PathLike = "/proc/self/maps") -> tuple[str, list[str], dict[str, str]] | None:
    """(executable, argv, environment) that re-runs this command with the requested caching allocator
    preloaded, or None where nothing is to do: already re-executed (:data:`REEXEC_MARK`), not Linux, glibc
    asked for, no library installed, or the library already runs. ``$SPML_ALLOCATOR`` wins over ``requested``."""
    if environ.get(REEXEC_MARK) or platform.system() != "Linux":
        return None
    found = find_allocator(chosen_allocator(requested, environ), dirs)
    if found is None or running_allocator(maps)[0] != "glibc":
        return None
    name, library = found
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library), environ.get("LD_PRELOAD", "").strip()]))
    conf_key, conf_value = ALLOCATOR_CONF[name]
    env.setdefault(conf_key, conf_value)
    env[REEXEC_MARK] = name
    return executable, [executable, *argv], env


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def requested_allocator(args: Sequence[str]) -> str | None:
    """The allocator an ``spml`` command line asks for, before anything heavy is imported: None for a command
    that does not train (:data:`PRELOAD_COMMANDS`); for ``bench --host-allocator`` its choice; else params
    ``runtime.host_allocator`` of the ``--params`` file (default ./params.yaml), or auto when that cannot be
    read (the command itself then reports the problem)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in PRELOAD_COMMANDS:
        return None
    chosen = _option(args, "--host-allocator") if command == "bench" else None
    if chosen is not None:  # an unknown value: the command reports it
        return chosen if chosen in ALLOCATORS else None
    try:
        import yaml

        params = yaml.safe_load(Path(_option(args, "--params") or "params.yaml").read_text()) or {}
        value = params["runtime"]["host_allocator"]
    except Exception:  # noqa: BLE001 - any unreadable params: no preference here; the command reports it
        return "auto"
    return value if value in ALLOCATORS else "auto"


_announce = False  # set by preload_allocator: a command started by the spml entry point prints host_memory's notice


def announcing() -> bool:
    """True in a process started by the ``spml`` entry point (not in-process callers such as the tests)."""
    return _announce


def preload_allocator(args: Sequence[str] | None = None) -> None:
    """Re-execute this process with a caching allocator preloaded, if its command line asks for one and
    one is installed (:func:`reexec_command`); otherwise return and let :func:`host_memory` fall back.

    Call it first thing in the CLI's entry point, before torch is imported (the re-exec then costs one
    interpreter start, ~0.2 s). ``sys.orig_argv`` keeps ``-m pipeline.cli`` and interpreter flags."""
    global _announce
    args = list(sys.argv[1:] if args is None else args)
    requested = requested_allocator(args)
    if requested is None:
        return
    _announce = True
    with contextlib.suppress(SpmlError):  # a bad $SPML_ALLOCATOR: no re-exec; setup_process reports it
        command = reexec_command(requested, os.environ, getattr(sys, "orig_argv", sys.argv)[1:], sys.executable)
        if command is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(*command)


def chosen_allocator(configured: str, environ: Mapping[str, str] | None = None) -> str:
    """The allocator asked for: ``$SPML_ALLOCATOR``, else params ``runtime.host_allocator`` (the same order as
    :func:`torch_threads`: one invocation's environment over the experiment's setting)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ALLOCATOR_ENV, "").strip() or configured
    if value not in ALLOCATORS:
        source = f"environment variable {ALLOCATOR_ENV}" if environ.get(ALLOCATOR_ENV, "").strip() \
            else "params runtime.host_allocator"
        raise SpmlError(f"{source} {value!r} must be one of {', '.join(ALLOCATORS)}")
    return value


@dataclass(frozen=True)
class HostMemory:
    """What serves this process's host memory (:func:`host_memory`)."""

    allocator: str  # jemalloc | tcmalloc | glibc
    label: str  # the bench header's name: jemalloc, tcmalloc, cache (glibc + cache_host_memory) or system
    notice: str  # one line for stderr


def host_memory(configured: str, glibc_cache: bool, environ: Mapping[str, str] | None = None,
                maps: str | os.PathLike = "/proc/self/maps") -> HostMemory:
    """Which malloc serves this process; where no caching allocator runs, apply the glibc fallback
    (:func:`cache_host_memory`, when ``glibc_cache``). ``configured``: params ``runtime.host_allocator``
    (``$SPML_ALLOCATOR`` wins). Idempotent; the notice says why a wanted library is not running."""
    requested = chosen_allocator(configured, environ)
    name, library = running_allocator(maps)
    if name != "glibc":
        note = "" if requested in ("auto", name) else f"; {requested} was asked for, but {name} was preloaded"
        return HostMemory(name, name, f"host memory: {name} ({library}{note})")
    mode = "cache" if glibc_cache and cache_host_memory() else "system"
    why = ""
    if requested != "glibc":
        found = find_allocator(requested)
        if found is None:
            want = "jemalloc or tcmalloc" if requested == "auto" else requested
            why = f"; no {want} installed ({INSTALL_HINT} for fewer page faults)"
        else:
            why = f"; {found[1]} is installed but was not preloaded (the spml command preloads it)"
    return HostMemory("glibc", mode, f"host memory: glibc malloc, {mode}{why}")


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
    """How many intra-op threads torch gets: $SPML_THREADS, else params ``runtime.threads``, else all usable CPUs.

    Why this order: ``runtime.threads`` is this machine's setting (tracked by no cell), while running N
    cells side by side (``SPML_THREADS=1 dvc exp run -j 2``) is a property of one invocation, which only
    the launcher knows; each process cannot tell how many siblings it has. Auto takes every usable CPU,
    the fastest choice for one run at a time; side by side, the launcher should give each a share
    (usable CPUs / N), or OpenMP's spinning threads oversubscribe the cores (``spml bench parallel N``).
    """
    environ = os.environ if environ is None else environ
    text = environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise SpmlError(f"environment variable {THREADS_ENV}={text!r} must be a positive integer; "
                            "unset it for the automatic choice")
        return int(text)
    return configured if configured is not None else usable_cpus()
