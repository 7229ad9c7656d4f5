"""Results: the long runs table and its pivot into comparison tables (mean ± sample std over seeds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import paths
from pipeline.errors import SpmlError

RUN_COLUMNS = ["dataset", "method", "model", "seed", "protocol", "val_map", "test_map", "best_epoch", "epochs",
               "train_seconds", "test_classes_without_positives"]


NUMERIC_COLUMNS = ("seed", "val_map", "test_map", "best_epoch", "epochs", "train_seconds",
                   "test_classes_without_positives")


def read_run_metrics(path: Path) -> dict[str, Any]:
    """One run's metrics.json, checked: valid JSON, every RUN_COLUMNS key, finite numbers."""
    redo = "rerun its `spml train` (or delete the file)"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpmlError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"it is truncated or corrupt: {redo}") from None
    if not isinstance(metrics, dict):
        raise SpmlError(f"{path} must hold a JSON object, got {type(metrics).__name__}; {redo}")
    for key in RUN_COLUMNS:
        if key not in metrics:
            raise SpmlError(f"{path} has no key {key!r}; {redo}")
        value = metrics[key]
        if key in NUMERIC_COLUMNS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                       or not math.isfinite(value)):
            raise SpmlError(f"{path} key {key!r} is {value!r}, not a finite number; {redo}")
    return metrics


def collect_runs(datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                path = paths.run_dir(dataset, method, seed) / "metrics.json"
                if not path.exists():
                    raise SpmlError(f"{path} does not exist; run `spml train {dataset} {method} --seed {seed}`")
                metrics = read_run_metrics(path)
                versions = metrics.get("versions")
                rows.append({key: metrics[key] for key in RUN_COLUMNS}
                            | {"torch": versions.get("torch") if isinstance(versions, dict) else None})
    return pd.DataFrame(rows)


def _fmt(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if len(values) == 0:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def results_markdown(runs: pd.DataFrame, methods: list[str], datasets: list[str]) -> str:
    """Methods x datasets, test mAP (at the best-val epoch) as mean ± sample std (ddof=1) over seeds."""
    lines = ["# Results", "",
             "Test mAP (%) at the best-validation epoch, mean ± sample standard deviation (ddof=1) over seeds;",
             "n = number of seeds. Regenerate with `dvc repro`.", ""]
    protocols = sorted(set(runs.protocol.dropna())) if "protocol" in runs else []
    lines += [(f"Training protocol: {', '.join(protocols) or 'unknown'} (docs/protocols.md: `unified` = one shared "
               "recipe for every method, `original` = each method under its authors' published protocol)."), ""]
    header = "| method | " + " | ".join(datasets) + " | n |"
    lines += [header, "|" + "---|" * (len(datasets) + 2)]
    for method in methods:
        sub = runs[runs.method == method]
        cells = [_fmt(sub[sub.dataset == d].test_map) for d in datasets]
        n = sub.groupby("dataset").seed.nunique().max() if len(sub) else 0
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    lines += ["", "Validation mAP (model selection):", "", header, "|" + "---|" * (len(datasets) + 2)]
    for method in methods:
        sub = runs[runs.method == method]
        cells = [_fmt(sub[sub.dataset == d].val_map) for d in datasets]
        n = sub.groupby("dataset").seed.nunique().max() if len(sub) else 0
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def summary_metrics(runs: pd.DataFrame) -> dict[str, Any]:
    """Nested dataset -> method -> {test_map_mean, test_map_std, n} for `dvc metrics show`."""
    out: dict[str, Any] = {}
    for (dataset, method), sub in runs.groupby(["dataset", "method"], sort=False):
        tm = sub.test_map.astype(float)
        out.setdefault(dataset, {})[method] = {
            "test_map_mean": round(float(tm.mean()), 4),
            "test_map_std": round(float(tm.std(ddof=1)), 4) if len(tm) > 1 else 0.0,
            "val_map_mean": round(float(sub.val_map.astype(float).mean()), 4),
            "n": len(tm),
        }
    return out
