"""Resume checkpoints: a run killed after an epoch continues from there and ends exactly as an unbroken one.

After every epoch, ``runs/.resume/<dataset>/<method>/<seed>/last.pt`` (outside the DVC outputs, which DVC
deletes before rerunning a stage; ignored via .dvcignore) holds the model, optimizer, scheduler, grad
scaler, method state, weight EMA, RNG states, loader generator, history and the best epoch so far; the
best-so-far weights sit next to it in ``best-e<epoch>.pt``. :class:`Checkpoint` is that state: it holds
the live objects and saves or restores them in place.

Every file of the folder is keyed by everything the run depends on (:func:`run_fingerprint`): the resolved
config, the SHA-256 of the input tables and a hash of the code, stored inside each file. A resume validates
every file it reads; when one is unreadable, written for another run, or missing (a save cut short by a
full disk or a kill), the whole set is discarded with a notice on stderr and the run starts from scratch.
A run only ever trusts a best file it wrote or validated itself: a leftover of another run with the same
name is overwritten, never taken as this run's best. The directory is removed when the run completes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import paths
from pipeline.runtime.distributed import env_rank
from pipeline.runtime.optim import WeightEMA

# 3: the best file carries the fingerprint too; 2: fingerprint = {config, inputs, code}; 1: a hash of the config
RESUME_FORMAT = 3
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/: the code a checkpoint is keyed by


def resume_dir(dataset: str, method: str, seed: int) -> Path:
    return paths.RUNS / ".resume" / dataset / method / str(seed)


# --------------------------------------------------------------------------------------------------
# fingerprint: what a checkpoint must match to be resumed


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


# --------------------------------------------------------------------------------------------------
# the checkpoint object


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


SAVE_MARGIN = 16 << 10  # bytes a torch.save file holds beyond its arrays: pickled structure, zip entries


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in ``obj``: about what saving it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_file(obj: Any, path: Path, shown: Path | None = None) -> None:
    """torch.save ``obj`` to ``path`` with the space it needs reserved first: torch's zip writer reports a full
    disk as "unexpected pos 64 vs 0" (a RuntimeError without errno), so the reservation's ENOSPC is what
    tells the user. ``shown``: the path named in errors (the destination of a temporary)."""
    from pipeline.io import disk_full_error, reserve

    needed = _nbytes(obj) + SAVE_MARGIN
    path.touch()
    reserve(path, needed)
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        raise disk_full_error(shown or path, needed) from None  # the space reserved was taken meanwhile


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save into ``path`` atomically; a full disk is one SpmlError naming the file and the bytes needed."""
    from pipeline.io import atomic_file

    with atomic_file(path, needed=_nbytes(obj) + SAVE_MARGIN) as tmp:
        save_file(obj, tmp, path)


def _read(path: Path, weights_only: bool) -> tuple[Any, str | None]:
    """(what ``path`` holds, None) or (None, why it cannot be read): a truncated or garbage file is a reason
    to discard the checkpoints, not a traceback."""
    try:  # the RNG states in last.pt hold numpy arrays and Python tuples: not weights_only there
        return torch.load(path, map_location="cpu", weights_only=weights_only), None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file; all mean the same
        first = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else ""
        return None, f"{path.name} is unreadable ({type(exc).__name__}{': ' + first if first else ''})"


