"""Stage ``train``: one (dataset, method, seed) run into ``runs/<dataset>/<method>/<seed>/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import load_params
from pipeline.datasets import get_dataset
from pipeline.io import atomic_dir
from pipeline.train import fit, resolve_run_config


def run(dataset: str, method: str, seed: int, params_path: Path = Path("params.yaml"),
        out_dir: Path | None = None) -> dict[str, Any]:
    get_dataset(dataset)
    run_cfg = resolve_run_config(load_params(params_path), dataset, method, seed)
    target = out_dir or paths.run_dir(dataset, method, seed)
    with atomic_dir(target) as tmp:
        return fit(run_cfg, tmp)
