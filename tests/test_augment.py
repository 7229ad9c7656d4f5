"""The LAC strong view (pipeline.augment): determinism under torch seeds, single ops at fixed magnitudes,
the op distribution, CutoutPIL's box, and the output's shape / dtype / grayscale path."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from pipeline import augment as A


def _noise(w: int = 24, h: int = 20, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _solid(colour, w: int = 16, h: int = 16) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def _changed_box(before: Image.Image, after: Image.Image):
    """(left, top, right, bottom) exclusive bounds of the changed pixels; asserts they fill the box."""
    diff = (_arr(before) != _arr(after)).any(-1)
    ys, xs = np.nonzero(diff)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert diff[box[1]:box[3], box[0]:box[2]].all() and diff.sum() == (box[2] - box[0]) * (box[3] - box[1])
    return box


def _view(seed: int, img: Image.Image, **kw) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return A.lac_strong_view(img, **kw)


def test_shape_dtype_and_same_seed_same_view():
    img = _noise()
    out = _view(3, img)
    assert out.shape == (3, 20, 24) and out.dtype == torch.uint8
    assert torch.equal(out, _view(3, img))
    views = [_view(s, img) for s in range(6)]
    assert all(not torch.equal(views[i], views[j]) for i in range(6) for j in range(i + 1, 6))


def test_uses_only_torch_rng_and_leaves_input_alone():
    img = _noise()
    before = _arr(img).copy()
    random.seed(1)
    np.random.seed(1)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(1)
    np.random.seed(1)
    for s in range(20):
        _view(s, img)
    assert random.random() == expect_py and np.random.rand() == expect_np
    assert np.array_equal(_arr(img), before)


def test_grayscale_path_gives_equal_channels():
    out = _view(0, _noise(), p_gray=1.0)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_op_choice_magnitude_and_apply_rate_are_uniform():
    torch.manual_seed(0)
    draws = [d for _ in range(3000) for d in A.sample_ops()]
    n = len(draws)

    def chi2(values, k):
        counts = np.bincount(values, minlength=k)
        assert len(counts) == k
        return ((counts - n / k) ** 2 / (n / k)).sum()

    # 99.9% quantiles of chi-square with 14 and 8 degrees of freedom.
    assert chi2([A.RA_OP_NAMES.index(name) for name, _, _ in draws], 15) < 36.1
    assert chi2([m - 1 for _, m, _ in draws], 9) < 26.1
    assert abs(np.mean([a for _, _, a in draws]) - 0.5) < 0.03
    assert len(A.RA_OP_NAMES) == 15 and len(set(A.RA_OP_NAMES)) == 15


def test_rand_augment_is_identity_when_no_op_fires():
    img = _noise()
    torch.manual_seed(0)
    assert np.array_equal(_arr(A.rand_augment(img, p=0.0)), _arr(img))


def test_invert_posterize_solarize_autocontrast():
    img = Image.fromarray(np.array([[[0, 183, 255], [227, 228, 100]]], dtype=np.uint8))
    assert _arr(A.RA_OPS["Invert"](img, 5)).tolist() == [[[255, 72, 0], [28, 27, 155]]]
    # Posterize bits: m=1 -> 8 (no-op), m=3 -> 7, m=9 -> 4.
    assert np.array_equal(_arr(A.RA_OPS["Posterize"](img, 1)), _arr(img))
    assert _arr(A.RA_OPS["Posterize"](img, 3)).tolist() == [[[0, 182, 254], [226, 228, 100]]]
    assert _arr(A.RA_OPS["Posterize"](img, 9)).tolist() == [[[0, 176, 240], [224, 224, 96]]]
    # Solarize threshold 256 - 256 m / 9: m=1 -> 227.6 (228 and up inverted), m=9 -> 0 (all inverted).
    assert _arr(A.RA_OPS["Solarize"](img, 1)).tolist() == [[[0, 183, 0], [227, 27, 100]]]
    assert _arr(A.RA_OPS["Solarize"](img, 9)).tolist() == [[[255, 72, 0], [28, 27, 155]]]
    two = Image.fromarray(np.array([[[50, 50, 50], [150, 150, 150]]], dtype=np.uint8))
    assert _arr(A.RA_OPS["AutoContrast"](two, 4)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_enhance_ops_use_factor_one_plus_or_minus_tenth_of_magnitude():
    grey = _solid((100, 100, 100))
    seen = set()
    for s in range(12):
        torch.manual_seed(s)
        seen.add(int(_arr(A.RA_OPS["Brightness"](grey, 5))[0, 0, 0]))
    assert seen == {50, 150}
    img = _noise()
    for name, kind in [("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                       ("Sharpness", ImageEnhance.Sharpness)]:
        torch.manual_seed(0)
        out = _arr(A.RA_OPS[name](img, 7))
        assert any(np.array_equal(out, _arr(kind(img).enhance(f))) for f in (1.7, 0.3)), name


def test_geometric_ops_fill_grey_by_magnitude():
    white = _solid((255, 255, 255), w=331, h=3)
    for s in range(4):
        torch.manual_seed(s)
        row = _arr(A.RA_OPS["TranslateX"](white, 9))[0, :, 0]
        # 150 / 331 of the width at m = 9, on one side.
        assert (row == 128).sum() == 150 and (row[:150] == 128).all() != (row[-150:] == 128).all()
    sq = _solid((255, 255, 255), w=40, h=40)
    rot = _arr(A.RA_OPS["Rotate"](sq, 9))
    assert rot[0, 0].tolist() == [128, 128, 128] and rot[20, 20].tolist() == [255, 255, 255]
    # Rotate has no random sign: every seed gives the same image.
    torch.manual_seed(5)
    assert np.array_equal(_arr(A.RA_OPS["Rotate"](_noise(), 9)), _arr(A.RA_OPS["Rotate"](_noise(), 9)))
    for name in ("ShearX", "ShearY", "TranslateY"):
        torch.manual_seed(0)
        out = _arr(A.RA_OPS[name](sq, 9))
        assert out.shape == (40, 40, 3) and (out == 128).all(-1).sum() > 0 and (out == 255).all(-1).sum() > 0


@pytest.mark.parametrize("magnitude,side", [(1, 2), (3, 6), (5, 10), (9, 20)])
def test_ra_cutout_square_of_stated_side(magnitude, side):
    black = _solid((0, 0, 0), w=40, h=40)
    sides = set()
    for s in range(10):
        torch.manual_seed(s)
        out = A.RA_OPS["Cutout"](black, magnitude)
        left, top, right, bottom = _changed_box(black, out)
        assert _arr(out)[top, left].tolist() == list(A.RA_CUTOUT_FILL)
        assert right - left <= side and bottom - top <= side
        sides.add((right - left, bottom - top))
    assert (side, side) in sides


def test_cutout_pil_box_side_clip_and_colour():
    black = _solid((0, 0, 0), w=30, h=30)
    full, colours = 0, set()
    for s in range(40):
        torch.manual_seed(s)
        out = A.cutout_pil(black)
        left, top, right, bottom = _changed_box(black, out)
        # int(0.5 * 30 + 0.5) = 15 -> half 7 -> inclusive box of 2 * 7 + 1 = 15 pixels when unclipped.
        assert 8 <= right - left <= 15 and 8 <= bottom - top <= 15
        full += (right - left, bottom - top) == (15, 15)
        colours.add(tuple(_arr(out)[top, left].tolist()))
    assert full > 0 and len(colours) == 40
    # Non-square: each axis uses its own side (the official code swaps them; identical for squares).
    wide = _solid((0, 0, 0), w=40, h=10)
    for s in range(10):
        torch.manual_seed(s)
        left, top, right, bottom = _changed_box(wide, A.cutout_pil(wide))
        assert right - left <= 21 and bottom - top <= 5


def test_magnitude_table_matches_numpy_linspace_bit_for_bit():
    for lo, hi in [(0, 0.3), (0, 150 / 331), (0, 30), (0, 0.9), (8, 4), (256, 0), (0, 20)]:
        table = np.linspace(lo, hi, 10)
        assert all(A._level(m, lo, hi) == table[m] for m in range(1, 10)), (lo, hi)
