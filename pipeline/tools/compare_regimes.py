"""``spml compare-regimes``: two or more runs tables (each from ``spml aggregate --out DIR``) side by side.

Per dataset and method: test mAP (mean ± std, n) and gap closed in each regime, AN/full and Kendall tau per
regime (the scores of :func:`pipeline.report.dataset_scores`), in ``regimes.md``, and the gap closed per method,
one bar per regime, in ``regimes.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import published
from pipeline.errors import SpmlError
from pipeline.io import atomic_file, ensure_dir, write_text
from pipeline.report import (
    UNMEASURED_MARK,
    UNMEASURED_NOTE,
    mean_std,
    number_or_dash,
    agreement_line,
    dataset_scores,
    read_runs_csv,
)


def _ordered(values) -> list[str]:
    return list(dict.fromkeys(values))


def regime_scores(regimes: dict[str, pd.DataFrame]) -> dict[str, dict[str, dict[str, Any]]]:
    """dataset -> regime label -> :func:`dataset_scores` of that regime's runs (datasets in first-seen order)."""
    datasets = _ordered(d for runs in regimes.values() for d in runs.dataset)
    return {d: {label: dataset_scores(runs, d) for label, runs in regimes.items() if (runs.dataset == d).any()}
            for d in datasets}


# the first line of a committed table made outside DVC (its results.md and README.md): it carries over to any
# comparison built on it, so no derived table hides where its numbers come from
NOT_PIPELINE = "> **Not made by the pipeline.**"


def not_pipeline(folder: Path) -> bool:
    """True when the table folder's results.md says, in its first line, that the pipeline did not make it."""
    results = Path(folder) / "results.md" if Path(folder).is_dir() else Path(folder).parent / "results.md"
    try:
        return results.is_file() and results.read_text().startswith(NOT_PIPELINE)
    except (OSError, UnicodeDecodeError):
        return False


