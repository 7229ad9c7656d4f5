"""`spml import-npy` / `spml export-npy`: the field's formatted files in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from real_fixtures import make_coco, make_voc
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tables import read_label_table

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def community_observed(labels: np.ndarray, seed: int = 1200) -> np.ndarray:
    """generate_observed_labels.py as specified (baselines.md 1.2), written out step by step here."""
    signed = labels.copy()
    signed[signed == 0] = -1
    rng = np.random.RandomState(seed)
    observed = np.zeros_like(signed)
    for i in range(signed.shape[0]):
        positive = np.nonzero(signed[i] == 1)[0]
        rng.shuffle(positive)
        observed[i, positive[:1]] = 1
        negative = np.nonzero(signed[i] == -1)[0]
        rng.shuffle(negative)  # consumes draws although num_neg = 0 selects nothing
        observed[i, negative[:0]] = -1
    return observed


def make_formatted(folder: Path, images_root: Path, n_train=40, n_val=16, num_classes=6, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for phase, n in (("train", n_train), ("val", n_val)):
        labels = (rng.random((n, num_classes)) < 0.3).astype(np.float64)
        labels[np.arange(n), rng.integers(0, num_classes, n)] = 1
        labels[3] = 0  # an unlabeled row
        images = np.asarray([f"{phase}/img_{k:03d}.png" for k in range(n)][::-1])  # file order, not sorted
        for rel in images:
            (images_root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(images_root / rel)
        np.save(folder / f"formatted_{phase}_images.npy", images)
        np.save(folder / f"formatted_{phase}_labels.npy", labels)
        out[phase] = (images, labels)
    return out


def test_import_prepare_sample_export_roundtrip(workspace, tmp_path):
    given = make_formatted(tmp_path / "npy", tmp_path / "imgs")
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine", "--images", tmp_path / "imgs")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("data/imported.json").read_text())["mine"]["images"] == str((tmp_path / "imgs").resolve())
    for stage in ("prepare", "sample"):
        assert invoke(stage, "mine").exit_code == 0
    table = read_label_table("data/prepared/mine.parquet")
    assert table.class_names == [f"class_{k:03d}" for k in range(6)]
    assert (table.split == "train").sum() == 32 and (table.split == "val").sum() == 8
    assert (table.split == "test").sum() == 16
    out = tmp_path / "export"
    assert invoke("export-npy", "mine", out).exit_code == 0
    for phase in ("train", "val"):
        images = np.load(out / f"formatted_{phase}_images.npy")
        labels = np.load(out / f"formatted_{phase}_labels.npy")
        observed = np.load(out / f"formatted_{phase}_labels_obs.npy")
        assert list(images) == list(given[phase][0])  # community row order
        assert labels.dtype == np.float64 and np.array_equal(labels, given[phase][1])
        assert observed.dtype == np.float64 and set(np.unique(observed)) <= {0.0, 1.0}
        assert np.array_equal(observed, community_observed(given[phase][1]))
    # the exported files import again to the same table
    result = invoke("import-npy", out, "--name", "again", "--images", tmp_path / "imgs")
    assert result.exit_code == 0, result.output
    assert invoke("prepare", "again").exit_code == 0
    again = read_label_table("data/prepared/again.parquet")
    assert np.array_equal(again.labels, table.labels) and list(again.path) == list(table.path)
    assert list(again.split) == list(table.split)
    # and trains like any dataset
    result = invoke("train", "mine", "an", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert Path("runs/mine/an/0/metrics.json").exists()


def test_export_of_real_formats_matches_community_sampling(workspace, tmp_path):
    make_voc(tmp_path / "voc")
    make_coco(tmp_path / "coco")
    for name, src in (("voc2012", tmp_path / "voc"), ("coco2014", tmp_path / "coco")):
        for args in (("download", name, "--source", src), ("prepare", name), ("sample", name),
                     ("export-npy", name, tmp_path / f"out-{name}")):
            result = invoke(*args)
            assert result.exit_code == 0, (args, result.output)
        table = read_label_table(f"data/prepared/{name}.parquet")
        for phase, split in (("train", "train"), ("val", "test")):
            labels = np.load(tmp_path / f"out-{name}" / f"formatted_{phase}_labels.npy")
            observed = np.load(tmp_path / f"out-{name}" / f"formatted_{phase}_labels_obs.npy")
            images = np.load(tmp_path / f"out-{name}" / f"formatted_{phase}_images.npy")
            assert list(images) == list(table.path[table.official_rows(split)])
            assert np.array_equal(observed, community_observed(labels))


def test_import_bad_input(workspace, tmp_path):
    make_formatted(tmp_path / "npy", tmp_path / "imgs")
    result = invoke("import-npy", tmp_path / "npy", "--name", "voc2012")
    assert result.exit_code == 2 and "built-in dataset" in result.output
    result = invoke("import-npy", tmp_path / "npy", "--name", "Bad-Name")
    assert result.exit_code == 2 and "lower-case" in result.output
    np.save(tmp_path / "npy" / "formatted_val_labels.npy", np.full((16, 6), 2.0))
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine")
    assert result.exit_code == 2 and "formatted_val_labels.npy must hold only 0/1 labels" in result.output
    (tmp_path / "npy" / "formatted_val_labels.npy").unlink()
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine")
    assert result.exit_code == 2 and "formatted_val_labels.npy does not exist" in " ".join(result.output.split())
    np.save(tmp_path / "npy" / "formatted_val_labels.npy", np.zeros((5, 6)))
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine")
    assert result.exit_code == 2 and "N = 16 rows" in " ".join(result.output.split())
    assert not Path("data/imported.json").exists() and not Path("data/raw/mine").exists()
    result = invoke("prepare", "mine")
    assert result.exit_code == 2 and "unknown dataset 'mine'" in result.output


def test_export_needs_matching_tables(workspace, tmp_path):
    make_voc(tmp_path / "voc")
    result = invoke("export-npy", "voc2012", tmp_path / "out")
    assert result.exit_code == 2 and "spml prepare" in result.output
    assert not (tmp_path / "out" / "formatted_train_labels.npy").exists()
