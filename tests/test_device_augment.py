"""The standard views on the training device (train.augment_on: device) against the loader path, the reference:
torchvision's op table, each op on a fixed image, the same draws per seed, the op distribution, whole views,
reproducibility, and the loop's Normalizer making them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, RandAugment, autoaugment

from pipeline import augment as A
from pipeline.data import Normalizer, TrainSet
from pipeline.runtime.distributed import EpochSampler

NUM_OPS, MAGNITUDE = 3, 5  # params.yaml's strong_num_ops / strong_magnitude


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Noise in 20..230 with a bright square: every op (autocontrast, equalize, shears) has something to change."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(20, 231, (n, 3, size, size), dtype=torch.uint8, generator=g)
    images[:, :, size // 4: size // 2, size // 4: size // 2] = 190
    return images


def _sets(images: torch.Tensor, instances: torch.Tensor | None = None) -> tuple[TrainSet, TrainSet]:
    labels = torch.zeros(len(images), 4)
    classes = None if instances is None else torch.zeros(len(images), 8, dtype=torch.long)
    loader = TrainSet(images, labels, labels, True, NUM_OPS, MAGNITUDE, instances, classes)
    device = TrainSet(images, labels, labels, True, NUM_OPS, MAGNITUDE, instances, classes, augment_on="device")
    return loader, device


def test_op_table_is_torchvisions_randaugment():
    for height, width in ((32, 32), (224, 224), (40, 64)):
        space = RandAugment()._augmentation_space(A.NUM_MAGNITUDE_BINS, (height, width))
        assert [(name, signed) for name, (_, signed) in space.items()] == list(A.RANDAUGMENT_OPS)
        for name, (magnitudes, _) in space.items():
            for magnitude in (0, 5, 17, 30):
                expected = float(magnitudes[magnitude].item()) if magnitudes.ndim > 0 else 0.0
                assert A.randaugment_magnitude(name, magnitude, height, width) == expected, (name, magnitude)


@pytest.mark.parametrize("op", [name for name, _ in A.RANDAUGMENT_OPS])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("magnitude", [5, 30])
def test_each_op_on_a_batch_is_the_loader_paths_op_on_each_image(op, sign, magnitude):
    """A fixed op and magnitude on fixed images: the batched device op equals torchvision's RandAugment op
    (the loader path's) image by image, exactly."""
    images = _images(size=37)  # odd: the affine centre is not a pixel
    value = A.randaugment_magnitude(op, magnitude, 37, 37) * (sign if dict(A.RANDAUGMENT_OPS)[op] else 1.0)
    reference = torch.stack([autoaugment._apply_op(image, op, value, InterpolationMode.NEAREST, None)
                             for image in images])
    batched = A.apply_op(images, op, value)
    assert batched.dtype == torch.uint8 and batched.shape == images.shape
    diff = (batched.int() - reference.int()).abs()
    assert int(diff.max()) == 0, (op, sign, magnitude)
    if op not in ("Identity",) and not (op == "Posterize" and value == 8):
        assert not torch.equal(batched, images)  # the op did something


def test_the_device_path_draws_what_the_loader_path_draws_for_the_same_seed(monkeypatch):
    """Per sample seed, the loader path's flips and torchvision's RandAugment draws (op, sign) come out of
    draw_views in the same order and values."""
    applied: list[tuple[str, float]] = []
    apply_op = autoaugment._apply_op
    monkeypatch.setattr(autoaugment, "_apply_op", lambda img, name, value, interpolation, fill: (
        applied.append((name, value)), apply_op(img, name, value, interpolation, fill))[1])
    loader, device = _sets(_images(n=1))
    for seed in range(200):
        applied.clear()
        loader[(0, seed)]
        draws = device[(0, seed)]
        expected = [(A.RANDAUGMENT_OPS[i][0], A.randaugment_magnitude(A.RANDAUGMENT_OPS[i][0], MAGNITUDE, 32, 32) * s)
                    for i, s in zip(draws["strong_ops"].tolist(), draws["strong_signs"].tolist(), strict=True)]
        assert applied == expected, seed


def test_op_and_sign_frequencies_match_randaugments_distribution():
    """Over many draws: each of the 14 ops about 1/14 of the slots, each signed op negative about half the
    time, and one magnitude bin per op (RandAugment's magnitude is fixed)."""
    ops, negative = Counter(), Counter()
    draws = 6000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(draws):
            d = A.draw_views(NUM_OPS)
            for op, sign in zip(d["strong_ops"].tolist(), d["strong_signs"].tolist(), strict=True):
                ops[op] += 1
                negative[op] += sign < 0
    slots = draws * NUM_OPS
    expected = slots / len(A.RANDAUGMENT_OPS)
    sd = (slots * (1 / 14) * (13 / 14)) ** 0.5
    for index, (name, signed) in enumerate(A.RANDAUGMENT_OPS):
        assert abs(ops[index] - expected) < 4 * sd, (name, ops[index], expected)
        if signed:
            assert abs(negative[index] / ops[index] - 0.5) < 4 * (0.25 / ops[index]) ** 0.5, name
        else:
            assert negative[index] == 0, name


def test_device_views_equal_the_loader_views_for_the_same_seeds():
    """Whole views, sample by sample: the weak view (a flip), the instance map and the strong view (RandAugment's
    three ops, then a flip), bit for bit."""
    images = _images(n=48)
    instances = torch.randint(0, 3, (48, 32, 32), dtype=torch.uint8)
    loader, device = _sets(images, instances)
    normalize = Normalizer(torch.device("cpu"), augment=A.DeviceAugment(NUM_OPS, MAGNITUDE))
    keys = [(i, 1000 + 7 * i) for i in range(48)]
    ref = [loader[k] for k in keys]
    items = DataLoader(device, batch_size=48, sampler=keys).__iter__().__next__()
    weak = A.DeviceAugment.flip(items["image"], items["flip"])
    strong = A.DeviceAugment(NUM_OPS, MAGNITUDE).strong(items["image"], items["strong_ops"], items["strong_signs"],
                                                        items["strong_flip"])
    hidden = normalize.hidden(items)
    for i, r in enumerate(ref):
        assert torch.equal(weak[i], r["image"]) and torch.equal(hidden.instances[i], r["instances"])
        assert torch.equal(strong[i], r["strong"]), (i, items["strong_ops"][i].tolist())
    assert len(set(items["strong_ops"].flatten().tolist())) == len(A.RANDAUGMENT_OPS)  # every op was drawn
    # the loop's Normalizer makes the same views and normalises them
    batch = normalize.batch(items)
    plain = Normalizer(torch.device("cpu"))
    assert torch.equal(batch.image, plain(weak)) and torch.equal(batch.strong, plain(strong))


def test_device_views_depend_on_the_sample_seed_only():
    """Reproducible: the same seeds give the same batch, whatever the workers; another epoch another one."""
    _, device = _sets(_images(n=12))
    augment = A.DeviceAugment(NUM_OPS, MAGNITUDE)

    def views(workers: int, epoch: int = 1) -> list[torch.Tensor]:
        sampler = EpochSampler(12, seed=3)
        sampler.set_epoch(epoch)
        out = []
        for item in DataLoader(device, batch_size=4, sampler=sampler, num_workers=workers, generator=torch.Generator()):
            out += [item["index"], augment.flip(item["image"], item["flip"]),
                    augment.strong(item["image"], item["strong_ops"], item["strong_signs"], item["strong_flip"])]
        return out

    first = views(0)
    assert all(torch.equal(a, b) for a, b in zip(first, views(0), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, views(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, views(0, epoch=2), strict=True))


def test_device_augmentation_is_for_the_standard_views_only():
    labels = torch.zeros(2, 3)
    lac = TrainSet(_images(n=2), labels, labels, True, augment="lac", augment_on="device")
    assert {"image", "strong"} <= set(lac[(0, 1)]) and "flip" not in lac[(0, 1)]  # Xie et al.'s views: the loader's
    device = TrainSet(_images(n=2), labels, labels, False, augment_on="device")
    assert set(device[(0, 1)]) == {"index", "image", "observed", "full", "flip"}  # no strong view: no op draws
    with pytest.raises(ValueError, match="loader or device"):
        TrainSet(_images(n=2), labels, labels, augment_on="gpu")


def test_training_with_device_views(tiny_workspace):
    """Whole (tiny) trainings with train.augment_on: device against loader, on the synthetic images (stored at
    the training size): the device makes every view exactly as the loader does, from the same per-sample seeds,
    so AN (weak view only) and IGNORE (weak and strong views) give the same metrics and history, bit for bit."""
    import json

    import pandas as pd

    from stages import train as train_stage
    from tests.conftest import tiny_params, write_params

    def run(method: str, place: str) -> tuple[dict, pd.DataFrame]:
        params = tiny_params()
        params["train"]["default"].update(augment_on=place, epochs=2)
        write_params(tiny_workspace, params)
        out = tiny_workspace / f"{method}-{place}"
        train_stage.run("synthetic", method, 0, out_dir=out)
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("train_seconds")
        metrics.pop("config_sha256")  # the cell's config names augment_on, which differs by design
        return metrics, pd.read_csv(out / "history.csv").drop(columns="epoch_seconds")

    for method in ("an", "ignore"):
        (m_loader, h_loader), (m_device, h_device) = run(method, "loader"), run(method, "device")
        assert m_loader == m_device, method
        pd.testing.assert_frame_equal(h_loader, h_device, check_exact=True)
        assert 0 < m_device["test_map"] <= 100 and h_device["train_loss"].notna().all()
