"""Results: the long runs table and its pivot into comparison tables (mean ± sample std over seeds).

Besides the raw means, each dataset is scored the way the field reads such tables: the AN/full ratio
(how much of full-label mAP the naive assume-negative baseline already reaches), each method's share of the
AN-to-full gap closed, and the rank agreement (Kendall's tau-b) of our ordering of methods with the IGNORE
paper's Table 2 (:mod:`pipeline.published`). :func:`read_runs_csv` reads a runs table back for the tools
(``spml compare-regimes``: :mod:`pipeline.tools.compare_regimes`; ``spml verify``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import paths, published
from pipeline.errors import SpmlError

RUN_COLUMNS = ["dataset", "method", "model", "seed", "protocol", "val_map", "test_map", "best_epoch", "epochs",
               "train_seconds", "test_classes_without_positives"]


NUMERIC_COLUMNS = ("seed", "val_map", "test_map", "best_epoch", "epochs", "train_seconds",
                   "test_classes_without_positives")

# A run whose CLIP-based method scored with randomly initialised CLIP weights (its history's clip_meaningful is
# 0; the embedded CPU benchmark has no real weights): its number is not a measurement of the method. Tables mark
# such cells with UNMEASURED_MARK and leave them out of gap closed and Kendall tau.
RANDOM_CLIP = "clip_random_weights"
UNMEASURED_MARK = "†"
UNMEASURED_NOTE = (f"{UNMEASURED_MARK} random CLIP weights (a tiny randomly initialised open_clip model, params "
                   "`clip.<method>.random_init_config`): the CLIP pseudo-labels are noise, so the score is "
                   "meaningless, not a measurement of the method; left out of gap closed and Kendall tau.")
# A run whose CLIP-based method ran on a substitute for one of its official inputs (class names, relation matrix,
# text features; its history's clip_substitutes is above 0: params `clip.<method>.official_inputs.<name>.file` was
# null): a measurement of the method with our stand-in for that input, not of the method as released. Marked.
SUBSTITUTE_CLIP = "clip_substitutes"
SUBSTITUTE_MARK = "‡"
SUBSTITUTE_NOTE = (f"{SUBSTITUTE_MARK} ran on substitutes for official inputs (the method's class names, relation "
                   "matrix or text features: params `clip.<method>.official_inputs.<name>.file` is null, so this "
                   "project's stand-in was used; the run's data/clip/<dataset>/<method>/meta.json lists which).")


# what a metrics.json value may be: mAPs are percentages, epochs count from 1 (a run selects one of its epochs)
RANGES = {"val_map": (0.0, 100.0), "test_map": (0.0, 100.0), "best_epoch": (1, math.inf), "epochs": (1, math.inf),
          "train_seconds": (0.0, math.inf), "test_classes_without_positives": (0, math.inf)}
INTEGER_COLUMNS = ("seed", "best_epoch", "epochs", "test_classes_without_positives")


def check_run_cell(metrics: dict[str, Any], path: Path, cell: tuple[str, str, int],
                   config_sha256: str | None) -> None:
    """Refuse a metrics.json that is not its cell's: another dataset, method or seed than the folder it is read
    for, a run config other than the one params.yaml gives that cell, or values out of range."""
    redo = f"rerun `spml train {cell[0]} {cell[1]} --seed {cell[2]}` (or delete the file)"
    for key, expected in zip(("dataset", "method", "seed"), cell):
        if metrics[key] != expected or isinstance(metrics[key], bool):
            raise SpmlError(f"{path} is a run of {key} {metrics[key]!r}, but it sits in the folder of {key} "
                            f"{expected!r}; it belongs to another cell: {redo}")
    for key in INTEGER_COLUMNS:
        if not isinstance(metrics[key], int):
            raise SpmlError(f"{path} key {key!r} is {metrics[key]!r}, not a whole number; {redo}")
    for key, (low, high) in RANGES.items():
        if not low <= metrics[key] <= high:
            raise SpmlError(f"{path} key {key!r} is {metrics[key]!r}, outside [{low:g}, {high:g}]; {redo}")
    if metrics["best_epoch"] > metrics["epochs"]:
        raise SpmlError(f"{path} has best_epoch {metrics['best_epoch']} of {metrics['epochs']} epochs; {redo}")
    if config_sha256 is not None and metrics.get("config_sha256") != config_sha256:
        found = "no config_sha256 (written by an older spml)" if "config_sha256" not in metrics \
            else f"config_sha256 {str(metrics['config_sha256'])[:12]}..., not the cell's {config_sha256[:12]}..."
        raise SpmlError(f"{path} was trained with another config than params.yaml gives its cell ({found}); {redo}")


def read_run_metrics(path: Path, cell: tuple[str, str, int] | None = None,
                     config_sha256: str | None = None) -> dict[str, Any]:
    """One run's metrics.json, checked: valid JSON, every RUN_COLUMNS key, finite numbers; with ``cell``
    (dataset, method, seed) also that it is that cell's run (:func:`check_run_cell`)."""
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
    if cell is not None:
        check_run_cell(metrics, path, cell, config_sha256)
    return metrics


