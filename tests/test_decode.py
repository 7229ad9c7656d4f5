"""Decoding on the device (train.decode: device) tested on the CPU, torch's resize against PIL's, and the image
cache's refusal of a disk that cannot hold it."""

from __future__ import annotations

import dataclasses
import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_fixtures import make_coco
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline import data as data_module
from pipeline import decode as D
from pipeline.augment import DeviceAugment
from pipeline.data import ImageArray, Normalizer, TrainSet, cached_images, collate_jpeg
from pipeline.errors import SpmlError
from pipeline.tools.coco_like import photo_like

SIZE = 48
# (width, height): landscape, portrait, smaller than the training size, already square at it
SHAPES = [(64, 48), (48, 64), (40, 30), (SIZE, SIZE)]


@pytest.fixture
def jpegs(tmp_path) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    rel = []
    for k, (w, h) in enumerate(SHAPES * 2):
        name = f"{k}.jpg"
        photo_like(rng, w, h, gray=k == 5).save(tmp_path / name, "JPEG", quality=90)
        rel.append(name)
    return tmp_path, rel


def _pil(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize(size[::-1], Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def test_torch_resize_is_pils_bilinear_to_within_one_level(jpegs):
    """Both of resize_uint8's kernels (the CPU's uint8 one, and the float one other devices run) against PIL's
    BILINEAR resize, which builds the cache and which the official code's Resize runs: at most 1 level of 255."""
    root, rel = jpegs
    for name in rel:
        image = _pil(root / name)
        for size in ((SIZE, SIZE), (30, 70)):
            reference = _pil(root / name, size)
            fast = D.resize_uint8(image, size)
            slow = D._resize_float(image.unsqueeze(0), size)[0]
            assert fast.dtype == slow.dtype == torch.uint8 and fast.shape == (3, *size)
            assert _max_diff(fast, reference) <= 1 and _max_diff(slow, reference) <= 1, (name, size)
    assert D.resize_uint8(image, tuple(image.shape[-2:])) is image  # already at the size: untouched


def test_decode_jpeg_on_the_cpu_equals_pils_decode(jpegs):
    """torchvision's decode_jpeg (libjpeg-turbo) against PIL's (libjpeg-turbo too) at full resolution: equal here,
    grayscale files included; the stated tolerance is 1 level (another build may round chroma differently)."""
    root, rel = jpegs
    for name in rel:
        decoded = decode_jpeg(D.read_jpeg(root / name), mode=ImageReadMode.RGB)
        assert decoded.dtype == torch.uint8 and decoded.shape == _pil(root / name).shape
        assert _max_diff(decoded, _pil(root / name)) <= 1, name


def test_batched_decode_and_resize_agree_with_the_cache_path(jpegs):
    """decode_resize (the device path, here on the CPU) against PIL decode + PIL resize (the cache): one uint8
    batch at the training size, within 1 level."""
    root, rel = jpegs
    batch = D.decode_resize([D.read_jpeg(root / name) for name in rel], (SIZE, SIZE), torch.device("cpu"))
    assert batch.dtype == torch.uint8 and batch.shape == (len(rel), 3, SIZE, SIZE)
    for i, name in enumerate(rel):
        assert _max_diff(batch[i], _pil(root / name, (SIZE, SIZE))) <= 1, name


def test_read_jpeg_refuses_what_the_device_cannot_decode(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SpmlError, match=r"a\.png is not a JPEG; train\.decode: device decodes JPEG files only"):
        D.read_jpeg(tmp_path / "a.png")
    with pytest.raises(SpmlError, match="listed in the label table but missing"):
        D.read_jpeg(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(D.JPEG_MAGIC + b"\x00" * 64)  # a JPEG start, then garbage
    with pytest.raises(SpmlError, match="decoding a training batch on cpu failed .*set train.decode: cpu"):
        D.decode_resize([D.read_jpeg(tmp_path / "c.jpg")], (8, 8), torch.device("cpu"))


def test_device_decode_items_batches_and_views(jpegs, tmp_path):
    """TrainSet(decode="device") hands out bytes and draws; collate_jpeg keeps the bytes a list; the loop's Normalizer
    decodes, resizes and makes the views: the same views as the cached-image device path, to within 1 level
    before normalisation, since the same draws act on images that differ by at most that."""
    root, rel = jpegs
    labels = torch.zeros(len(rel), 3)
    cache = cached_images(root, rel, SIZE, tmp_path / "cache", "x", num_workers=0)
    from_bytes = TrainSet(None, labels, labels, True, 3, 5, source=(root, rel), augment_on="device", decode="device")
    from_cache = TrainSet(ImageArray(cache), labels, labels, True, 3, 5, source=(root, rel), augment_on="device")
    keys = [(i, 100 + i) for i in range(len(rel))]
    item = from_bytes[keys[0]]
    assert "image" not in item and item["jpeg"].dtype == torch.uint8 and item["jpeg"].dim() == 1
    batch = next(iter(DataLoader(from_bytes, batch_size=len(rel), sampler=keys, collate_fn=collate_jpeg)))
    reference = next(iter(DataLoader(from_cache, batch_size=len(rel), sampler=keys)))
    assert isinstance(batch["jpeg"], list) and len(batch["jpeg"]) == len(rel)
    for key in ("flip", "strong_ops", "strong_signs", "strong_flip", "index"):
        assert torch.equal(batch[key], reference[key]), key
    augment = DeviceAugment(3, 5)
    normalize = Normalizer(torch.device("cpu"), augment=augment, decode_size=(SIZE, SIZE))
    views = normalize.batch(batch)
    assert views.image.shape == views.strong.shape == (len(rel), 3, SIZE, SIZE)
    assert views.image.dtype == views.strong.dtype == torch.float32
    decoded = D.decode_resize(batch["jpeg"], (SIZE, SIZE), torch.device("cpu"))
    assert _max_diff(decoded, reference["image"]) <= 1
    assert _max_diff(augment.flip(decoded, batch["flip"]), augment.flip(reference["image"], reference["flip"])) <= 1
    plain = Normalizer(torch.device("cpu"))
    assert torch.equal(views.image, plain(augment.flip(decoded, batch["flip"])))
    assert torch.equal(views.strong, plain(augment.strong(decoded, batch["strong_ops"], batch["strong_signs"],
                                                          batch["strong_flip"])))
    with pytest.raises(SpmlError, match="hands out JPEG bytes .* but the normaliser decodes none"):
        Normalizer(torch.device("cpu"), augment=augment).batch(batch)


def test_decode_on_the_device_needs_the_device_views_and_files():
    labels = torch.zeros(2, 3)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="decode must be cpu or device"):
        TrainSet(images, labels, labels, decode="gpu")
    with pytest.raises(ValueError, match="needs augment_on device"):
        TrainSet(images, labels, labels, source=(Path("."), ["a", "b"]), decode="device")
    with pytest.raises(ValueError, match="needs augment_on device"):
        TrainSet(images, labels, labels, augment_on="device", decode="device")  # no files


def test_image_cache_refuses_a_disk_that_cannot_hold_it_before_building(jpegs, tmp_path, monkeypatch):
    root, rel = jpegs
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(data_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(data_module, "_decode", lambda *args: pytest.fail("decoded before refusing"))
    needed = len(rel) * 3 * SIZE * SIZE + data_module.NPY_HEADER_BYTES
    with pytest.raises(SpmlError) as refused:
        cached_images(root, rel, SIZE, tmp_path / "cache", "x", what="coco2014 images")
    message = str(refused.value)
    assert "\n" not in message and f"needs {needed:,} bytes" in message and "1,000 bytes free" in message
    assert "coco2014 images at 48 px" in message and "free space there or make" in message
    assert not list((tmp_path / "cache").iterdir())  # nothing written
    monkeypatch.undo()  # the real disk, with room: it builds
    assert np.load(cached_images(root, rel, SIZE, tmp_path / "cache", "x")).shape == (len(rel), 3, SIZE, SIZE)


def test_cache_bytes_at_the_papers_size():
    """COCO 2014 at 448 px: 122,218 annotated images (82,081 train + 40,137 val) of 602,112 bytes each."""
    assert data_module.cache_bytes(122_218, 448) == 122_218 * 602_112 + 128
    assert round(data_module.cache_bytes(82_783, 448) / 1e9) == 50  # the figure: all of train2014


def test_training_on_coco_with_device_decode(workspace, tmp_path):
    """A prepared COCO fixture with real JPEGs: with train.decode device only val and test rows are cached and a
    whole (tiny) IGNORE training runs, decoding its training files on the device (the CPU here); the loader's views
    and PNG files (the synthetic dataset's) are refused in one line each."""
    from conftest import tiny_params, write_params
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.run_config import resolve_run_config
    from pipeline.train import check_decode, load_run_data
    from stages import train as train_stage

    params = tiny_params()
    params["train"]["default"].update(augment_on="device", decode="device", batch_size=2, eval_batch_size=4)
    write_params(workspace, params)
    make_coco(tmp_path / "src", jpeg=(40, 30))
    runner = CliRunner()
    for args in (["download", "coco2014", "--source", str(tmp_path / "src")], ["prepare", "coco2014"],
                 ["sample", "coco2014"]):
        assert runner.invoke(app, args).exit_code == 0, args
    cfg = resolve_run_config(params, "coco2014", "ignore", 0).train
    run = load_run_data("coco2014", cfg, strong=True, instances=False, num_workers=0)
    cached = np.load(next((workspace / "data" / "cache" / "coco2014").glob("*.npy")), mmap_mode="r")
    assert cached.shape[0] == len(run.val) + len(run.test) == 1 + 3 and run.train.images is None
    out = workspace / "runs" / "decode-device"
    train_stage.run("coco2014", "ignore", 0, out_dir=out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_map"] <= 100

    with pytest.raises(SpmlError, match="train.decode device needs train.augment_on device and train.augment standard"):
        check_decode(dataclasses.replace(cfg, augment_on="loader"), Path("unused.jpg"))
    Image.new("RGB", (8, 8)).save(tmp_path / "synthetic.png")
    with pytest.raises(SpmlError, match="is not a JPEG"):
        check_decode(cfg, tmp_path / "synthetic.png")
    check_decode(dataclasses.replace(cfg, decode="cpu"), tmp_path / "synthetic.png")  # the CPU decodes anything
