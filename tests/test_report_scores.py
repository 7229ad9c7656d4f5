"""results.md / summary.json field scores: AN/full, gap closed, Kendall tau-b against the paper's Table 2."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import published
from pipeline.report import (
    RUN_COLUMNS,
    an_full_ratio,
    gap_closed,
    kendall_tau_b,
    paper_agreement,
    results_markdown,
    summary_metrics,
)


def _runs(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """(dataset, method, seed, test_map) -> a runs table with every RUN_COLUMNS column."""
    return pd.DataFrame([{"dataset": d, "method": m, "model": "resnet50", "seed": s, "protocol": "unified",
                          "val_map": t + 1, "test_map": t, "best_epoch": 1, "epochs": 2, "train_seconds": 1.0,
                          "test_classes_without_positives": 0} for d, m, s, t in rows], columns=RUN_COLUMNS)


def test_an_full_ratio_and_gap_closed_by_hand():
    means = {"an": 30.0, "full": 60.0, "good": 45.0, "bad": 24.0, "best": 66.0}
    assert an_full_ratio(means) == pytest.approx(0.5)
    # 100 (m - an) / (full - an): (45-30)/30 = 50 %, (24-30)/30 = -20 %, (66-30)/30 = 120 %
    assert gap_closed(means) == {"an": None, "full": None, "good": pytest.approx(50.0),
                                 "bad": pytest.approx(-20.0), "best": pytest.approx(120.0)}
    # no full run (or no an run, or no gap): nothing is defined
    assert an_full_ratio({"an": 30.0, "good": 45.0}) is None
    assert gap_closed({"an": 30.0, "good": 45.0}) == {"an": None, "good": None}
    assert gap_closed({"full": 60.0, "good": 45.0}) == {"full": None, "good": None}
    assert gap_closed({"an": 30.0, "full": 30.0, "good": 45.0})["good"] is None


def test_kendall_tau_b_by_hand():
    # one swapped pair of 6: (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: x ties pair (1,2), y ties pair (2,3); the other 4 pairs concordant -> 4 / sqrt((6-1)(6-1)) = 0.8
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    # every pair tied in one sample, or too few items: undefined
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert kendall_tau_b([1], [2]) is None
    with pytest.raises(ValueError):
        kendall_tau_b([1, 2], [1])


def test_kendall_tau_b_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    x, y = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0]
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)


def test_paper_agreement_needs_three_common_methods_and_a_column():
    assert paper_agreement({"an": 1.0, "em": 2.0, "plc": 3.0}, "voc2012") == (None, ["an", "em"])
    tau, common = paper_agreement({"an": 1.0, "em": 2.0, "ignore": 3.0}, "synthetic")  # synthetic -> VOC
    assert common == ["an", "em", "ignore"] and tau == pytest.approx(1.0)  # VOC: 85.89 < 89.09 < 89.19
    assert paper_agreement({"an": 1.0, "em": 2.0, "ignore": 3.0}, "mydata") == (None, [])


def test_published_table2_transcription_is_complete():
    for column in ("VOC", "COCO", "NUS", "CUB"):
        assert set(published.TABLE2_RESNET50[column]) == {"an", "an-ls", "asl", "role", "em", "em-apl", "ll-r",
                                                          "boostlu", "ignore"}
    assert published.table2("coco2014")["boostlu"] == 72.89 and published.table2("cub")["ignore"] == 21.90
    assert published.table2_column("synthetic") == "VOC" and published.table2("mydata") == {}


FAKE = _runs([("voc2012", "an", 0, 60.0), ("voc2012", "an", 1, 62.0), ("voc2012", "full", 0, 81.0),
              ("voc2012", "em", 0, 71.0), ("voc2012", "ignore", 0, 66.0), ("voc2012", "ll-r", 0, 59.0),
              ("mydata", "an", 0, 10.0), ("mydata", "full", 0, 20.0), ("mydata", "em", 0, 12.0)])
METHODS, DATASETS = ["an", "full", "em", "ignore", "ll-r"], ["voc2012", "mydata"]


def test_results_md_has_the_field_score_columns():
    text = results_markdown(FAKE, METHODS, DATASETS)
    section = text.split("## Gap closed and agreement")[1]
    for term in ("**gap closed**", "**paper (Table 2)**", "**AN/full**", "**Kendall tau**", "synthetic"):
        assert term in section
    voc = section.split("### voc2012")[1].split("### mydata")[0]
    # an = 61, full = 81: AN/full 0.75; em (71-61)/20 = +50 %, ignore +25 %, ll-r -10 %.
    # ours em > ignore > an > ll-r, Table 2 VOC ignore > em > ll-r > an: pairs C = 4, D = 2 -> tau 2/6
    # an's two seeds (60, 62) never cross another method: the bootstrap interval is tau itself
    assert ("AN/full = 0.75; Kendall tau vs Table 2 (VOC) = 0.33 (95 % bootstrap interval over seeds: +0.33 to "
            "+0.33) over n = 4 methods (an, em, ignore, ll-r)") in voc
    assert "| method | test mAP | s.e. | gap closed (%) | paper (Table 2) |" in voc
    # s.e. of an: std(60, 62) = sqrt(2), / sqrt(2) = 1.00; one seed: –
    assert "| an | 61.00 | 1.00 |  | 85.89 |" in voc and "| full | 81.00 | – |  | – |" in voc
    assert "| em | 71.00 | – | +50.0 | 89.09 |" in voc and "| ll-r | 59.00 | – | -10.0 | 88.27 |" in voc
    mine = section.split("### mydata")[1]
    assert "AN/full = 0.50; Kendall tau vs Table 2 = – (Table 2 has no column for this dataset)" in mine
    assert "| em | 12.00 | – | +20.0 | – |" in mine


def test_kendall_bootstrap_interval_over_seeds():
    """an (50, 50) < ignore (65, 65); em's seeds (60, 70) redraw to a mean of 60, 65 or 70 (p = 1/4, 1/2, 1/4).
    Table 2 (VOC): an < em < ignore. em 60: every pair concordant, tau 1; em 65 ties ignore: C = 2, D = 0, one
    pair tied in ours, tau_b = 2 / sqrt(2 * 3) = 0.816; em 70: C = 2, D = 1, tau 1/3. Each has >= 2.5 % of the
    rounds, so the 95 % interval is [1/3, 1]; with 1 seed per method there is no interval."""
    from pipeline.report import kendall_interval

    runs = _runs([("voc2012", "an", 0, 50.0), ("voc2012", "an", 1, 50.0), ("voc2012", "em", 0, 60.0),
                  ("voc2012", "em", 1, 70.0), ("voc2012", "ignore", 0, 65.0), ("voc2012", "ignore", 1, 65.0)])
    low, high = kendall_interval(runs, "voc2012", ["an", "em", "ignore"])
    assert low == pytest.approx(1 / 3) and high == pytest.approx(1.0)
    assert kendall_interval(runs[runs.seed == 0], "voc2012", ["an", "em", "ignore"]) is None
    summary = summary_metrics(runs)["voc2012"]
    assert summary["kendall_tau"] == pytest.approx(0.8165, abs=1e-4)
    assert summary["kendall_tau_interval"] == [pytest.approx(1 / 3, abs=1e-4), 1.0]


def test_results_md_says_why_tau_is_missing():
    text = results_markdown(FAKE[FAKE.method.isin(["an", "em"])], ["an", "em"], ["voc2012"])
    assert ("AN/full = – (needs both an and full); Kendall tau vs Table 2 (VOC) = – over n = 2 methods (an, em), "
            "needs at least 3") in text


def test_summary_json_has_the_field_scores():
    summary = summary_metrics(FAKE)
    voc = summary["voc2012"]
    assert voc["an_full_ratio"] == pytest.approx(61 / 81, abs=1e-4)
    assert voc["kendall_tau"] == pytest.approx(1 / 3, abs=1e-4) and voc["kendall_n"] == 4
    assert voc["em"]["gap_closed"] == pytest.approx(50.0) and voc["an"]["gap_closed"] is None
    assert voc["an"]["test_map_mean"] == 61.0 and voc["an"]["n"] == 2
    assert summary["mydata"]["kendall_tau"] is None and summary["mydata"]["kendall_n"] == 0


# ------------------------------------------------------------------------------------- compare-regimes

def _regime_dir(tmp_path, name: str, rows: list[tuple[str, str, int, float]]):
    folder = tmp_path / name
    folder.mkdir()
    _runs(rows).to_csv(folder / "runs.csv", index=False)
    return folder


def _invoke(*args):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["compare-regimes", *map(str, args)])


def _one_line_error(result, *fragments: str) -> None:
    text = " ".join(result.output.split())  # rich may wrap a long line
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)


def test_compare_regimes_writes_table_and_figure(tmp_path):
    a = _regime_dir(tmp_path, "a", [("synthetic", "an", 0, 30.0), ("synthetic", "full", 0, 60.0),
                                    ("synthetic", "em", 0, 44.0), ("synthetic", "em", 1, 46.0),
                                    ("synthetic", "ignore", 0, 36.0)])
    b = _regime_dir(tmp_path, "b", [("synthetic", "an", 0, 50.0), ("synthetic", "full", 0, 70.0),
                                    ("synthetic", "em", 0, 55.0), ("synthetic", "ignore", 0, 65.0),
                                    ("synthetic", "plc", 0, 40.0)])
    out = tmp_path / "regimes"
    result = _invoke(a, b, "--label", "scratch", "--label", "pretrained", "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "regimes.md").read_text()
    assert (out / "regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # scratch: gaps (45-30)/30 = +50 %, (36-30)/30 = +20 %; ours an < em > ignore vs VOC an < em < ignore:
    # C = 2, D = 1 -> tau 1/3. pretrained: (55-50)/20 = +25 %, (65-50)/20 = +75 %, (40-50)/20 = -50 %; tau 1
    assert ("- scratch: AN/full = 0.50; Kendall tau vs Table 2 (VOC) = 0.33 (95 % bootstrap interval over seeds: "
            "+0.33 to +0.33) over n = 3 methods (an, em, ignore)" in md)
    assert "- pretrained: AN/full = 0.71; Kendall tau vs Table 2 (VOC) = 1.00 over n = 3 methods" in md
    assert ("| method | test mAP (scratch) | test mAP (pretrained) | gap closed (scratch, %) "
            "| gap closed (pretrained, %) |") in md
    assert "| em | 45.00 ± 1.41 (n=2) | 55.00 (n=1) | +50.0 | +25.0 |" in md
    assert "| an | 30.00 (n=1) | 50.00 (n=1) |  |  |" in md
    assert "| plc | – | 40.00 (n=1) |  | -50.0 |" in md


@pytest.mark.parametrize("content, fragments", [
    (None, ["runs.csv does not exist"]),
    ("a,b\n1,2\n", ["lacks the column(s) dataset, method, test_map"]),
    ("dataset,method,test_map\nsynthetic,an,1\nsynthetic,em,abc\n", ["not a finite number (abc on line 3)"]),
    ("", ["is not a readable CSV"]),
    ("dataset,method,test_map\n", ["has no runs"]),
])
def test_compare_regimes_bad_runs_csv_is_one_line_error(tmp_path, content, fragments):
    good = _regime_dir(tmp_path, "good", [("synthetic", "an", 0, 30.0)])
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "runs.csv").write_text(content)
    out = tmp_path / "regimes"
    _one_line_error(_invoke(good, bad, "--out", out), str(bad / "runs.csv"), *fragments)
    assert not out.exists()  # nothing written


def test_compare_regimes_checks_the_labels(tmp_path):
    a = _regime_dir(tmp_path, "a", [("synthetic", "an", 0, 30.0)])
    b = _regime_dir(tmp_path, "b", [("synthetic", "an", 0, 31.0)])
    _one_line_error(_invoke(a, b, "--label", "x", "--out", tmp_path / "o"), "one non-empty name per folder (2;")
    _one_line_error(_invoke(a, b, "--label", "x", "--label", "x", "--out", tmp_path / "o"), "--label must be distinct")
    _one_line_error(_invoke(a, b, "--labels", "x,y", "--out", tmp_path / "o"), "--labels is now --label")
    # a label may hold a comma: one value per --label
    assert _invoke(a, b, "--label", "scratch, v1", "--label", "x", "--out", tmp_path / "c").exit_code == 0
    assert "**scratch, v1** (" in (tmp_path / "c" / "regimes.md").read_text()
    _one_line_error(_invoke(a, "--out", tmp_path / "o"), "needs at least two runs folders")
    # default labels are the folder names; no an/full pair still writes both files
    assert _invoke(a, b, "--out", tmp_path / "o").exit_code == 0
    assert "**a** (" in (tmp_path / "o" / "regimes.md").read_text() and (tmp_path / "o" / "regimes.png").exists()


def test_runs_with_random_clip_weights_are_marked_and_left_out_of_the_scores(tmp_path, monkeypatch):
    """A run whose history says its CLIP scores were random (clip_meaningful 0) is marked † with a footnote in
    results.md, flagged in summary.json and runs.csv, and has no gap closed nor a place in Kendall tau."""
    from pipeline.report import RANDOM_CLIP, collect_runs, dataset_scores

    monkeypatch.chdir(tmp_path)
    rows = [("voc2012", m, 0, t) for m, t in (("an", 80.0), ("full", 90.0), ("em", 85.0), ("ignore", 86.0),
                                              ("vlpl", 88.0), ("aevlp", 70.0))]
    for _, method, seed, test_map in rows:
        folder = tmp_path / "runs" / "voc2012" / method / str(seed)
        folder.mkdir(parents=True)
        metrics = _runs([("voc2012", method, seed, test_map)]).iloc[0].to_dict() | {"versions": {"torch": "x"}}
        (folder / "metrics.json").write_text(pd.Series(metrics).to_json())
        if method in ("vlpl", "aevlp"):  # vlpl: random CLIP weights; aevlp: real ones
            history = pd.DataFrame({"epoch": [1, 2], "clip_meaningful": [0.0, 0.0] if method == "vlpl" else [1.0, 1.0]})
            history.to_csv(folder / "history.csv", index=False)
    methods = [m for _, m, _, _ in rows]
    runs = collect_runs(["voc2012"], methods, [0])
    assert dict(zip(runs.method, runs[RANDOM_CLIP])) == {m: m == "vlpl" for m in methods}
    scores = dataset_scores(runs, "voc2012")
    assert scores["unmeasured"] == ["vlpl"] and scores["gap_closed"]["vlpl"] is None
    assert scores["gap_closed"]["aevlp"] == pytest.approx(-100.0)
    assert "vlpl" not in scores["kendall_methods"] and scores["kendall_methods"] == ["an", "em", "ignore"]
    md = results_markdown(runs, methods, ["voc2012"])
    assert "| vlpl | 88.00 † | 1 |" in md and "| aevlp | 70.00 | 1 |" in md
    assert "| vlpl † | 88.00 † | – | † | – |" in md
    assert md.count("† random CLIP weights") == 3  # under the test and val tables, and the field scores
    summary = summary_metrics(runs)["voc2012"]
    assert summary["vlpl"][RANDOM_CLIP] is True and summary["vlpl"]["gap_closed"] is None
    assert RANDOM_CLIP not in summary["aevlp"]
    # runs.csv round trip (compare-regimes reads it back): still marked
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert dataset_scores(pd.read_csv(tmp_path / "runs.csv"), "voc2012")["unmeasured"] == ["vlpl"]


def test_compare_regimes_carries_a_not_made_by_the_pipeline_line(tmp_path):
    rows = [("synthetic", "an", 0, 30.0), ("synthetic", "full", 0, 60.0), ("synthetic", "em", 0, 44.0)]
    old, new = _regime_dir(tmp_path, "old", rows), _regime_dir(tmp_path, "new", rows)
    (old / "results.md").write_text("> **Not made by the pipeline.** By hand.\n\n# Results\n")
    (new / "results.md").write_text("# Results\n")
    result = _invoke(old, new, "--label", "v1", "--label", "v2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    first = (tmp_path / "out" / "regimes.md").read_text().splitlines()[0]
    assert first.startswith("> **Not made by the pipeline (partly):** the regime(s) v1 come from tables made outside")
    result = _invoke(new, new.parent / "new", "--label", "a", "--label", "b", "--out", tmp_path / "out2")
    assert (tmp_path / "out2" / "regimes.md").read_text().startswith("# Regime comparison")