class Stateful(Protocol):
    """What the checkpoint needs of a training method (it knows none by name)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Best:
    """The best epoch so far by val mAP, with CPU copies of its weights and method state (None before one)."""

    val_map: float = -math.inf
    epoch: int = 0
    model: dict[str, torch.Tensor] | None = None
    method: dict[str, Any] | None = None


@dataclass(eq=False)  # holds live modules: two checkpoints are never "equal"
class Checkpoint:
    """A run's training state after ``epoch`` completed epochs: the live objects it trains (saved and
    restored in place) and the loop's own progress (history, best epoch, seconds trained so far)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Stateful
    loader_generator: torch.Generator  # the train loader's: it draws each epoch's worker base seed
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: WeightEMA | None = None
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    train_seconds: float = 0.0
    # the epoch whose best file this run wrote or validated; a best file it did not is never trusted
    best_saved: int | None = field(default=None, repr=False)

    def save(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        """Write ``best-e<best epoch>.pt`` (if this run has not yet) then ``last.pt``; both atomic, both keyed
        by ``fingerprint``; stale best files removed.

        The best weights live in their own file, rewritten only when the best epoch changes, so an epoch
        that is not a new best writes one model's worth of bytes, not two. A best file already there that
        this run did not write (a leftover of a discarded run) is overwritten: its name says nothing of
        whose weights it holds."""
        directory.mkdir(parents=True, exist_ok=True)
        best_path = directory / f"best-e{self.best.epoch}.pt"
        if self.best_saved != self.best.epoch:
            _atomic_save({"format": RESUME_FORMAT, "fingerprint": fingerprint, "epoch": self.best.epoch,
                          "model": self.best.model, "method": self.best.method}, best_path)
            self.best_saved = self.best.epoch
        _atomic_save({
            "format": RESUME_FORMAT, "fingerprint": fingerprint, "epoch": self.epoch, "history": self.history,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method": self.method.state_dict(), "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "rng": rng_state(), "loader_generator": self.loader_generator.get_state(),
            "best_epoch": self.best.epoch, "best_val_map": self.best.val_map, "train_seconds": self.train_seconds,
        }, directory / "last.pt")
        for stale in directory.glob("best-e*.pt"):
            if stale != best_path:
                stale.unlink(missing_ok=True)

    def load(self, directory: Path, fingerprint: dict[str, Any]) -> bool:
        """Restore the state saved in ``directory``, in place; False (nothing changed) if there is none.

        Every file read is validated: readable, of this format, keyed by ``fingerprint`` (config, input
        tables, code; :func:`run_fingerprint`), the best file of the epoch ``last.pt`` names. When one is
        not, the whole set is deleted (:func:`clear_resume`) and said on stderr: a later save can then
        never pair this run's ``last.pt`` with another run's best weights."""
        directory = Path(directory)
        last = directory / "last.pt"
        if not last.exists():
            if any(_is_resume_file(p.name) for p in directory.iterdir()) if directory.is_dir() else False:
                _discard(directory, f"{directory} holds checkpoint files without last.pt (a save cut short by a "
                                    "full disk or a kill)")
            return False
        state, problem = _read(last, weights_only=False)
        if problem is None:
            if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
                changed = ["the checkpoint format"]
            else:
                changed = _changes(state.get("fingerprint"), fingerprint)
            if changed:
                problem = f"{' and '.join(changed)} changed since it was written"
        best = None
        if problem is None:
            best_path = directory / f"best-e{state['best_epoch']}.pt"
            if not best_path.exists():
                problem = f"it points to a missing {best_path.name}"
            else:
                best, problem = _read(best_path, weights_only=True)
                if problem is None and not (isinstance(best, dict) and best.get("format") == RESUME_FORMAT
                                            and best.get("fingerprint") == state["fingerprint"]
                                            and best.get("epoch") == state["best_epoch"]):
                    problem = f"{best_path.name} was written by another run"
        if problem is not None:
            _discard(directory, f"the resume checkpoint {last}: {problem}")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.epoch, self.history, self.train_seconds = state["epoch"], state["history"], state["train_seconds"]
        self.best = Best(state["best_val_map"], state["best_epoch"], best["model"], best["method"])
        self.best_saved = state["best_epoch"]
        set_rng_state(state["rng"])
        self.loader_generator.set_state(state["loader_generator"])
        return True


def _discard(directory: Path, what: str) -> None:
    """Say why the checkpoints in ``directory`` cannot be resumed, then delete them all (our files only)."""
    notice(f"discarding {what}; training from scratch")
    if env_rank() == 0:  # under torchrun every rank reads the folder; one deletes it
        clear_resume(directory)


# --------------------------------------------------------------------------------------------------
# the resume folder


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
