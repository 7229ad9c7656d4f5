"""False-negative diagnostics report: ``reports/diagnostics.md`` and ``reports/diagnostics.png``.

Generic over methods: any run whose ``history.csv`` has ``fn_*`` columns (written by the training loop's
:class:`pipeline.hidden_scoring.FalseNegativeMeter` from what the method reports) appears,
whatever the method. Per (dataset, method) the table gives the last epoch's values and the averages over
the epochs where the method was rejecting or relabelling (``fn_active == 1`` where the method reports it,
else the epochs with at least one flagged entry), each averaged over seeds. The figure is the analogue of
the paper's Figs. 3 and 4: false-negative precision, recall, F1 and the FN/TN ratio of the flagged entries
per epoch, one line per method (mean over seeds), plus the mean logit gaps, tau and the CAM mask coverage
where recorded. Each panel shows only the methods that record its quantity (:func:`panel_members`).
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
# One figure panel per quantity: key, title, the history columns drawn (with their line styles). A method
# appears in a panel only when its history has a value in one of those columns (only the IGNORE family records
# the logit gaps, tau and the mask coverage); a panel no method has is left out.
PANELS = [
    ("fn_precision", "FN precision (cf. paper Fig. 4)\nblack dash-dot: base rate = random flagging",
     (("fn_precision", "-"),)),
    ("fn_recall", "FN recall (cf. paper Fig. 4)", (("fn_recall", "-"),)),
    ("fn_f1", "FN F1 (cf. paper Fig. 4)", (("fn_f1", "-"),)),
    ("gap", "mean logit gap |z − z_masked| (cf. paper Fig. 3a)\nsolid: SP · dotted: TN · dashed: FN",
     (("gap_sp", "-"), ("gap_tn", ":"), ("gap_fn", "--"))),
    ("fn_tn_ratio", "FN/TN of the flagged entries (cf. paper Fig. 3b)\nlinear below 1, log above",
     (("fn_tn_ratio", "-"),)),
    ("tau", "gap threshold τ", (("tau", "-"),)),
    ("mask", "CAM mask coverage\nsolid: positive kept · dashed: other objects removed",
     (("mask_pos_kept", "-"), ("mask_other_removed", "--"))),
]
# FN curves are drawn only on the epochs where the method was flagging (warm-up blank); the rest on every epoch
MASKED_BY_ACTIVE = {"fn_precision", "fn_recall", "fn_f1", "fn_tn_ratio"}


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
                # a CLIP-based method scored with random CLIP weights flags noise: its label carries the mark
                random_clip = "clip_meaningful" in hist.columns and bool((hist.clip_meaningful == 0).any())
                label = f"{method} {UNMEASURED_MARK}" if random_clip else method
                frames.append(hist.assign(dataset=dataset, method=label, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


UNMEASURED_MARK = "†"
UNMEASURED_NOTE = (f"{UNMEASURED_MARK} random CLIP weights (a tiny randomly initialised open_clip model): the CLIP "
                   "pseudo-labels are noise, so these rows measure nothing about the method.")


def has_unmeasured(hist: pd.DataFrame) -> bool:
    return not hist.empty and hist.method.astype(str).str.endswith(UNMEASURED_MARK).any()


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
    if has_unmeasured(hist):
        lines += [UNMEASURED_NOTE, ""]
    return "\n".join(lines) + "\n"


def _label(dataset: str, method: str, multi: bool) -> str:
    return f"{dataset}/{method}" if multi else method


def panel_members(hist: pd.DataFrame) -> dict[str, list[str]]:
    """Panel key -> the (dataset/)method labels drawn in it, in order; panels nobody fills are left out.

    A method is in a panel when any of the panel's columns has at least one value in its history (a column
    that exists only because another method wrote it is all NaN for this one)."""
    if hist.empty:
        return {}
    multi = hist.dataset.nunique() > 1
    members: dict[str, list[str]] = {}
    for key, _, curves in PANELS:
        cols = [c for c, _ in curves if c in hist.columns]
        labels = [_label(d, m, multi) for (d, m), sub in hist.groupby(["dataset", "method"], sort=False)
                  if cols and sub[cols].notna().any().any()]
        if labels:
            members[key] = labels
    return members


def diagnostics_figure(hist: pd.DataFrame, out: Path) -> None:
    """Write the PNG (matplotlib, Agg): one panel per quantity that some method records, one line (colour)
    per dataset/method, mean over seeds; one shared legend below the panels, never over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    members = panel_members(hist)
    style = {"font.family": "DejaVu Sans", "font.size": 8.5, "axes.titlesize": 9, "legend.fontsize": 8.5}
    with plt.rc_context(style):
        if not members:
            fig, ax = plt.subplots(figsize=(8, 2), layout="constrained")
            ax.axis("off")
            ax.text(0.5, 0.5, "no run in the grid records false-negative diagnostics", fontsize=12,
                    ha="center", va="center")
        else:
            panels = [(key, title, curves) for key, title, curves in PANELS if key in members]
            ncols = min(3, len(panels))
            nrows = math.ceil(len(panels) / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.4 * nrows + 0.8), squeeze=False,
                                     layout="constrained")
            multi = hist.dataset.nunique() > 1
            means = {_label(d, m, multi): sub.groupby("epoch").mean(numeric_only=True).sort_index()
                     for (d, m), sub in hist.groupby(["dataset", "method"], sort=False)}
            order = list(means)
            cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
            colour = {label: cmap(i % cmap.N) for i, label in enumerate(order)}
            marker = {label: "o.^sDvx*P<>"[i // 10 % 11] if len(order) > 10 else "." for i, label in enumerate(order)}
            for ax, (key, title, curves) in zip(axes.flat, panels):
                for label in members[key]:
                    mean = means[label]
                    active = _active(mean)
                    for col, ls in curves:
                        if col not in mean.columns or not mean[col].notna().any():
                            continue
                        y = mean[col].where(active) if key in MASKED_BY_ACTIVE else mean[col]
                        ax.plot(mean.index, y, ls=ls, color=colour[label], marker=marker[label], markersize=3,
                                linewidth=1.3)
                if key == "fn_precision":  # the base rate is the dataset's, whichever method flags: drawn once
                    for dataset, sub in hist.groupby("dataset", sort=False):
                        if "fn_base_rate" in sub.columns and sub["fn_base_rate"].notna().any():
                            base = sub.groupby("epoch")["fn_base_rate"].mean().sort_index()
                            ax.plot(base.index, base, ls="-.", color="black", linewidth=0.9)
                if key == "fn_tn_ratio":
                    ax.set_yscale("symlog", linthresh=1.0)
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.axhline(1.0, color="black", linewidth=0.6, alpha=0.5)
                ax.set_title(title)
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3, linewidth=0.5)
            spare = list(axes.flat)[len(panels):]
            for ax in spare:
                ax.axis("off")
            shown = [label for label in order if any(label in members[k] for k, _, _ in panels)]
            handles = [Line2D([], [], color=colour[label], marker=marker[label], markersize=4, linewidth=1.5)
                       for label in shown]
            # one legend for every panel, where there is no data: an empty grid slot if it fits, else below
            if spare and len(shown) <= 36:
                spare[0].legend(handles, shown, loc="center", ncols=1 if len(shown) <= 12 else 2,
                                title="method" if not multi else "dataset/method", frameon=False)
            else:
                fig.legend(handles, shown, loc="outside lower center", ncols=min(len(shown), 6), frameon=False)
        fig.suptitle("False-negative identification on the training set "
                     "(mean over seeds; FN curves blank during warm-up)"
                     + (f"\n{UNMEASURED_MARK} random CLIP weights: pseudo-labels are noise, not a measurement"
                        if has_unmeasured(hist) else ""))
        with atomic_file(out) as tmp:
            # no "Software" (matplotlib version) key: the bytes depend on the data only
            fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
