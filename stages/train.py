"""Stage ``train``: one (dataset, method, seed) run into ``runs/<dataset>/<method>/<seed>/``."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from pipeline import paths, runtime
from pipeline.config import load_params
from pipeline.datasets import get_dataset
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir
from pipeline.train import fit, resolve_run_config


def resume_dir_for(dataset: str, method: str, seed: int, out_dir: Path | None) -> Path:
    """runs/.resume/<dataset>/<method>/<seed> (outside DVC's outputs), or <out>/../.resume/<name> for --out."""
    if out_dir is None:
        return runtime.resume_dir(dataset, method, seed)
    return Path(out_dir).parent / ".resume" / Path(out_dir).name


def run(dataset: str, method: str, seed: int, params_path: Path = Path("params.yaml"),
        out_dir: Path | None = None, resume: bool = True, weights: str | None = None) -> dict[str, Any]:
    """Train into ``out_dir`` (atomic). ``resume``: continue from the last epoch checkpoint of an
    interrupted run with the same config. ``weights``: overrides ``models.<model>.weights``.
    Under torchrun every rank trains; only rank 0 writes the run directory."""
    get_dataset(dataset)
    params = load_params(params_path)
    run_cfg = resolve_run_config(params, dataset, method, seed)
    if weights is not None:
        run_cfg.model_kwargs["weights"] = weights
    target = out_dir or paths.run_dir(dataset, method, seed)
    resume_dir = resume_dir_for(dataset, method, seed, out_dir)
    if not resume:
        runtime.clear_resume(resume_dir)
    dist = runtime.init_distributed(run_cfg.train.device)
    try:
        with contextlib.ExitStack() as stack:
            init_model, stage1 = None, None
            if run_cfg.train.init_from is not None:  # a two-stage protocol: stage 1 first, in this cell
                stage1_cfg = resolve_run_config(params, dataset, run_cfg.train.init_from, seed)
                if weights is not None:
                    stage1_cfg.model_kwargs["weights"] = weights
                if stage1_cfg.train.init_from is not None:
                    raise SpmlError(f"train.init_from of {method!r} names {run_cfg.train.init_from!r}, which has an "
                                    "init_from itself; chain at most two stages")
                stage1_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                stage1 = fit(stage1_cfg, stage1_dir, resume_dir / "stage1", dist)
                init_model = torch.load(stage1_dir / "best.pt", map_location="cpu", weights_only=True)["model"] \
                    if dist.is_main else None
                init_model = runtime.broadcast_object(dist, init_model)
            out = Path(stack.enter_context(tempfile.TemporaryDirectory())) if not dist.is_main \
                else stack.enter_context(atomic_dir(target))
            metrics = fit(run_cfg, out, resume_dir, dist, init_model=init_model, stage1=stage1)
        return metrics
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()
