"""Published numbers the reports compare against: the IGNORE paper's ResNet-50 results.

Source: G. Song, N. Kim, J.-S. Lee, J.-H. Lee, "IGNORE: Information Gap-based False Negative Loss Rejection
for Single Positive Multi-Label Learning", ECCV 2024, section 4.2, Table 2 ("Experimental results of our
method with ResNet-50 model on four SPML benchmark datasets"), test mAP in %. Transcribed from the text copy
/work/shared/paper/IGNORE-ECCV2024.txt (Table 2 caption at its line 178); that copy carries no page numbers,
so the page is not given here.

Row -> method id: AN -> an; LS [19] -> an-ls (docs/gpu.md: `paper-resnet50` runs an-ls for this row); ASL -> asl;
ROLE -> role; EM -> em; EM + APL -> em-apl; LL-R -> ll-r; "+ BoostLU" (BoostLU on LL-R) -> boostlu;
Ours -> ignore. Skipped: "ROLE + LI" (ROLE with LinearInit: no method module). Table 2 has no full-label
(fully annotated) row, so there is no published AN/full ratio or gap closed to compare with.

The methods published after IGNORE (gr-loss, vlpl, aevlp) are not in Table 2 and are not added here: their
numbers come from other papers' runs, so they would not make a rank agreement with one table. They are listed
with their sources in docs/methods/README.md and docs/gpu.md.
"""

from __future__ import annotations

TABLE2_SOURCE = "IGNORE (Song et al., ECCV 2024), Table 2: ResNet-50, test mAP (%)"

# paper column -> method id -> test mAP (%), exactly as printed (two decimals)
TABLE2_RESNET50: dict[str, dict[str, float]] = {
    "VOC": {"an": 85.89, "an-ls": 87.90, "asl": 87.76, "role": 87.77, "em": 89.09, "em-apl": 89.19,
            "ll-r": 88.27, "boostlu": 89.29, "ignore": 89.19},
    "COCO": {"an": 64.92, "an-ls": 67.15, "asl": 68.78, "role": 67.04, "em": 70.70, "em-apl": 70.87,
             "ll-r": 70.70, "boostlu": 72.89, "ignore": 72.00},
    "NUS": {"an": 42.27, "an-ls": 43.77, "asl": 46.93, "role": 41.63, "em": 47.15, "em-apl": 47.59,
            "ll-r": 48.76, "boostlu": 49.59, "ignore": 50.08},
    "CUB": {"an": 18.31, "an-ls": 16.26, "asl": 18.81, "role": 13.66, "em": 20.85, "em-apl": 21.84,
            "ll-r": 19.56, "boostlu": 19.80, "ignore": 21.90},
}

# Table 2 rows with no method module here (left out of every comparison)
TABLE2_SKIPPED_ROWS = {"ROLE + LI": "ROLE with LinearInit: no method module"}

# our dataset name -> Table 2 column (an ordering check only for the embedded sets: the numbers are not
# comparable). synthetic has VOC's label statistics and 20 classes, so it is compared with the VOC column;
# synthetic-dense has CUB's share of false negatives among the unannotated entries (9.2 %; CUB 9.8 %), so with
# the CUB column, although its methods run their 20-class (VOC) settings.
PAPER_COLUMN = {"voc2012": "VOC", "coco2014": "COCO", "nuswide": "NUS", "cub": "CUB", "synthetic": "VOC",
                "synthetic-dense": "CUB"}


def table2_column(dataset: str) -> str | None:
    """The Table 2 column our ``dataset`` is compared with, or None when the paper has none."""
    return PAPER_COLUMN.get(dataset)


def table2(dataset: str) -> dict[str, float]:
    """Method id -> published ResNet-50 test mAP for ``dataset``'s Table 2 column (empty when none)."""
    column = table2_column(dataset)
    return dict(TABLE2_RESNET50[column]) if column else {}
