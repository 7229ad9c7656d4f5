"""VOC 2012's label-count distribution from a one-row-per-image classification CSV (docs/embedded-benchmark.md).

    python scripts/voc_label_counts.py classification_train.csv

The CSV is the layout ML-GCN and its descendants write from the devkit's `ImageSets/Main/<class>_train.txt`:
a header `name,aeroplane,...,tvmonitor`, then per image its id and 20 values, 1 (present), 0 (only
"difficult" objects) or -1 (absent). The docs' figures come from hinanmu/MLALP's copy (commit 1376639,
data/voc2012/files/VOC2012/classification_train.csv). Only 1 counts as a positive, as `spml prepare voc2012`
does; the per-class counts are checked against the devkit's Table 1 (params.yaml's data.synthetic.class_weights).
With the real dataset, `spml prepare voc2012 && spml stats voc2012` prints the same from the annotation files.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import NoReturn

import yaml

REPO = Path(__file__).resolve().parents[1]


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2 (as every spml command)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def label_counts(path: Path) -> tuple[list[str], list[list[int]]]:
    """(class names, per image its 20 values) of the CSV; exits with one line on a malformed row."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        fail(f"{path} cannot be read as a CSV ({exc})")
    header, body = (rows[0] if rows else []), [row for row in rows[1:] if row]
    if not header or header[0] != "name" or len(header) != 21:
        fail(f"{path}: expected a header `name,<20 VOC classes>`, got {','.join(header[:3])}...")
    values = []
    for number, row in enumerate(body, start=2):
        if len(row) != 21 or any(v not in {"1", "0", "-1"} for v in row[1:]):
            fail(f"{path} line {number}: expected an id and 20 values of 1, 0 or -1")
        values.append([int(v) for v in row[1:]])
    if not values:
        fail(f"{path} has a header but no image rows")
    return header[1:], values


def histogram(counts: list[int]) -> str:
    total, by_count = len(counts), Counter(counts)
    return ", ".join(f"{k}: {by_count[k]} ({100 * by_count[k] / total:.2f} %)" for k in sorted(by_count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    args = parser.parse_args()
    classes, values = label_counts(args.csv)
    positives = [sum(v == 1 for v in row) for row in values]
    with_difficult = [sum(v >= 0 for v in row) for row in values]
    per_class = [sum(row[c] == 1 for row in values) for c in range(len(classes))]
    table1 = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["synthetic"]["class_weights"]
    print(f"{len(values)} images, {sum(positives)} positive labels, {sum(positives) / len(values):.4f} per image")
    print(f"images by label count (label 1): {histogram(positives)}")
    print(f"counting difficult-only (0) too: {histogram(with_difficult)}, "
          f"{sum(with_difficult) / len(values):.4f} per image")
    mismatch = [f"{name} {ours} (Table 1: {theirs})" for name, ours, theirs in zip(classes, per_class, table1)
                if ours != theirs]
    print("per-class counts: " + ("equal to the devkit's Table 1 (train img)" if not mismatch
                                  else "differ from Table 1: " + ", ".join(mismatch)))


if __name__ == "__main__":
    main()
