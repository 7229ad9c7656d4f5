"""The real-format input bench (pipeline/tools/input_bench.py): COCO-like JPEGs in COCO's layout, the official-style
loader against ours with the same augmentation per sample, and `spml bench --loader --dataset coco2014` smoke runs
(no timing assertions)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bench import ABSENT_ON_GPU_MACHINE, REPO, spml_without
from torchvision.transforms import autoaugment
from typer.testing import CliRunner

from pipeline import augment as A
from pipeline.cli import app
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, ImageArray, TrainSet, cached_images
from pipeline.errors import SpmlError
from pipeline.tools.coco_like import COCO_SIZES, photo_like, write_coco_like
from pipeline.tools.input_bench import OfficialStyleSet, coco_train_rows, run_input_bench

NUM_OPS, MAGNITUDE, SIZE = 3, 5, 48


def test_coco_like_files_are_in_cocos_layout_at_its_sizes_and_file_sizes(tmp_path):
    """The COCO 2014 source reads the generated folder (images checked); coco_train_rows gives its training rows;
    the files are JPEGs at COCO's sizes with photo-like byte counts; the same seed writes the same bytes."""
    from pipeline.datasets.coco2014 import Coco2014

    files = write_coco_like(tmp_path / "a", 6, num_val=2, seed=0)
    params = Coco2014.Params(source=None, images=True, loader="arrow", check_images=True)
    splits = Coco2014().load_official(files.root, params)
    assert len(splits.train.paths) == 6 and len(splits.test.paths) == 2 and len(splits.class_names) == 80
    assert sorted(splits.train.paths) == sorted(files.train_paths)
    paths, labels = coco_train_rows(files.root, 6)
    assert paths == splits.train.paths and np.array_equal(labels, splits.train.labels)
    pixels = 0
    for rel in paths:
        with Image.open(files.root / rel) as image:
            assert image.format == "JPEG" and image.size in COCO_SIZES and image.mode == "RGB"
            pixels += image.size[0] * image.size[1]
    # bytes per 640x480 worth of pixels: 180 KB on average at seed 0's 48 images (COCO: 163 KB per image)
    assert 120_000 < files.total_bytes / pixels * 640 * 480 < 240_000
    assert write_coco_like(tmp_path / "b", 6, num_val=2, seed=0).total_bytes == files.total_bytes
    assert photo_like(np.random.default_rng(0), 32, 24, gray=True).mode == "L"


@pytest.fixture
def jpegs(tmp_path) -> tuple[Path, list[str]]:
    """Files larger and smaller than the training size, one grayscale: RandAugment runs at their own size."""
    rng = np.random.default_rng(1)
    rel = []
    for k, (w, h) in enumerate([(96, 72), (72, 96), (40, 30), (80, 60)]):
        photo_like(rng, w, h, gray=k == 3).save(tmp_path / f"{k}.jpg", "JPEG", quality=90)
        rel.append(f"{k}.jpg")
    return tmp_path, rel


def _recording(monkeypatch) -> list[tuple[str, float, tuple[int, int]]]:
    """Every RandAugment op applied, with its signed magnitude and the size of the image it acts on."""
    applied = []
    apply_op = autoaugment._apply_op

    def record(img, name, magnitude, interpolation, fill):
        size = img.size[::-1] if isinstance(img, Image.Image) else tuple(img.shape[-2:])
        applied.append((name, magnitude, size))
        return apply_op(img, name, magnitude, interpolation, fill)

    monkeypatch.setattr(autoaugment, "_apply_op", record)
    return applied


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """The official loader's normalised view back to uint8 levels."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((normalised * std + mean) * 255).round().to(torch.int32)


def test_ours_and_the_official_style_loader_draw_the_same_augmentation_per_sample(jpegs, tmp_path, monkeypatch):
    """Seeded alike, both loaders apply the same RandAugment ops with the same magnitudes to images of the same
    (full-resolution) size, and the same flips: the weak views are equal, the strong views equal to within the
    resize kernels' 1 level (torch's against PIL's)."""
    root, rel = jpegs
    labels = torch.zeros(len(rel), 5)
    cache = cached_images(root, rel, SIZE, tmp_path / "cache", "x")
    ours = TrainSet(ImageArray(cache), labels, labels, True, NUM_OPS, MAGNITUDE, source=(root, rel))
    official = OfficialStyleSet(root, rel, labels, labels, SIZE, True, NUM_OPS, MAGNITUDE)
    applied = _recording(monkeypatch)
    ops_seen = set()
    for i in range(len(rel)):
        for seed in range(12):
            applied.clear()
            mine = ours[(i, seed)]
            ours_ops = list(applied)
            applied.clear()
            theirs = official[(i, seed)]
            assert ours_ops == applied and len(applied) == NUM_OPS, (i, seed)
            with Image.open(root / rel[i]) as file:
                assert {size for _, _, size in applied} == {file.size[::-1]}  # full resolution in both
            ops_seen.update(name for name, _, _ in applied)
            assert torch.equal(mine["image"].int(), _pixels(theirs["image"])), (i, seed)
            assert int((mine["strong"].int() - _pixels(theirs["strong"])).abs().max()) <= 1, (i, seed)
    assert len(ops_seen) >= 12  # most of RandAugment's 14 ops were compared


