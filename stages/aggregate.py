"""Stage ``aggregate``: the runs table, the comparison tables (with AN/full, gap closed and Kendall tau against
the paper's Table 2, :mod:`pipeline.published`), the DVC metrics summary and the false-negative diagnostics
(table and figure) in ``reports/``."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.config import load_params
from pipeline.diagnostics_report import collect_histories, diagnostics_figure, diagnostics_markdown
from pipeline.errors import SpmlError
from pipeline.io import atomic_file, ensure_dir, write_json, write_text
from pipeline.report import collect_runs, results_markdown, summary_metrics


def grid(params: dict) -> tuple[list[str], list[str], list[int]]:
    """The trained grid: datasets, methods then ablations then the CLIP-based methods (dvc.yaml's `train`,
    `ablate` and `train-vl` cells), seeds."""
    datasets, methods, seeds = params.get("datasets"), params.get("methods"), params.get("seeds")
    for key, value, kind in (("datasets", datasets, str), ("methods", methods, str), ("seeds", seeds, int)):
        if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
            raise SpmlError(f"params {key} must be a non-empty list of {kind.__name__}, got {value!r}")
    trained = list(methods)
    for key in ("ablations", "vl_methods"):
        extra = params.get(key)
        if not isinstance(extra, list) or not all(isinstance(v, str) for v in extra):
            raise SpmlError(f"params {key} must be a list of method names (may be empty), got {extra!r}")
        trained += [m for m in extra if m not in trained]
    return datasets, trained, seeds


def cell_config_sha256(params: dict):
    """(dataset, method, seed) -> the SHA-256 of the run config params.yaml gives that cell (spml train's)."""
    from pipeline.config import config_sha256
    from pipeline.run_config import resolve_run_config

    return lambda dataset, method, seed: config_sha256(resolve_run_config(params, dataset, method, seed).to_dict())


def run(params_path: Path = Path("params.yaml"), out_dir: Path = paths.REPORTS) -> Path:
    params = load_params(params_path)
    datasets, methods, seeds = grid(params)
    runs = collect_runs(datasets, methods, seeds, cell_config_sha256(params))
    out_dir = ensure_dir(out_dir)
    with atomic_file(out_dir / "runs.csv") as tmp:
        # every digit: `spml verify` compares re-trained metrics with these, bit for bit
        runs.to_csv(tmp, index=False)
    write_text(out_dir / "results.md", results_markdown(runs, methods, datasets))
    write_json(out_dir / "summary.json", summary_metrics(runs))
    # false-negative diagnostics of every method that records them (written even when none does)
    hist = collect_histories(datasets, methods, seeds)
    write_text(out_dir / "diagnostics.md", diagnostics_markdown(hist))
    diagnostics_figure(hist, out_dir / "diagnostics.png")
    return out_dir
