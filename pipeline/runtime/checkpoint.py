"""Resume checkpoints: a run killed after an epoch continues from there and ends exactly as an unbroken one.

After every epoch, ``runs/.resume/<dataset>/<method>/<seed>/last.pt`` (outside the DVC outputs, which DVC
deletes before rerunning a stage; ignored via .dvcignore) holds the model, optimizer, scheduler, grad
scaler, method state, weight EMA, RNG states, loader generator, history and the best epoch so far; the
best-so-far weights sit next to it in ``best-e<epoch>.pt``. :class:`Checkpoint` is that state: it holds
the live objects and saves or restores them in place.

The checkpoint is keyed by everything the run depends on (:func:`run_fingerprint`): the resolved config,
the SHA-256 of the input tables and a hash of the code; when any of it changed, the checkpoint is
discarded with a notice on stderr and the run starts from scratch. The directory is removed when the run
completes.
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
from pipeline.errors import SpmlError
from pipeline.runtime.distributed import env_rank
from pipeline.runtime.optim import WeightEMA

RESUME_FORMAT = 2  # 2: fingerprint = {config, inputs, code} (1: a hash of the config only)
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


def _atomic_save(obj: Any, path: Path) -> None:
    from pipeline.io import atomic_file

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


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

    def save(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        """Write ``best-e<best epoch>.pt`` (if new) then ``last.pt``; both atomic; stale best files removed.

        The best weights live in their own file, rewritten only when the best epoch changes, so an epoch
        that is not a new best writes one model's worth of bytes, not two."""
        directory.mkdir(parents=True, exist_ok=True)
        best_path = directory / f"best-e{self.best.epoch}.pt"
        if not best_path.exists():
            _atomic_save({"model": self.best.model, "method": self.best.method}, best_path)
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
        """Restore the state saved in ``directory``, in place; False (nothing changed) if there is none or it
        was written for another run (config, input tables or code; :func:`run_fingerprint`), which is then
        said on stderr."""
        last = directory / "last.pt"
        if not last.exists():
            return False
        try:  # not weights_only: the RNG states hold numpy arrays and Python tuples
            state = torch.load(last, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise SpmlError(f"resume checkpoint {last} is unreadable ({type(exc).__name__}); delete {directory} "
                            "or pass --no-resume") from None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            changed = ["the checkpoint format"]
        else:
            changed = _changes(state.get("fingerprint"), fingerprint)
        if changed:
            notice(f"discarding the resume checkpoint {last}: {' and '.join(changed)} changed since it was written; "
                   "training from scratch")
            return False
        best_path = directory / f"best-e{state['best_epoch']}.pt"
        best = torch.load(best_path, map_location="cpu", weights_only=True) if best_path.exists() else None
        if state["best_epoch"] > 0 and best is None:
            raise SpmlError(f"resume checkpoint {last} points to a missing {best_path.name}; delete {directory} "
                            "or pass --no-resume")
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
        self.best = Best(state["best_val_map"], state["best_epoch"], best["model"] if best else None,
                         best["method"] if best else None)
        set_rng_state(state["rng"])
        self.loader_generator.set_state(state["loader_generator"])
        return True


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