def collect_runs(datasets: list[str], methods: list[str], seeds: list[int],
                 config_sha256: Callable[[str, str, int], str] | None = None) -> pd.DataFrame:
    """The runs table of the grid; ``config_sha256(dataset, method, seed)``: the config each cell's run must have."""
    rows = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                path = paths.run_dir(dataset, method, seed) / "metrics.json"
                if not path.exists():
                    raise SpmlError(f"{path} does not exist; run `spml train {dataset} {method} --seed {seed}`")
                metrics = read_run_metrics(path, (dataset, method, seed),
                                           config_sha256(dataset, method, seed) if config_sha256 else None)
                versions = metrics.get("versions")
                # what a bit-for-bit rerun must match (spml verify): torch, threads and malloc of the run
                rows.append({key: metrics[key] for key in RUN_COLUMNS}
                            | {"torch": versions.get("torch") if isinstance(versions, dict) else None,
                               "threads": metrics.get("threads"), "allocator": metrics.get("allocator"),
                               RANDOM_CLIP: random_clip_weights(path.parent / "history.csv"),
                               SUBSTITUTE_CLIP: clip_substitutes(path.parent / "history.csv")})
    return pd.DataFrame(rows)


def _history_column(history: Path, column: str) -> pd.Series | None:
    """A numeric column of a run's history.csv, or None (no file, no such column, unreadable)."""
    if not history.is_file():
        return None
    try:
        if column not in pd.read_csv(history, nrows=0).columns:
            return None
        return pd.to_numeric(pd.read_csv(history, usecols=[column])[column], errors="coerce")
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None  # a broken history is the diagnostics report's business, not the score's


def random_clip_weights(history: Path) -> bool:
    """True when the run's history says its CLIP scores came from random weights (``clip_meaningful`` 0)."""
    values = _history_column(history, "clip_meaningful")
    return values is not None and bool((values == 0).any())


def clip_substitutes(history: Path) -> bool:
    """True when the run's history says an official input of its CLIP method ran on a substitute
    (``clip_substitutes`` above 0)."""
    values = _history_column(history, "clip_substitutes")
    return values is not None and bool((values > 0).any())


def _flagged(runs: pd.DataFrame, dataset: str, column: str) -> set[str]:
    if column not in runs:
        return set()
    flags = runs[column].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    return set(runs[(runs.dataset == dataset) & flags].method.astype(str))


def unmeasured(runs: pd.DataFrame, dataset: str) -> set[str]:
    """Methods with a run on ``dataset`` scored with random CLIP weights (see RANDOM_CLIP)."""
    return _flagged(runs, dataset, RANDOM_CLIP)