def test_device_views_draw_the_official_ops_with_magnitudes_relative_to_the_image(jpegs, tmp_path, monkeypatch):
    """augment_on device (and decode device) act on the resized image: per sample the same ops and signs as the
    official loader, the same magnitudes, translations the same fraction of the side."""
    root, rel = jpegs
    labels = torch.zeros(len(rel), 5)
    cache = cached_images(root, rel, SIZE, tmp_path / "cache", "x")
    devices = [TrainSet(ImageArray(cache), labels, labels, True, NUM_OPS, MAGNITUDE, source=(root, rel),
                        augment_on="device"),
               TrainSet(None, labels, labels, True, NUM_OPS, MAGNITUDE, source=(root, rel), augment_on="device",
                        decode="device")]
    official = OfficialStyleSet(root, rel, labels, labels, SIZE, True, NUM_OPS, MAGNITUDE)
    applied = _recording(monkeypatch)
    for i in range(len(rel)):
        for seed in range(12):
            applied.clear()
            official[(i, seed)]
            for device in devices:
                draws = device[(i, seed)]
                for (name, magnitude, (height, width)), op, sign in zip(
                        applied, draws["strong_ops"].tolist(), draws["strong_signs"].tolist(), strict=True):
                    assert A.RANDAUGMENT_OPS[op][0] == name and (sign < 0) == (magnitude < 0), (i, seed)
                    ours = A.randaugment_magnitude(name, MAGNITUDE, SIZE, SIZE) * sign
                    if name == "TranslateX":
                        assert ours / SIZE == pytest.approx(magnitude / width, rel=1e-6)
                    elif name == "TranslateY":
                        assert ours / SIZE == pytest.approx(magnitude / height, rel=1e-6)
                    else:
                        assert ours == magnitude, name


TINY = ["--images", "4", "--batch-size", "2", "--image-size", "32", "--worker-count", "1", "--rounds", "1", "--device",
        "cpu", "--threads", "1", "--params", str(REPO / "params.yaml")]


def test_cli_input_bench_names_the_dataset_and_reports_both_loaders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "input", "--method", "ignore"] + TINY)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "# coco2014: read 4 JPEG files in COCO 2014's layout" in text and "generated by pipeline.tools.coco_like" in text
    assert re.search(r"image cache of the 4 images at 32 px: .* ms per image", text)
    assert "COCO 2014's cache at 32 px, all rows (122,218)" in text
    for loader, reads in (("ours", "cache \\+ files"), ("official", "files")):
        assert re.search(rf"^{loader} +workers=1 +\d+\.\d img/s +\d+\.\d img/s per worker .* reads {reads} +cores for "
                         r"361 / 1000 img/s: \d+ / \d+ +device side", text, re.M), text
    assert re.search(r"^# ours / official, images/s per worker: \d+\.\d\dx \(1 worker\)$", text, re.M)
    assert "augment_on=loader decode=cpu" in text


def test_cli_input_bench_with_device_decode_runs_without_dvc_pycocotools_pyarrow_pandas_sklearn(tmp_path):
    out = spml_without(ABSENT_ON_GPU_MACHINE, "bench", "input", "--method", "ignore", *TINY, "--augment-on", "device",
                       "--decode", "device", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "decode=device" in out.stdout and re.search(r"^ours .* reads files \(bytes\)", out.stdout, re.M)


def test_cli_input_bench_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--num-workers", "2"], "No such option"),  # the input bench times --worker-count workers
        (["--worker-count", "x"], "Invalid value for '--worker-count'"),
        (["--worker-count", "0"], "--worker-count must be >= 1"),
        (["--decode", "gpu"], "Invalid value for '--decode'"),
        (["--augment-on", "gpu"], "Invalid value for '--augment-on'"),
        (["--decode", "device"], "train.decode device needs train.augment_on device"),
        (["--images", "1"], "--images 1 is less than one batch of 2"),
    ]
    for extra, fragment in cases:
        result = CliRunner().invoke(app, ["bench", "input"] + TINY + extra)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and fragment in text and "Traceback" not in text, (extra, result.output)
    result = CliRunner().invoke(app, ["bench", "loader", "--decode", "device", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 2 and "No such option" in " ".join(result.output.split())
    with pytest.raises(SpmlError, match="the official-style loader makes IGNORE's standard views"):
        run_input_bench(["ignore"], REPO / "params.yaml", num_images=4, augment="lac", batch_size=2)
    with pytest.raises(SpmlError, match="reads COCO 2014 files only, got dataset voc2012"):
        run_input_bench(["ignore"], REPO / "params.yaml", "voc2012")
