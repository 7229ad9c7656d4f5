"""False-negative diagnostics report: ``reports/diagnostics.md`` and ``reports/diagnostics.png``.

Generic over methods: any run whose ``history.csv`` has ``fn_*`` columns (written by
:class:`pipeline.methods.diagnostics.FalseNegativeMeter` through ``Method.epoch_diagnostics``) appears,
whatever the method. Per (dataset, method) the table gives the last epoch's values and the averages over
the epochs where the method was rejecting or relabelling (``fn_active == 1`` where the method reports it,
else the epochs with at least one flagged entry), each averaged over seeds. The figure is the analogue of
the paper's Figs. 3 and 4: false-negative precision, recall, F1 and the FN/TN ratio of the flagged entries
per epoch, one line per method (mean over seeds), plus the mean logit gaps and tau where recorded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.io import atomic_file

# column, header, format
TABLE_COLUMNS = [
    ("fn_base_rate", "base rate", "{:.4f}"),
    ("fn_flagged", "flagged/epoch", "{:.0f}"),
    ("fn_precision", "precision", "{:.3f}"),
    ("fn_recall", "recall", "{:.3f}"),
    ("fn_f1", "F1", "{:.3f}"),
    ("fn_tn_ratio", "FN/TN", "{:.3f}"),
    ("gap_sp", "gap SP", "{:.3f}"),
    ("gap_tn", "gap TN", "{:.3f}"),
    ("gap_fn", "gap FN", "{:.3f}"),
    ("tau", "tau", "{:.3f}"),
    ("mask_pos_kept", "mask: positive kept", "{:.3f}"),
    ("mask_other_removed", "mask: others removed", "{:.3f}"),
]
CURVES = [("fn_precision", "FN precision"), ("fn_recall", "FN recall"), ("fn_f1", "FN F1"),
          ("fn_tn_ratio", "FN/TN ratio of flagged entries")]


def collect_histories(datasets: list[str], methods: list[str], seeds: list[int],
                      runs_dir: Path = paths.RUNS) -> pd.DataFrame:
    """Long table (dataset, method, seed, epoch, ...) of the runs whose history has fn_* columns."""
    frames = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                path = runs_dir / dataset / method / str(seed) / "history.csv"
                if not path.exists():
                    continue
                hist = pd.read_csv(path)
                if not any(c.startswith("fn_") for c in hist.columns):
                    continue
                frames.append(hist.assign(dataset=dataset, method=method, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _active(sub: pd.DataFrame) -> pd.Series:
    """Epochs where the method was flagging: its own ``fn_active`` if it reports one, else flagged > 0."""
    if "fn_active" in sub.columns and sub["fn_active"].notna().any():
        return sub["fn_active"].fillna(0) > 0
    return sub["fn_flagged"].fillna(0) > 0


def _cell(value: float, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def diagnostics_markdown(hist: pd.DataFrame) -> str:
    lines = ["# False-negative diagnostics", "",
             "Per epoch on the training set, against the hidden full labels. An *assumed negative* is an",
             "unannotated entry; a *false negative* (FN) is an assumed negative whose true label is 1. Precision =",
             "FN among the entries a method rejected or relabelled; recall = share of all FN it flagged; base rate =",
             "FN / assumed negatives (the precision of flagging at random); FN/TN = flagged FN / flagged true",
             "negatives (paper Fig. 3b); lift = precision / base rate. Gaps are mean |z - z_masked| of single",
             "positives (SP), true negatives (TN) and FN (paper Fig. 3a). Values are means over seeds.",
             "Regenerate with `dvc repro` (stage `aggregate`).", ""]
    if hist.empty:
        lines.append("No run in the params grid records false-negative diagnostics (no `fn_*` history columns).")
        return "\n".join(lines) + "\n"
    present = [(c, h, f) for c, h, f in TABLE_COLUMNS if c in hist.columns]
    for title, pick in (("Averages over the epochs with flagging active (warm-up excluded)", "active"),
                        ("Last epoch", "last")):
        lines += [f"## {title}", "",
                  "| dataset | method | seeds | epochs | " + " | ".join(h for _, h, _ in present) + " | lift |",
                  "|" + "---|" * (len(present) + 5)]
        for (dataset, method), sub in hist.groupby(["dataset", "method"], sort=False):
            per_seed = []
            for _, run in sub.groupby("seed"):
                run = run.sort_values("epoch")
                rows = run[_active(run)] if pick == "active" else run.tail(1)
                if len(rows):
                    per_seed.append(rows[[c for c, _, _ in present]].mean(numeric_only=True))
            if not per_seed:
                continue
            mean = pd.concat(per_seed, axis=1).mean(axis=1)
            epochs = int(_active(sub).groupby(sub.seed).sum().mean()) if pick == "active" else 1
            cells = [_cell(float(mean.get(c, np.nan)), f) for c, _, f in present]
            base, prec = float(mean.get("fn_base_rate", np.nan)), float(mean.get("fn_precision", np.nan))
            lift = prec / base if base and not math.isnan(base) else float("nan")
            lines.append(f"| {dataset} | {method} | {sub.seed.nunique()} | {epochs} | " + " | ".join(cells)
                         + f" | {_cell(lift, '{:.2f}x')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def diagnostics_figure(hist: pd.DataFrame, out: Path) -> None:
    """Write the PNG (matplotlib, Agg): one panel per curve, one line per dataset/method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_gaps = not hist.empty and any(c in hist.columns for c in ("gap_sp", "gap_tn", "gap_fn"))
    ncols = 3 if has_gaps else 2
    fig, axes = plt.subplots(2, ncols, figsize=(5 * ncols, 7.5), squeeze=False)
    panels = [axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]]
    if hist.empty:
        for ax in axes.flat:
            ax.axis("off")
        axes[0, 0].text(0, 0.5, "no run in the grid records false-negative diagnostics", fontsize=12)
    else:
        multi = hist.dataset.nunique() > 1
        for (dataset, method), sub in hist.groupby(["dataset", "method"], sort=False):
            label = f"{dataset}/{method}" if multi else method
            mean = sub.groupby("epoch").mean(numeric_only=True)
            active = _active(mean)
            for ax, (col, title) in zip(panels, CURVES):
                if col in mean.columns:
                    ax.plot(mean.index, mean[col].where(active), marker=".", label=label)
                ax.set_title(title)
            if "fn_base_rate" in mean.columns:
                panels[0].plot(mean.index, mean["fn_base_rate"], ls=":", color="grey")
            if has_gaps:
                for col, ls in (("gap_sp", "-"), ("gap_tn", ":"), ("gap_fn", "--")):
                    if col in mean.columns:
                        axes[0, 2].plot(mean.index, mean[col], ls=ls, label=f"{label} {col[4:].upper()}")
                if "tau" in mean.columns:
                    axes[1, 2].plot(mean.index, mean["tau"], label=label)
        panels[0].plot([], [], ls=":", color="grey", label="base rate")
        if has_gaps:
            axes[0, 2].set_title("mean logit gap |z - z_masked|")
            axes[1, 2].set_title("gap threshold tau")
        for ax in axes.flat:
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("False-negative identification on the training set (mean over seeds; warm-up epochs blank)")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