def on_substitutes(runs: pd.DataFrame, dataset: str) -> set[str]:
    """Methods with a run on ``dataset`` whose CLIP method ran on a substitute official input (SUBSTITUTE_CLIP)."""
    return _flagged(runs, dataset, SUBSTITUTE_CLIP)


def mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if len(values) == 0:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def protocol_line(runs: pd.DataFrame) -> str:
    """Which protocol produced the numbers. Under ``protocol: original`` a method without an ``original`` block
    runs ``unified`` (pipeline/run_config.py): the line names those methods, so no row passes for its authors'."""
    protocols = sorted(set(runs.protocol.dropna())) if "protocol" in runs else []
    line = (f"Training protocol: {', '.join(protocols) or 'unknown'} (docs/protocols.md: `unified` = one shared "
            "recipe for every method, `original` = each method under its authors' published protocol).")
    if set(protocols) == {"original", "unified"}:
        fallback = sorted(set(runs[runs.protocol == "unified"].method))
        line += (f" Under `original`, {', '.join(fallback)} ran `unified`: no `original` block in "
                 f"method_params.<method> (a method's authors' protocol is added there).")
    return line


def results_markdown(runs: pd.DataFrame, methods: list[str], datasets: list[str]) -> str:
    """Methods x datasets, test mAP (at the best-val epoch) as mean ± sample std (ddof=1) over seeds, then
    per dataset the field scores (:func:`field_scores_markdown`: gap closed, AN/full, Kendall tau vs Table 2)."""
    lines = ["# Results", "",
             "Test mAP (%) at the best-validation epoch, mean ± sample standard deviation (ddof=1) over seeds;",
             "n = number of seeds. Regenerate with `dvc repro`.", ""]
    lines += [protocol_line(runs), ""]
    header = "| method | " + " | ".join(datasets) + " | n |"
    marked = {d: unmeasured(runs, d) for d in datasets}
    substituted = {d: on_substitutes(runs, d) for d in datasets}
    note = ([UNMEASURED_NOTE, ""] if any(marked.values()) else []) \
        + ([SUBSTITUTE_NOTE, ""] if any(substituted.values()) else [])

    def cell(sub: pd.DataFrame, method: str, dataset: str, column: str) -> str:
        text = mean_std(sub[sub.dataset == dataset][column])
        marks = [UNMEASURED_MARK] * (method in marked[dataset]) + [SUBSTITUTE_MARK] * (method in substituted[dataset])
        return f"{text} {''.join(marks)}" if marks else text

    for title, column in (("", "test_map"), ("Validation mAP (model selection):", "val_map")):
        lines += [title, ""] if title else []
        lines += [header, "|" + "---|" * (len(datasets) + 2)]
        for method in methods:
            sub = runs[runs.method == method]
            n = sub.groupby("dataset").seed.nunique().max() if len(sub) else 0
            lines.append(f"| {method} | " + " | ".join(cell(sub, method, d, column) for d in datasets) + f" | {n} |")
        lines += ["", *note]
    lines += field_scores_markdown(runs, methods, datasets)
    return "\n".join(lines).rstrip("\n") + "\n"


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
    for dataset, by_method in out.items():
        scores = dataset_scores(runs, dataset)
        for method, gap in scores["gap_closed"].items():
            by_method[method]["gap_closed"] = _round(gap)
        for method in scores["unmeasured"]:  # random CLIP weights: not a measurement (RANDOM_CLIP)
            by_method[method][RANDOM_CLIP] = True
        for method in on_substitutes(runs, dataset):  # official inputs replaced by ours (SUBSTITUTE_CLIP)
            by_method[method][SUBSTITUTE_CLIP] = True
        # scalars next to the per-method dicts (a reader telling methods apart by "value is a dict" still can)
        by_method["an_full_ratio"] = _round(scores["an_full_ratio"])
        by_method["kendall_tau"] = _round(scores["kendall_tau"])
        by_method["kendall_tau_interval"] = [_round(v) for v in scores["kendall_interval"]] \
            if scores["kendall_interval"] else None
        by_method["kendall_n"] = len(scores["kendall_methods"])
    return out


