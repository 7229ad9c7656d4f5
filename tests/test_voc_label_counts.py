"""scripts/voc_label_counts.py on a tiny CSV in ML-GCN's VOC layout, against counts by hand."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def load_script():
    spec = importlib.util.spec_from_file_location("voc_label_counts", REPO / "scripts" / "voc_label_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name: str, ones: list[int], zeros: list[int] = ()) -> str:
    return ",".join([name] + ["1" if c in ones else "0" if c in zeros else "-1" for c in range(20)])


def test_counts_by_hand(tmp_path, monkeypatch, capsys):
    # 3 images: {horse, person}, {bottle} with a difficult-only chair, {person}: 4 labels, 1 / 2 labels 2 / 1
    csv = tmp_path / "classification_train.csv"
    csv.write_text("\n".join(["name," + ",".join(CLASSES), row("a", [12, 14]), row("b", [4], [8]),
                              row("c", [14])]) + "\n")
    monkeypatch.setattr(sys, "argv", ["voc_label_counts.py", str(csv)])
    load_script().main()
    out = capsys.readouterr().out
    assert "3 images, 4 positive labels, 1.3333 per image" in out
    assert "(label 1): 1: 2 (66.67 %), 2: 1 (33.33 %)" in out
    assert "counting difficult-only (0) too: 1: 1 (33.33 %), 2: 2 (66.67 %), 1.6667 per image" in out
    assert "differ from Table 1: aeroplane 0 (Table 1: 327)" in out  # a 3-image file is not VOC's train split


@pytest.mark.parametrize("text, message", [
    ("name," + ",".join(CLASSES) + "\n" + row("a", [1]) + ",2\n", "line 2: expected an id and 20 values"),
    ("name," + ",".join(CLASSES) + "\n", "has a header but no image rows"),
    ("", "expected a header"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, text, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    monkeypatch.setattr(sys, "argv", ["voc_label_counts.py", str(csv)])
    with pytest.raises(SystemExit) as exit_info:
        load_script().main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
