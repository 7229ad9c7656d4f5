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
    """The trained grid: datasets, methods then ablations (dvc.yaml's `train` and `ablate` cells), seeds."""
    datasets, methods, seeds = params.get("datasets"), params.get("methods"), params.get("seeds")
    ablations = params.get("ablations")
    for key, value, kind in (("datasets", datasets, str), ("methods", methods, str), ("seeds", seeds, int)):
        if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
            raise SpmlError(f"params {key} must be a non-empty list of {kind.__name__}, got {value!r}")
    if not isinstance(ablations, list) or not all(isinstance(v, str) for v in ablations):
        raise SpmlError(f"params ablations must be a list of method names (may be empty), got {ablations!r}")
    return datasets, methods + [m for m in ablations if m not in methods], seeds


def run(params_path: Path = Path("params.yaml"), out_dir: Path = paths.REPORTS) -> Path:
    datasets, methods, seeds = grid(load_params(params_path))
    runs = collect_runs(datasets, methods, seeds)
    out_dir = ensure_dir(out_dir)
    with atomic_file(out_dir / "runs.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.4f")
    write_text(out_dir / "results.md", results_markdown(runs, methods, datasets))
    write_json(out_dir / "summary.json", summary_metrics(runs))
    # false-negative diagnostics of every method that records them (written even when none does)
    hist = collect_histories(datasets, methods, seeds)
    write_text(out_dir / "diagnostics.md", diagnostics_markdown(hist))
    diagnostics_figure(hist, out_dir / "diagnostics.png")
    return out_dir
