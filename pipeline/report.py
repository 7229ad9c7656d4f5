"""Results: the long runs table and its pivot into comparison tables (mean ± sample std over seeds)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from pipeline import paths
from pipeline.errors import SpmlError

RUN_COLUMNS = ["dataset", "method", "model", "seed", "val_map", "test_map", "best_epoch", "epochs",
               "train_seconds", "test_classes_without_positives"]


def collect_runs(datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                path = paths.run_dir(dataset, method, seed) / "metrics.json"
                if not path.exists():
                    raise SpmlError(f"{path} does not exist; run `spml train {dataset} {method} --seed {seed}`")
                metrics = json.loads(path.read_text())
                rows.append({key: metrics.get(key) for key in RUN_COLUMNS}
                            | {"torch": metrics.get("versions", {}).get("torch")})
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