def regimes_markdown(regimes: dict[str, pd.DataFrame], sources: dict[str, str] | None = None,
                     outside: list[str] | None = None) -> str:
    """Per dataset and method: test mAP (mean ± std, n) and gap closed in each regime; AN/full and tau per regime.
    ``outside``: the regimes whose table was not made by the pipeline (said in the first line)."""
    labels = list(regimes)
    head = [f"{NOT_PIPELINE[:-3]} (partly):** the regime(s) {', '.join(outside)} come from tables made outside "
            "it; the first line of each one's results.md says how.", ""] if outside else []
    lines = [*head, "# Regime comparison", "",
             f"The same benchmark under {len(labels)} training regimes: "
             + ", ".join(f"**{label}**" + (f" (`{sources[label]}`)" if sources else "") for label in labels) + ".",
             "Per dataset: **test mAP** is the mean ± sample standard deviation (ddof=1) over seeds, n = seeds;",
             "**gap closed** is 100 · (mAP(method) − mAP(an)) / (mAP(full) − mAP(an)) within the same regime, in %",
             "(0 = no better than AN, 100 = as good as full labels; blank for an and full, or when either did not run);",
             "**AN/full** is mAP(an) / mAP(full); **Kendall tau** is the tau-b rank agreement between the regime's",
             "ordering of methods and the IGNORE paper's Table 2 (ResNet-50) over the methods both have (at least 3).",
             "`synthetic` is compared with Table 2's VOC column (VOC's label statistics), `synthetic-dense` with its",
             "CUB column (CUB's share of false negatives).",
             "Figure: `regimes.png`. Regenerate with `spml compare-regimes`.", ""]
    for dataset, by_regime in regime_scores(regimes).items():
        lines += [f"## {dataset} (paper column: {published.table2_column(dataset) or 'none'})", ""]
        lines += [f"- {label}: {agreement_line(scores)}" for label, scores in by_regime.items()]
        lines += ["", "| method | " + " | ".join(f"test mAP ({label})" for label in labels) + " | "
                  + " | ".join(f"gap closed ({label}, %)" for label in labels) + " |",
                  "|---|" + "---|" * (2 * len(labels))]
        methods = _ordered(m for label in labels for m in regimes[label][regimes[label].dataset == dataset].method)
        for method in methods:
            maps, gaps = [], []
            for label in labels:
                runs = regimes[label]
                sub = runs[(runs.dataset == dataset) & (runs.method == method)]
                mark = f" {UNMEASURED_MARK}" if method in by_regime.get(label, {}).get("unmeasured", ()) else ""
                maps.append(f"{mean_std(sub.test_map)} (n={len(sub)}){mark}" if len(sub) else "–")
                gap = by_regime[label]["gap_closed"].get(method) if label in by_regime else None
                gaps.append(number_or_dash(gap, "{:+.1f}", mark.strip()))
            lines.append(f"| {method} | " + " | ".join(maps) + " | " + " | ".join(gaps) + " |")
        lines.append("")
        if any(scores["unmeasured"] for scores in by_regime.values()):
            lines += [UNMEASURED_NOTE, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def regimes_figure(regimes: dict[str, pd.DataFrame], out: Path) -> None:
    """Grouped horizontal bars of gap closed per method, one bar per regime, one panel per dataset (PNG, Agg).

    Methods are sorted by their mean gap closed over the regimes (best on top); a zero line marks AN. Methods
    without a gap in any regime (an, full, or a dataset missing an or full) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(regimes)
    panels = []
    for dataset, by_regime in regime_scores(regimes).items():
        gaps = {label: scores["gap_closed"] for label, scores in by_regime.items()}
        methods = _ordered(m for g in gaps.values() for m, v in g.items() if v is not None)
        if methods:
            def mean_gap(m, gaps=gaps):
                values = [g[m] for g in gaps.values() if g.get(m) is not None]
                return sum(values) / len(values)
            panels.append((dataset, sorted(methods, key=lambda m: (-mean_gap(m), m)), gaps))
    style = {"font.family": "DejaVu Sans", "font.size": 8.5, "axes.titlesize": 9.5, "legend.fontsize": 8.5}
    with plt.rc_context(style):
        if not panels:
            fig, ax = plt.subplots(figsize=(8, 2), layout="constrained")
            ax.axis("off")
            ax.text(0.5, 0.5, "no regime has both an and full on a dataset: gap closed is undefined",
                    ha="center", va="center", fontsize=11)
        else:
            heights = [0.8 + 0.22 * len(methods) * max(1.0, len(labels) / 1.6) for _, methods, _ in panels]
            fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights) + 0.9), squeeze=False,
                                     layout="constrained", gridspec_kw={"height_ratios": heights})
            colours = plt.get_cmap("tab10")
            bar = 0.8 / len(labels)
            for ax, (dataset, methods, gaps) in zip(axes[:, 0], panels):
                for r, label in enumerate(labels):
                    g = gaps.get(label, {})
                    ys = [i - 0.4 + bar * (r + 0.5) for i, m in enumerate(methods) if g.get(m) is not None]
                    xs = [g[m] for m in methods if g.get(m) is not None]
                    ax.barh(ys, xs, height=bar * 0.92, color=colours(r % 10), label=label if ax is axes[0, 0] else None)
                    for x, y in zip(xs, ys):
                        ax.annotate(f"{x:+.0f}", (x, y), xytext=(3 if x >= 0 else -3, 0), textcoords="offset points",
                                    ha="left" if x >= 0 else "right", va="center", fontsize=6.5, color="0.25")
                ax.axvline(0, color="black", linewidth=0.9)
                ax.set_yticks(range(len(methods)), methods)
                ax.invert_yaxis()  # best on top
                ax.margins(x=0.12)
                ax.grid(axis="x", alpha=0.3, linewidth=0.5)
                ax.set_title(f"{dataset}: share of the AN-to-full gap closed")
                ax.set_xlabel("gap closed (%): 0 = as good as AN, 100 = as good as full labels, < 0 = worse than AN")
            fig.legend(loc="outside lower center", ncols=len(labels), frameon=False, title="regime")
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)


def compare_regimes(dirs: list[Path], labels: list[str] | None, out_dir: Path) -> Path:
    """Read each folder's runs.csv and write ``out_dir``/regimes.md and regimes.png (atomically)."""
    dirs = [Path(d) for d in dirs]
    if len(dirs) < 2:
        raise SpmlError(f"compare-regimes needs at least two runs folders, got {len(dirs)}")
    labels = ([label.strip() for label in labels] if labels is not None
              else [d.name if d.is_dir() else d.parent.name for d in dirs])
    given = " ".join(f"--label {label!r}" for label in labels)
    if len(labels) != len(dirs) or not all(labels):
        raise SpmlError(f"--label needs one non-empty name per folder ({len(dirs)}; repeat the option), got {given}")
    if len(set(labels)) != len(labels):
        raise SpmlError(f"--label must be distinct, got {given}")
    regimes = {label: read_runs_csv(d) for label, d in zip(labels, dirs)}
    out_dir = ensure_dir(out_dir)
    outside = [label for label, d in zip(labels, dirs) if not_pipeline(d)]
    write_text(out_dir / "regimes.md", regimes_markdown(regimes, dict(zip(regimes, map(str, dirs))), outside))
    regimes_figure(regimes, out_dir / "regimes.png")
    return out_dir