# ---------------------------------------------------------------------------------------- field scores

AN, FULL = "an", "full"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def test_map_means(runs: pd.DataFrame, dataset: str) -> dict[str, float]:
    """Method -> mean test mAP over seeds on ``dataset``, in the order the methods first appear."""
    sub = runs[runs.dataset == dataset]
    return {str(m): float(g.test_map.astype(float).mean()) for m, g in sub.groupby("method", sort=False)}


def an_full_ratio(means: dict[str, float]) -> float | None:
    """mAP(an) / mAP(full), or None unless both ran (and full is above 0)."""
    if AN not in means or FULL not in means or not means[FULL] > 0:
        return None
    return means[AN] / means[FULL]


def gap_closed(means: dict[str, float]) -> dict[str, float | None]:
    """Method -> share of the AN-to-full gap it closes, in %: 100 (m - an) / (full - an).

    0 = no better than AN, 100 = as good as full labels, negative = worse than AN. None for an and full
    themselves, and for every method when an or full did not run or they tie (no gap to close)."""
    an, full = means.get(AN), means.get(FULL)
    defined = an is not None and full is not None and full != an
    return {m: 100.0 * (v - an) / (full - an) if defined and m not in (AN, FULL) else None
            for m, v in means.items()}


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two paired samples (ties in either are allowed), or None when undefined.

    tau_b = (C - D) / sqrt((P - Tx) (P - Ty)), with C and D the concordant and discordant pairs, P = n(n-1)/2
    all pairs, Tx and Ty the pairs tied in x and in y. Undefined (None) for fewer than 2 items or when every
    pair is tied in x or in y."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs paired samples, got {len(x)} and {len(y)} values")
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator > 0 else None


MIN_KENDALL_METHODS = 3


def paper_agreement(means: dict[str, float], dataset: str) -> tuple[float | None, list[str]]:
    """Kendall tau-b between our test mAP and Table 2's over the methods both have, and those methods.

    tau is None with fewer than MIN_KENDALL_METHODS common methods (or no Table 2 column for ``dataset``)."""
    paper = published.table2(dataset)
    common = [m for m in means if m in paper]
    if len(common) < MIN_KENDALL_METHODS:
        return None, common
    return kendall_tau_b([means[m] for m in common], [paper[m] for m in common]), common


BOOTSTRAP_ROUNDS = 2000
BOOTSTRAP_SEED = 0  # a fixed seed: the interval is part of a deterministic report


