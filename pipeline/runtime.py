"""The GPU/long-run side of training: mixed precision, LR schedule, DDP, seeded sampling, resume.

Kept out of :mod:`pipeline.train` so the loop stays short; nothing here knows a method or a model.

* **Seeded sampling** (:class:`EpochSampler`): the order of epoch ``e`` and the augmentation seed of every
  sample are functions of (run seed, e) only. The dataset augments each sample under its own seed, so
  results do not depend on the number of loader workers (persistent or not), on which worker draws a
  sample, or on being resumed, and DDP ranks shard one shared permutation.
* **DDP** (``torchrun --nproc_per_node N -m pipeline.cli train ...``): the global batch is
  ``train.batch_size`` split over the ranks; evaluation shards the eval set, gathers every prediction and
  computes mAP once (identically on every rank); only rank 0 writes outputs.
* **Resume**: after every epoch, ``runs/.resume/<dataset>/<method>/<seed>/last.pt`` (outside the DVC
  outputs, which DVC deletes before rerunning a stage; ignored via .dvcignore) holds the model,
  optimizer, scheduler, grad scaler, method state, RNG states, history and the best epoch so far; the
  best-so-far weights sit next to it in ``best-e<epoch>.pt``. The checkpoint is keyed by everything the run
  depends on (:func:`run_fingerprint`): the resolved config, the SHA-256 of the input tables and a hash of
  the code; when any of it changed, the checkpoint is discarded with a notice on stderr and the run starts
  from scratch. The directory is removed when the run completes.
* **Host memory** (:func:`cache_host_memory`): glibc's malloc is told to keep freed memory for reuse, as
  the CUDA caching allocator does on the GPU, instead of handing it back to the kernel after every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline import paths
from pipeline.errors import SpmlError

RESUME_FORMAT = 2  # 2: fingerprint = {config, inputs, code} (1: a hash of the config only)
PACKAGE_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def env_rank() -> int:
    """This process's rank under torchrun (0 without it), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local)


def broadcast_buffers(ctx: DistContext, model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics diverge after the last local
    forward), so all ranks evaluate exactly the model rank 0 saves."""
    if ctx.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank; identity without DDP."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_arrays(ctx: DistContext, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all ranks (rank order); identity without DDP."""
    if not ctx.enabled:
        return arrays
    parts: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


# --------------------------------------------------------------------------------------------------
# seeded sampling


class EpochSampler(Sampler):
    """Yields ``(row, sample_seed)``; a fresh permutation and fresh per-sample seeds every epoch.

    With ``world_size`` > 1 the permutation is padded (by wrapping, like DistributedSampler) to a
    multiple of the world size and rank r takes positions r, r + W, ... Without ``shuffle`` the rows
    come in order (evaluation) and each rank takes a contiguous-stride shard without padding.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        if self.shuffle and self.world_size > 1:
            total = -(-self.n // self.world_size) * self.world_size
            order = torch.cat([order, order[: total - self.n]]) if total > self.n else order
        return order[self.rank::self.world_size], seeds

    def __iter__(self):
        order, seeds = self._order()
        for i in order.tolist():
            yield i, int(seeds[i])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.shuffle:
            return (self.n + self.world_size - 1) // self.world_size
        return len(range(self.rank, self.n, self.world_size))


# --------------------------------------------------------------------------------------------------
# mixed precision and schedule


def amp_dtype(enabled: bool, dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CPU only an explicit ``bf16`` autocasts (to measure its effect
    where there is no GPU; ``auto``, e.g. a GPU preset run on a CPU machine, stays fp32)."""
    if not enabled:
        return None
    if device.type != "cuda":
        return torch.bfloat16 if dtype == "bf16" and device.type == "cpu" else None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scheduler(kind: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    pct_start: float):
    """``none`` or ``onecycle`` (per-iteration OneCycleLR, max_lr = each group's lr, torch defaults)."""
    if kind == "none":
        return None
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=max(steps_per_epoch, 1), pct_start=pct_start)


# --------------------------------------------------------------------------------------------------
# host memory

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


# --------------------------------------------------------------------------------------------------
# CPU threads

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


def torch_threads(configured: int | None, environ: dict[str, str] | None = None) -> int:
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


# --------------------------------------------------------------------------------------------------
# resume checkpoints


def resume_dir(dataset: str, method: str, seed: int) -> Path:
    return paths.RUNS / ".resume" / dataset / method / str(seed)


