"""Stage ``train``: one (dataset, method, seed) run into ``runs/<dataset>/<method>/<seed>/``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline import paths, runtime
from pipeline.config import load_params
from pipeline.datasets import get_dataset
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
    run_cfg = resolve_run_config(load_params(params_path), dataset, method, seed)
    if weights is not None:
        run_cfg.model_kwargs["weights"] = weights
    target = out_dir or paths.run_dir(dataset, method, seed)
    resume_dir = resume_dir_for(dataset, method, seed, out_dir)
    if not resume:
        runtime.clear_resume(resume_dir)
    dist = runtime.init_distributed(run_cfg.train.device)
    try:
        if not dist.is_main:
            with tempfile.TemporaryDirectory() as tmp:
                return fit(run_cfg, Path(tmp), resume_dir, dist)
        with atomic_dir(target) as tmp:
            return fit(run_cfg, tmp, resume_dir, dist)
    finally:
        if dist.enabled:
            import torch.distributed

            torch.distributed.destroy_process_group()
