"""Is the committed ``dvc.lock`` fresh? (``spml check-lock``)

``dvc.lock`` pins, per stage, the command, the params values and the hashes of the dependencies that
produced the stage's outputs. It is *stale* when someone changed a stage's command, one of its params or
one of its source files (code under ``pipeline/``, ``stages/``, ...) without rerunning ``dvc repro`` and
committing the new lock: then the committed ``reports/`` no longer describe the committed code.

``dvc status`` alone cannot tell this in a fresh clone: without the DVC cache every output is missing
(``not in cache`` / ``deleted``), and so is every dependency that is another stage's output
(``data/prepared/...``, ``runs``). Missing data is not staleness. This check keeps only

* ``changed command``;
* changed params (any key of any params file, or a params file that is new or gone);
* changed *source* dependencies: a dependency that no stage of the pipeline produces, with any status
  (``modified``, ``deleted``, ``new``);
* stages of ``dvc.yaml`` (after ``foreach``/``matrix`` expansion over params.yaml) that have no entry in
  ``dvc.lock`` at all, e.g. a method added to the grid without rerunning.

Changed outputs and changed *data* dependencies (paths that are, contain or lie inside another stage's
output) are ignored, so the check gives the same answer with or without data in the workspace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from pipeline.errors import SpmlError

# `dvc status` entries that are not staleness of the lock: they say nothing about code or params.
_IGNORED_ENTRIES = {"always changed"}


@dataclass(frozen=True)
class Stale:
    """One reason why a stage's entry in dvc.lock does not match the committed code and params."""

    stage: str
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.reason}"


def _norm(path: str) -> PurePosixPath:
    return PurePosixPath(path.replace(os.sep, "/").rstrip("/"))


def _overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def classify(status: dict, out_paths: list[str], stages: list[str], locked: set[str]) -> list[Stale]:
    """The staleness found in a ``dvc status --json`` dict.

    ``out_paths`` are every output of the pipeline (relative to the repository root), ``stages`` every
    stage name of dvc.yaml and ``locked`` the stage names that dvc.lock has an entry for.
    """
    outs = [_norm(p) for p in out_paths]
    problems = [Stale(name, "not in dvc.lock (never run)") for name in stages if name not in locked]
    missing = {p.stage for p in problems}
    for stage, entries in status.items():
        if stage in missing:
            continue
        for entry in entries:
            if isinstance(entry, str):
                if entry not in _IGNORED_ENTRIES:
                    problems.append(Stale(stage, entry))
                continue
            for dep, state in entry.get("changed deps", {}).items():
                if isinstance(state, dict):  # a params file: {key: "modified" | "new" | "deleted"}
                    problems.extend(Stale(stage, f"param {key!r} in {dep} {change}")
                                    for key, change in state.items())
                elif not any(_overlaps(_norm(dep), out) for out in outs):
                    problems.append(Stale(stage, f"dependency {dep} {state}"))
            # "changed outs" are ignored on purpose: missing outputs are missing data, not a stale lock.
    return problems


def _locked_stages(root: Path) -> set[str]:
    lock = root / "dvc.lock"
    if not lock.exists():
        return set()
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpmlError(f"{lock} is not valid YAML ({exc.__class__.__name__}); "
                        "regenerate it with `dvc repro`") from None
    return set((data.get("stages") or {}).keys())


def check(root: Path | str = ".") -> list[Stale]:
    """Compare dvc.yaml + params + source files under ``root`` with its dvc.lock; [] when fresh."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    if not (root / "dvc.yaml").exists():
        raise SpmlError(f"no dvc.yaml in {root}; run `spml check-lock` from the repository root")
    try:
        with Repo(os.fspath(root)) as repo:
            stages = [stage.addressing for stage in repo.index.stages if stage.cmd]
            out_paths = [os.path.relpath(out.fs_path, repo.root_dir) for out in repo.index.outs]
            status = repo.status()
    except DvcException as exc:
        raise SpmlError(f"dvc could not read the pipeline in {root}: {exc}") from None
    return classify(status, out_paths, stages, _locked_stages(root))
