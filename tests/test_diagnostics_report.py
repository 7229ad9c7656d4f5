"""reports/diagnostics.{md,png}: generic over every method whose history has fn_* columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.diagnostics_report import (
    PANELS,
    collect_histories,
    diagnostics_figure,
    diagnostics_markdown,
    panel_members,
)


def _write(runs: Path, method: str, seed: int, rows: list[dict]) -> None:
    d = runs / "synthetic" / method / str(seed)
    d.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(d / "history.csv", index=False)


def test_table_excludes_warmup_and_prints_base_rate_and_lift(tmp_path):
    runs = tmp_path / "runs"
    # ignore-like: fn_active marks the warm-up; seed 0 and 1 differ so the seed mean is checked
    for seed, prec in ((0, 0.3), (1, 0.5)):
        _write(runs, "ignore", seed, [
            {"epoch": 1, "val_map": 10, "fn_active": 0, "fn_flagged": 0, "fn_precision": 0.0, "fn_recall": 0.0,
             "fn_f1": 0.0, "fn_tn_ratio": 0.0, "fn_base_rate": 0.1, "gap_sp": 0.1, "tau": 0.05},
            {"epoch": 2, "val_map": 11, "fn_active": 1, "fn_flagged": 10, "fn_precision": prec, "fn_recall": 0.2,
             "fn_f1": 0.25, "fn_tn_ratio": 0.6, "fn_base_rate": 0.1, "gap_sp": 0.2, "tau": 0.1},
        ])
    # a baseline without fn_active: active epochs are those with flagged entries
    _write(runs, "ll-r", 0, [
        {"epoch": 1, "val_map": 10, "fn_flagged": 0, "fn_precision": 0.0, "fn_recall": 0.0, "fn_f1": 0.0,
         "fn_tn_ratio": 0.0, "fn_base_rate": 0.2},
        {"epoch": 2, "val_map": 12, "fn_flagged": 5, "fn_precision": 0.6, "fn_recall": 0.1, "fn_f1": 0.17,
         "fn_tn_ratio": 1.5, "fn_base_rate": 0.2},
    ])
    _write(runs, "an", 0, [{"epoch": 1, "val_map": 10, "train_loss": 0.2}])  # no diagnostics: left out
    hist = collect_histories(["synthetic"], ["an", "ignore", "ll-r"], [0, 1], runs)
    assert set(hist.method) == {"ignore", "ll-r"}
    md = diagnostics_markdown(hist)
    active = md.split("## Last epoch")[0]
    ignore_row = next(ln for ln in active.splitlines() if ln.startswith("| synthetic | ignore |"))
    cells = [c.strip() for c in ignore_row.strip("|").split("|")]
    # seeds 2, 1 active epoch, base rate 0.1, precision mean(0.3, 0.5) = 0.4, lift 4.00x
    assert cells[2:5] == ["2", "1", "0.1000"] and "0.400" in cells and cells[-1] == "4.00x"
    llr_row = next(ln for ln in active.splitlines() if ln.startswith("| synthetic | ll-r |"))
    assert "0.600" in llr_row and "3.00x" in llr_row and "0.2000" in llr_row
    out = tmp_path / "diag.png"
    diagnostics_figure(hist, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_grid_still_writes_both_outputs(tmp_path):
    hist = collect_histories(["synthetic"], ["an"], [0], tmp_path / "runs")
    assert "No run in the params grid" in diagnostics_markdown(hist)
    diagnostics_figure(hist, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


def _fn(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "fn_flagged": 3, "fn_precision": 0.4, "fn_recall": 0.1, "fn_f1": 0.16,
            "fn_tn_ratio": 0.7, "fn_base_rate": 0.1} | extra


def test_each_panel_lists_only_the_methods_that_record_its_quantity(tmp_path):
    runs = tmp_path / "runs"
    gaps = {"gap_sp": 0.1, "gap_tn": 0.05, "gap_fn": 0.2, "tau": 0.1, "fn_active": 1}
    _write(runs, "ignore", 0, [_fn(1, **gaps, mask_pos_kept=0.9, mask_other_removed=0.3)])
    _write(runs, "ignore-gap", 0, [_fn(1, **gaps)])  # no mask coverage recorded (no instance masks)
    _write(runs, "ll-r", 0, [_fn(1)])
    _write(runs, "plc", 0, [_fn(1)])
    _write(runs, "an", 0, [{"epoch": 1, "val_map": 10}])
    hist = collect_histories(["synthetic"], ["an", "ll-r", "plc", "ignore-gap", "ignore"], [0], runs)
    members = panel_members(hist)
    fn_curves = ["ll-r", "plc", "ignore-gap", "ignore"]
    assert members == {"fn_precision": fn_curves, "fn_recall": fn_curves, "fn_f1": fn_curves,
                       "gap": ["ignore-gap", "ignore"], "fn_tn_ratio": fn_curves, "tau": ["ignore-gap", "ignore"],
                       "mask": ["ignore"]}
    # list order = panel order; every panel key is one of PANELS
    assert list(members) == [key for key, _, _ in PANELS]
    diagnostics_figure(hist, tmp_path / "d.png")
    first = (tmp_path / "d.png").read_bytes()
    diagnostics_figure(hist, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes() == first  # deterministic bytes (no version or time metadata)


def test_panels_nobody_fills_are_left_out_and_datasets_prefix_the_labels(tmp_path):
    runs = tmp_path / "runs"
    for dataset in ("synthetic", "voc2012"):
        d = runs / dataset / "ll-r" / "0"
        d.mkdir(parents=True)
        pd.DataFrame([_fn(1), _fn(2)]).to_csv(d / "history.csv", index=False)
    hist = collect_histories(["synthetic", "voc2012"], ["ll-r"], [0], runs)
    members = panel_members(hist)
    assert set(members) == {"fn_precision", "fn_recall", "fn_f1", "fn_tn_ratio"}
    assert members["fn_f1"] == ["synthetic/ll-r", "voc2012/ll-r"]
    assert panel_members(pd.DataFrame()) == {}


def test_a_clip_method_with_random_weights_is_marked(tmp_path):
    """A CLIP-based method trained with random CLIP weights (history clip_meaningful 0) flags noise: its rows
    and legend entry carry the mark, with the footnote; one with real weights (1) does not."""
    runs = tmp_path / "runs"
    row = {"epoch": 1, "val_map": 10, "fn_flagged": 5, "fn_precision": 0.1, "fn_recall": 0.1, "fn_f1": 0.1,
           "fn_tn_ratio": 0.1, "fn_base_rate": 0.1}
    _write(runs, "vlpl", 0, [{**row, "clip_meaningful": 0.0}])
    _write(runs, "aevlp", 0, [{**row, "clip_meaningful": 1.0}])
    hist = collect_histories(["synthetic"], ["vlpl", "aevlp"], [0], runs)
    assert set(hist.method) == {"vlpl †", "aevlp"}
    md = diagnostics_markdown(hist)
    assert "| synthetic | vlpl † |" in md and "| synthetic | aevlp |" in md
    assert "† random CLIP weights" in md
    diagnostics_figure(hist, tmp_path / "d.png")