def kendall_interval(runs: pd.DataFrame, dataset: str, methods: list[str],
                     rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of Kendall tau vs Table 2 over seeds: each round redraws, per method,
    its seeds with replacement, and recomputes the means and tau. None with fewer than 2 seeds everywhere
    (no spread to resample) or fewer than MIN_KENDALL_METHODS methods."""
    import numpy as np

    paper = published.table2(dataset)
    common = [m for m in methods if m in paper]
    sub = runs[runs.dataset == dataset]
    values = [sub[sub.method == m].test_map.astype(float).to_numpy() for m in common]
    if len(common) < MIN_KENDALL_METHODS or max((len(v) for v in values), default=0) < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    taus = []
    for _ in range(rounds):
        means = [float(v[rng.integers(0, len(v), len(v))].mean()) for v in values]
        tau = kendall_tau_b(means, [paper[m] for m in common])
        if tau is not None:
            taus.append(tau)
    if not taus:
        return None
    low, high = np.percentile(taus, [2.5, 97.5])
    return float(low), float(high)


def dataset_scores(runs: pd.DataFrame, dataset: str) -> dict[str, Any]:
    """Everything the field-score table shows for one dataset (test mAP means, AN/full, gaps, tau).

    Methods scored with random CLIP weights (``unmeasured``) keep their mean but get no gap closed and are
    left out of Kendall tau: their numbers measure nothing."""
    means = test_map_means(runs, dataset)
    excluded = unmeasured(runs, dataset)
    tau, common = paper_agreement({m: v for m, v in means.items() if m not in excluded}, dataset)
    gaps = {m: None if m in excluded else gap for m, gap in gap_closed(means).items()}
    sub = runs[runs.dataset == dataset]
    # the seed spread of each mean: its standard error, std (ddof=1) / sqrt(n); None with one seed
    errors = {str(m): float(g.test_map.astype(float).std(ddof=1)) / math.sqrt(len(g)) if len(g) > 1 else None
              for m, g in sub.groupby("method", sort=False)}
    return {"means": means, "an_full_ratio": an_full_ratio(means), "gap_closed": gaps, "mean_error": errors,
            "kendall_tau": tau, "kendall_methods": common, "kendall_interval": kendall_interval(runs, dataset, common),
            "paper": published.table2(dataset),
            "paper_column": published.table2_column(dataset), "unmeasured": sorted(excluded),
            "substitutes": sorted(on_substitutes(runs, dataset))}


def number_or_dash(value: float | None, fmt: str, missing: str = "–") -> str:
    return missing if value is None else fmt.format(value)


def agreement_line(scores: dict[str, Any]) -> str:
    """'AN/full = 0.58; Kendall tau vs Table 2 (VOC) = 0.33 over n = 4 methods (an, em, ll-r, ignore)'."""
    ratio = number_or_dash(scores["an_full_ratio"], "{:.2f}")
    ratio += "" if scores["an_full_ratio"] is not None else " (needs both an and full)"
    column, common = scores["paper_column"], scores["kendall_methods"]
    if column is None:
        return f"AN/full = {ratio}; Kendall tau vs Table 2 = – (Table 2 has no column for this dataset)"
    tau = number_or_dash(scores["kendall_tau"], "{:.2f}")
    interval = scores.get("kendall_interval")
    if interval and scores["kendall_tau"] is not None:
        tau += f" (95 % bootstrap interval over seeds: {interval[0]:+.2f} to {interval[1]:+.2f})"
    which = f" ({', '.join(common)})" if common else ""
    short = f", needs at least {MIN_KENDALL_METHODS}" if len(common) < MIN_KENDALL_METHODS else ""
    return (f"AN/full = {ratio}; Kendall tau vs Table 2 ({column}) = {tau} over n = {len(common)} "
            f"methods{which}{short}")


FIELD_SCORES_CAPTION = [
    "## Gap closed and agreement with the paper's Table 2", "",
    "Per dataset, from the test mAP above (mean over seeds). Columns and figures:", "",
    "- **test mAP**: mean test mAP (%) over seeds, as in the first table.",
    "- **gap closed**: the method's share of the gap between assume-negative training and full labels,",
    "  100 · (mAP(method) − mAP(an)) / (mAP(full) − mAP(an)) in %; 0 = no better than AN, 100 = as good as",
    "  full labels, negative = worse than AN. Blank for an and full themselves, or when either did not run.",
    "- **paper (Table 2)**: the test mAP (%) that the IGNORE paper (Song et al., ECCV 2024) reports in its",
    "  Table 2 (ResNet-50) for the same method, in the matching column (voc2012 → VOC, coco2014 → COCO,",
    "  nuswide → NUS, cub → CUB; `pipeline/published.py`); – when the table has no such row. `synthetic` has",
    "  VOC's label statistics and is compared with the VOC column, `synthetic-dense` (CUB's share of false",
    "  negatives) with the CUB column: their orderings can be compared, their numbers cannot.",
    "- **AN/full**: mAP(an) / mAP(full), how much of full-label mAP the naive baseline already reaches.",
    "- **Kendall tau**: rank agreement (tau-b, ties counted) between our ordering of methods by test mAP and",
    "  Table 2's, over the n methods both have (at least 3, else –): +1 = same order, −1 = reversed,",
    "  0 = unrelated. Table 2 trains an ImageNet-pretrained ResNet-50 at 448 px; our model is named per dataset.",
    "  Its interval: the 2.5th and 97.5th percentiles of tau over 2000 bootstrap rounds that redraw each",
    "  method's seeds with replacement (fixed seed; none with a single seed).",
    "- **s.e.**: the seed spread of a mean, its standard error std (ddof=1) / sqrt(n) over the n seeds.",
    "",
]


def field_scores_markdown(runs: pd.DataFrame, methods: list[str], datasets: list[str]) -> list[str]:
    """The per-dataset section: method | test mAP | gap closed | paper (Table 2), and the AN/full + tau line."""
    lines = list(FIELD_SCORES_CAPTION)
    for dataset in datasets:
        if not (runs.dataset == dataset).any():
            continue
        scores = dataset_scores(runs, dataset)
        models = ", ".join(sorted(set(runs[runs.dataset == dataset].model.dropna().astype(str))))
        column = scores["paper_column"]
        lines += [f"### {dataset} (model: {models or 'unknown'}; paper column: {column or 'none'})", "",
                  agreement_line(scores) + ".", "",
                  "| method | test mAP | s.e. | gap closed (%) | paper (Table 2) |", "|---|---|---|---|---|"]
        order = [m for m in methods if m in scores["means"]] + [m for m in scores["means"] if m not in methods]
        for method in order:
            mark = f" {UNMEASURED_MARK}" if method in scores["unmeasured"] else ""
            sub = SUBSTITUTE_MARK if method in scores["substitutes"] else ""
            lines.append(f"| {method}{mark}{sub} | {scores['means'][method]:.2f}{mark}{sub} | "
                         f"{number_or_dash(scores['mean_error'].get(method), '{:.2f}')} | "
                         f"{number_or_dash(scores['gap_closed'][method], '{:+.1f}', mark.strip())} | "
                         f"{number_or_dash(scores['paper'].get(method), '{:.2f}')} |")
        lines += ["", UNMEASURED_NOTE, ""] if scores["unmeasured"] else [""]
        lines += [SUBSTITUTE_NOTE, ""] if scores["substitutes"] else []
    return lines


# ------------------------------------------------------------------------------------- reading a runs table back

# what a runs table must hold to be compared or verified (spml compare-regimes, spml verify)
REGIME_COLUMNS = ("dataset", "method", "test_map")


def read_runs_csv(path: Path) -> pd.DataFrame:
    """A runs table written by `spml aggregate` (``path`` is its folder or the file), checked: readable CSV
    with dataset, method and test_map columns, at least one row, every test_map a finite number."""
    path = Path(path)
    file = path / "runs.csv" if path.is_dir() else path
    redo = "give a folder that `spml aggregate --out DIR` wrote"
    if not file.is_file():
        raise SpmlError(f"{file} does not exist; {redo}")
    try:
        runs = pd.read_csv(file)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise SpmlError(f"{file} is not a readable CSV ({type(exc).__name__}: {first}); {redo}") from None
    missing = [c for c in REGIME_COLUMNS if c not in runs.columns]
    if missing:
        raise SpmlError(f"{file} lacks the column(s) {', '.join(missing)}; it is not a runs table: {redo}")
    if runs.empty:
        raise SpmlError(f"{file} has no runs; {redo}")
    values = pd.to_numeric(runs.test_map, errors="coerce")
    bad = runs.test_map[~(values.notna() & (values.abs() < math.inf))]
    if len(bad):
        raise SpmlError(f"{file} has a test_map that is not a finite number ({bad.iloc[0]} on line "
                        f"{int(bad.index[0]) + 2}); {redo}")
    return runs.assign(test_map=values, dataset=runs.dataset.astype(str), method=runs.method.astype(str))
