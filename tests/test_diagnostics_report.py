"""reports/diagnostics.{md,png}: generic over every method whose history has fn_* columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.diagnostics_report import collect_histories, diagnostics_figure, diagnostics_markdown


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