def config_fingerprint(config: dict[str, Any], world_size: int) -> str:
    text = json.dumps({"config": config, "world_size": world_size, "format": RESUME_FORMAT}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the ``pipeline`` package's source files (names and bytes), i.e. the training code."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(f"{path.relative_to(PACKAGE_DIR).as_posix()}\n".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(config: dict[str, Any], world_size: int, inputs: list[Path]) -> dict[str, Any]:
    """What a resume checkpoint must match: the config (and world size), each input file's SHA-256, the code."""
    from pipeline.io import sha256_file

    return {"config": config_fingerprint(config, world_size),
            "inputs": {str(path): sha256_file(path) for path in inputs},
            "code": code_fingerprint()}


def _changes(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and the current one, in words."""
    if not isinstance(saved, dict) or set(saved) != set(current):
        return ["the checkpoint format"]
    changed = []
    if saved["config"] != current["config"]:
        changed.append("the run config")
    if saved["inputs"] != current["inputs"]:
        names = sorted(k for k in set(saved["inputs"]) | set(current["inputs"])
                       if saved["inputs"].get(k) != current["inputs"].get(k))
        changed.append(f"the input tables ({', '.join(names)})")
    if saved["code"] != current["code"]:
        changed.append("the code (pipeline/)")
    return changed


def notice(message: str) -> None:
    """One line on stderr (rank 0 only under torchrun) for something the user should know but need not fix."""
    if env_rank() == 0:
        print(f"notice: {message}", file=sys.stderr, flush=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    from pipeline.io import atomic_file

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def save_resume(directory: Path, state: dict[str, Any], best_model: dict | None, best_epoch: int) -> None:
    """Write ``best-e<best_epoch>.pt`` (if new) then ``last.pt``; both atomic; stale best files removed."""
    directory.mkdir(parents=True, exist_ok=True)
    best_path = directory / f"best-e{best_epoch}.pt"
    if best_model is not None and not best_path.exists():
        _atomic_save(best_model, best_path)
    _atomic_save({**state, "best_epoch": best_epoch, "format": RESUME_FORMAT}, directory / "last.pt")
    for stale in directory.glob("best-e*.pt"):
        if stale != best_path:
            stale.unlink(missing_ok=True)


def load_resume(directory: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], dict | None] | None:
    """The saved state and best-so-far weights, or None if absent or written for another run (config,
    input tables or code; :func:`run_fingerprint`), which is then said on stderr."""
    last = directory / "last.pt"
    if not last.exists():
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise SpmlError(f"resume checkpoint {last} is unreadable ({type(exc).__name__}); delete {directory} "
                        "or pass --no-resume") from None
    changed = _changes(state.get("fingerprint"), fingerprint) if state.get("format") == RESUME_FORMAT else [
        "the checkpoint format"]
    if changed:
        notice(f"discarding the resume checkpoint {last}: {' and '.join(changed)} changed since it was written; "
               "training from scratch")
        return None
    best_path = directory / f"best-e{state['best_epoch']}.pt"
    best = torch.load(best_path, map_location="cpu", weights_only=True) if best_path.exists() else None
    if state["best_epoch"] > 0 and best is None:
        raise SpmlError(f"resume checkpoint {last} points to a missing {best_path.name}; delete {directory} "
                        "or pass --no-resume")
    return state, best


def _is_resume_file(name: str) -> bool:
    """last.pt, best-e<N>.pt, or an atomic temporary of one of them (pipeline.io)."""
    from pipeline.io import TMP_MARK

    if name.startswith(".") and TMP_MARK in name:
        name = name[1:name.index(TMP_MARK)]
    return name == "last.pt" or (name.startswith("best-e") and name.endswith(".pt") and name[6:-3].isdigit())


def foreign_resume_files(directory: Path) -> list[str]:
    """Names in ``directory`` that are not resume checkpoints (sorted); [] if it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir() if not (entry.is_file() and _is_resume_file(entry.name)))


def clear_resume(directory: Path) -> None:
    """Remove a run's resume checkpoints, then the folders they leave empty (up to ``.resume``).

    Only our own files are deleted: a folder that also holds anything else is left with it."""
    directory = Path(directory)
    if directory.is_dir() and not directory.is_symlink():
        for entry in directory.iterdir():
            if entry.is_file() and _is_resume_file(entry.name):
                entry.unlink(missing_ok=True)
    for folder in (directory, *directory.parents):
        if folder.name == "" or folder.is_symlink() or not folder.is_dir():
            break
        try:
            folder.rmdir()  # only succeeds while empty
        except OSError:
            break
        if folder.name == ".resume":
            break


# --------------------------------------------------------------------------------------------------
# weight EMA


class WeightEMA:
    """An exponential moving average of a model's weights *and* buffers, updated after every optimizer
    step (Xie et al.'s ModelEma, decay 0.9997): float entries move by ``decay``, integer ones (BatchNorm's
    counters) are copied. ``model`` is a frozen copy in eval mode that evaluation can use as a model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        if not 0.0 < decay < 1.0:
            raise SpmlError(f"params train.weight_ema must be in (0, 1) or null, got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_value, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

