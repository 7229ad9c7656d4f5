"""Stage ``train``: one (dataset, method, seed) run into ``runs/<dataset>/<method>/<seed>/``.

The output folder is replaced as a whole, so it must be ours: absent, empty, or a run folder (only the
files below, with our ``config.json``). Anything else (a user's folder, a file, the project or one of its
ancestors) is refused before training starts; nothing of the user's is ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from pipeline import paths
from pipeline.config import load_params
from pipeline.datasets import get_dataset
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir
from pipeline.runtime import checkpoint, distributed
from pipeline.run_config import (RunConfig, apply_timeline, resolve_run_config, search_config, stage1_config,
                                 training_rows)
from pipeline.train import RUN_FILES, fit
from pipeline.unread import committed_params, warn_unread

# config.json of a run holds these keys (pipeline.run_config.RunConfig); together with "only run files"
# this is what marks a folder as ours
RUN_CONFIG_KEYS = {"dataset", "method", "seed", "run_seed", "train", "model_kwargs", "method_params"}


def resume_dir_for(dataset: str, method: str, seed: int, out_dir: Path | None) -> Path:
    """runs/.resume/<dataset>/<method>/<seed> (outside DVC's outputs), or <out>/../.resume/<name> for --out."""
    if out_dir is None:
        return checkpoint.resume_dir(dataset, method, seed)
    out_dir = Path(os.path.abspath(out_dir))  # `--out .` or `--out x/..` have no usable name otherwise
    return out_dir.parent / ".resume" / out_dir.name


def is_run_folder(folder: Path) -> bool:
    """True if ``folder`` holds only run files and its config.json is a run config."""
    names = {entry.name for entry in folder.iterdir()}
    if not names <= set(RUN_FILES) or "config.json" not in names:
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and RUN_CONFIG_KEYS <= set(config)


def check_out_dir(out_dir: Path, params_path: Path) -> None:
    """Refuse an output folder that replacing would lose user files (see the module docstring)."""
    where = Path(os.path.abspath(out_dir))
    real = where.resolve()
    for protected, what in ((Path.cwd().resolve(), "the current folder"),
                            (Path(params_path).resolve().parent, f"the project folder of {params_path}")):
        if real == protected or real in protected.parents:
            raise SpmlError(f"output folder {out_dir} is {what} or one of its ancestors; pass a new or empty "
                            "folder, e.g. --out runs/try")
    for parent in where.parents:  # `--out somefile/sub`: say so now, not after training
        if parent.exists():
            if not parent.is_dir():
                raise SpmlError(f"cannot write {out_dir}: {parent} is a file, not a folder; choose another place")
            break
    if where.is_symlink():
        raise SpmlError(f"output folder {out_dir} is a symlink; pass the folder itself (a new or empty one)")
    if where.exists() and not where.is_dir():
        raise SpmlError(f"output folder {out_dir} is an existing file; pass a new or empty folder")
    if where.is_dir() and any(where.iterdir()) and not is_run_folder(where):
        names = sorted(entry.name for entry in where.iterdir())
        foreign = [n for n in names if n not in RUN_FILES] or [f"{n} (not our config)" for n in names
                                                               if n == "config.json"] or names
        raise SpmlError(f"output folder {out_dir} holds files that are not a run's ({', '.join(foreign[:3])}); "
                        f"a run folder holds only {', '.join(RUN_FILES)}: pass a new or empty folder, or move "
                        "them away")


def check_resume_dir(resume_dir: Path) -> None:
    """The resume folder may only hold our checkpoints: it is rewritten every epoch and removed at the end."""
    if resume_dir.is_symlink() or (resume_dir.exists() and not resume_dir.is_dir()):
        raise SpmlError(f"resume folder {resume_dir} exists and is not a folder; move it away or pass another --out")
    for parent in resume_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpmlError(f"cannot keep the resume checkpoint in {resume_dir}: {parent} is a file; "
                                "move it away or pass another --out")
            break
    foreign = checkpoint.foreign_resume_files(resume_dir)
    if foreign:
        raise SpmlError(f"resume folder {resume_dir} holds files that are not resume checkpoints "
                        f"({', '.join(foreign[:3])}); move them away or pass another --out")


SEARCH_KEYS = ("val_map", "test_map", "best_epoch", "epochs_run")


def best_point(results: list[dict[str, Any]]) -> int:
    """The selected point of a search: the best val mAP, the first one on a tie (Cole et al. keep a later run only
    if its val mAP is strictly higher)."""
    best = 0
    for i, result in enumerate(results):
        if result["val_map"] > results[best]["val_map"]:
            best = i
    return best


def run_search(run_cfg: RunConfig, target: Path, resume_dir: Path, resume: bool,
               dist: distributed.DistContext) -> dict[str, Any]:
    """A protocol that is a search, in one cell: every point trained as a full run, the one with the best val mAP
    kept as the cell's run; its metrics.json lists every point (``search``) and which was selected.

    Finished points wait in ``<resume>.search/<i>/`` (ours, removed at the end), so an interrupted search resumes
    at the point it was in; a point whose config changed is trained again."""
    folder = resume_dir.with_name(f"{resume_dir.name}.search")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SpmlError(f"search folder {folder} exists and is not a folder; move it away or pass another --out")
    if folder.is_dir():
        foreign = [e.name for e in folder.iterdir() if not (e.name.isdigit() and e.is_dir() and is_run_folder(e))]
        if foreign:
            raise SpmlError(f"search folder {folder} holds files that are not finished search points "
                            f"({', '.join(sorted(foreign)[:3])}); move them away or pass another --out")
        if not resume:
            shutil.rmtree(folder)
    results: list[dict[str, Any]] = []
    rows = training_rows(run_cfg.dataset)
    with contextlib.ExitStack() as stack:
        for i, point in enumerate(run_cfg.search):
            cfg = apply_timeline(search_config(run_cfg, point), rows)
            done = folder / str(i)
            if done.is_dir() and json.loads((done / "config.json").read_text()) == cfg.to_dict() \
                    and (done / "metrics.json").is_file():
                metrics = json.loads((done / "metrics.json").read_text())
            else:
                point_resume = resume_dir.with_name(f"{resume_dir.name}.search{i}")
                check_resume_dir(point_resume)
                if not resume:
                    checkpoint.clear_resume(point_resume)
                with contextlib.ExitStack() as out_stack:
                    out = out_stack.enter_context(atomic_dir(done)) if dist.is_main \
                        else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                    metrics = fit(cfg, out, point_resume, dist)
            results.append({**point, **{k: metrics[k] for k in SEARCH_KEYS}})
        best = best_point(results)
        if dist.is_main:
            with atomic_dir(target) as out:
                for name in RUN_FILES:
                    if (folder / str(best) / name).is_file():
                        shutil.copy2(folder / str(best) / name, out / name)
                metrics = json.loads((out / "metrics.json").read_text())
                metrics.update(search=results, search_selected=best)
                (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            shutil.rmtree(folder)
        else:
            metrics = {**results[best], "search": results, "search_selected": best}
    return metrics


def run(dataset: str, method: str, seed: int, params_path: Path = Path("params.yaml"),
        out_dir: Path | None = None, resume: bool = True, weights: str | None = None) -> dict[str, Any]:
    """Train into ``out_dir`` (atomic). ``resume``: continue from the last epoch checkpoint of an
    interrupted run with the same config. ``weights``: overrides ``models.<model>.weights``.
    Under torchrun every rank trains; only rank 0 writes the run directory."""
    get_dataset(dataset)
    params = load_params(params_path)
    run_cfg = resolve_run_config(params, dataset, method, seed)
    base = committed_params(params_path)  # outside git there is nothing to tell a change from the file's own values
    if base is not None and distributed.env_rank() == 0:  # values this grid never reads (a preset's, an edit's)
        warn_unread(params, lambda line: print(line, file=sys.stderr), base, ablations=False)
    if weights is not None:
        run_cfg.model_kwargs["weights"] = weights
    target = out_dir or paths.run_dir(dataset, method, seed)
    check_out_dir(target, params_path)
    resume_dir = resume_dir_for(dataset, method, seed, out_dir)
    check_resume_dir(resume_dir)
    if not resume:
        checkpoint.clear_resume(resume_dir)
    # the schedules mapped once, before stage 1 of a two-stage run takes its own params from them (a search maps
    # each point's: its batch size sets its steps)
    if not run_cfg.search:
        run_cfg = apply_timeline(run_cfg, training_rows(dataset))
    dist = distributed.init_distributed(run_cfg.runtime.device)
    try:
        if run_cfg.search:  # the protocol is a search (Cole et al.): every point, the best by val mAP kept
            return run_search(run_cfg, target, resume_dir, resume, dist)
        with contextlib.ExitStack() as stack:
            init_model, stage1 = None, None
            if run_cfg.train.two_stage:  # a two-stage protocol: stage 1 first, in this cell
                stage1_cfg = stage1_config(run_cfg)
                stage1_resume = resume_dir.with_name(f"{resume_dir.name}.stage1")  # its own checkpoints
                check_resume_dir(stage1_resume)
                if not resume:
                    checkpoint.clear_resume(stage1_resume)
                stage1_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                stage1 = fit(stage1_cfg, stage1_dir, stage1_resume, dist)
                init_model = torch.load(stage1_dir / "best.pt", map_location="cpu", weights_only=True)["model"] \
                    if dist.is_main else None
                init_model = distributed.broadcast_object(dist, init_model)
            out = Path(stack.enter_context(tempfile.TemporaryDirectory())) if not dist.is_main \
                else stack.enter_context(atomic_dir(target))
            metrics = fit(run_cfg, out, resume_dir, dist, init_model=init_model, stage1=stage1)
        return metrics
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()
