"""Augmentation beyond the loader's flips: the strong view of PLC + LAC, and the standard views on the device.

**The standard views on the training device** (``train.augment_on: device``, :class:`DeviceAugment`): the
loader hands out the cached uint8 image and, per sample, the random draws of its views (:func:`draw_views`:
the same draws, from the same per-sample seed and in the same order, as the loader path's flip and
torchvision's ``RandAugment``); the flips and RandAugment then run batched on the device, one call per
(slot, op, sign) group of samples, with torchvision's batched kernels: ``transforms.v2.functional`` for most
ops, and the v1 ``transforms.functional`` kernels the loader path's RandAugment runs for Color, Sharpness and
AutoContrast (v2's round or divide where v1 truncates or multiplies: one level of 255 apart). The op table
(:data:`RANDAUGMENT_OPS`, :func:`randaugment_magnitude`) is torchvision's RandAugment's. Outputs equal the
loader path's, bit for bit, for the same seed and an image stored at the training size. For images stored
at another size (the real datasets) the loader path runs RandAugment on the full-resolution file before its
resize; the device path runs it on the cached, resized image (translations are a fraction of the side either way; rotations and shears resample
a coarser grid).

**Strong-view augmentation of PLC + LAC** (Xie et al., NeurIPS 2022), without ImageNet normalisation.

Source: the official code ``xiemk/SPML-LAC`` (``lib/dataset/get_dataset.py``: ``CutoutPIL`` and the
``strong`` pipeline of ``TransformUnlabeled_WS``) and the pip package ``randaugment`` 1.0.2 (jizongFox's
UDA-style ``RandAugment``) that it imports. This module is a fresh implementation of the same rules; the
package itself cannot be used because it calls ``np.int`` (removed in numpy 1.24).

Strong view, after the caller's RandomHorizontalFlip + Resize (:func:`lac_strong_view`):

1. :func:`cutout_pil`: one rectangle of ``int(0.5 * side + 0.5)`` per axis around a uniform random centre,
   clipped to the image, filled with a uniform random RGB colour. The official code draws it with PIL's
   inclusive ``rectangle`` so an unclipped box is ``2 * (cut // 2) + 1`` pixels wide (225 at 448).
2. :func:`rand_augment`: 2 ops, each uniform over the 15 of :data:`RA_OPS` with a uniform magnitude in
   1..9 and applied with probability 0.5, in order. Magnitude ``m`` indexes the package's
   ``linspace(lo, hi, 10)``; see the op functions for each range.
3. ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8, then RandomGrayscale(p = 0.2).
4. A (3, H, W) uint8 tensor (``ToTensor`` of the official code is this divided by 255).

Differences: all randomness comes from torch's global RNG (the originals use python ``random`` and numpy),
so a sample's view is a function of the torch seed only; the exact random streams therefore differ.
The official ``CutoutPIL`` swaps width and height when it samples and clips the centre (it reads
``size[0]`` as the height); that matters only for non-square images, where this module uses the correct
axes. It also paints the caller's image in place; this module works on a copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

FILL = (128, 128, 128)           # the package's fill for shear / translate / rotate
RA_CUTOUT_FILL = (125, 122, 113)  # the package's Cutout colour (an ImageNet-mean grey)
NUM_OPS, OP_PROB, MAX_MAGNITUDE = 2, 0.5, 9

_JITTER = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)


def _randint(low: int, high: int) -> int:
    return int(torch.randint(low, high, ()).item())


def _sign() -> int:
    return 1 if _randint(0, 2) else -1


def _level(magnitude: int, lo: float, hi: float) -> float:
    """``numpy.linspace(lo, hi, 10)[magnitude]``, the package's magnitude table, bit for bit (numpy computes
    ``k * step + lo`` and pins the end point; e.g. 6 * 0.3 / 9 would differ in the last bit)."""
    return hi if magnitude == MAX_MAGNITUDE else magnitude * ((hi - lo) / MAX_MAGNITUDE) + lo


def _affine(img: Image.Image, coeffs: tuple, resample) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=FILL)


def shear_x(img: Image.Image, magnitude: int) -> Image.Image:
    return _affine(img, (1, _sign() * _level(magnitude, 0, 0.3), 0, 0, 1, 0), Image.Resampling.BICUBIC)


def shear_y(img: Image.Image, magnitude: int) -> Image.Image:
    return _affine(img, (1, 0, 0, _sign() * _level(magnitude, 0, 0.3), 1, 0), Image.Resampling.BICUBIC)


def translate_x(img: Image.Image, magnitude: int) -> Image.Image:
    # The package passes no resample here, i.e. PIL's default NEAREST (unlike shear's BICUBIC).
    shift = _sign() * _level(magnitude, 0, 150 / 331) * img.size[0]
    return _affine(img, (1, 0, shift, 0, 1, 0), Image.Resampling.NEAREST)


def translate_y(img: Image.Image, magnitude: int) -> Image.Image:
    shift = _sign() * _level(magnitude, 0, 150 / 331) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, shift), Image.Resampling.NEAREST)


def rotate(img: Image.Image, magnitude: int) -> Image.Image:
    # No random sign: the package's signed variant is commented out, so it always turns counter-clockwise.
    # Its RGBA-composite trick equals a NEAREST rotate with a grey fill.
    return img.rotate(_level(magnitude, 0, 30), resample=Image.Resampling.NEAREST, fillcolor=FILL)


def _enhancer(kind) -> Callable[[Image.Image, int], Image.Image]:
    def op(img: Image.Image, magnitude: int) -> Image.Image:
        return kind(img).enhance(1 + _sign() * _level(magnitude, 0, 0.9))
    return op


def posterize(img: Image.Image, magnitude: int) -> Image.Image:
    # round(linspace(8, 4, 10)): bits 8,7,7,6,6,5,5,4,4 for m = 1..9 (m = 1 keeps all 8 bits).
    return ImageOps.posterize(img, round(_level(magnitude, 8, 4)))


def solarize(img: Image.Image, magnitude: int) -> Image.Image:
    # The threshold stays a float (256 - 256 m / 9) as in the package; PIL inverts pixels >= it.
    return ImageOps.solarize(img, _level(magnitude, 256, 0))


def ra_cutout(img: Image.Image, magnitude: int) -> Image.Image:
    """The package's Cutout: size round(20 m / 9) px (2..20, absolute, not relative to the image), a
    square of side 2 * (size // 2) around a uniform centre, clipped, filled with :data:`RA_CUTOUT_FILL`."""
    half = round(_level(magnitude, 0, 20)) // 2
    w, h = img.size
    cx, cy = _randint(0, w), _randint(0, h)
    out = img.copy()
    out.paste(RA_CUTOUT_FILL, (max(cx - half, 0), max(cy - half, 0), min(cx + half, w), min(cy + half, h)))
    return out


RA_OPS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    # The package's order (the index drawn by :func:`sample_ops`).
    "Invert": lambda img, m: ImageOps.invert(img),
    "Cutout": ra_cutout,
    "Sharpness": _enhancer(ImageEnhance.Sharpness),
    "AutoContrast": lambda img, m: ImageOps.autocontrast(img),
    "Posterize": posterize,
    "ShearX": shear_x,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "ShearY": shear_y,
    "Rotate": rotate,
    "Equalize": lambda img, m: ImageOps.equalize(img),
    "Contrast": _enhancer(ImageEnhance.Contrast),
    "Color": _enhancer(ImageEnhance.Color),
    "Solarize": solarize,
    "Brightness": _enhancer(ImageEnhance.Brightness),
}
RA_OP_NAMES = tuple(RA_OPS)


def sample_ops(num_ops: int = NUM_OPS, p: float = OP_PROB) -> list[tuple[str, int, bool]]:
    """Draw (op name, magnitude, applied?) for each slot. The package draws one of the 135 x 135 op pairs
    uniformly, which is the same as independent uniform (op, magnitude) draws per slot."""
    idx = torch.randint(0, len(RA_OP_NAMES), (num_ops,)).tolist()
    mags = torch.randint(1, MAX_MAGNITUDE + 1, (num_ops,)).tolist()
    applied = (torch.rand(num_ops) < p).tolist()
    return [(RA_OP_NAMES[i], m, a) for i, m, a in zip(idx, mags, applied, strict=True)]


def rand_augment(img: Image.Image, num_ops: int = NUM_OPS, p: float = OP_PROB) -> Image.Image:
    for name, magnitude, applied in sample_ops(num_ops, p):
        if applied:
            img = RA_OPS[name](img, magnitude)
    return img


def cutout_pil(img: Image.Image, factor: float = 0.5) -> Image.Image:
    """The official ``CutoutPIL`` (see the module docstring for the box size and the axis fix)."""
    w, h = img.size
    half_w, half_h = int(factor * w + 0.5) // 2, int(factor * h + 0.5) // 2
    cx, cy = _randint(0, w), _randint(0, h)
    colour = tuple(torch.randint(0, 256, (3,)).tolist())
    out = img.copy()
    # +1 on the far edge: the official box is drawn with PIL's inclusive rectangle.
    box = (max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w + 1, w), min(cy + half_h + 1, h))
    out.paste(colour, box)
    return out


def lac_strong_view(image: Image.Image, *, p_jitter: float = 0.8, p_gray: float = 0.2) -> torch.Tensor:
    """The LAC strong view of an already flipped and resized image: a (3, H, W) uint8 tensor.

    ``p_jitter`` / ``p_gray`` default to the official values; they are parameters so tests can force a path.
    """
    img = cutout_pil(image.convert("RGB"))
    img = rand_augment(img)
    if torch.rand(()) < p_jitter:
        img = _JITTER(img)
    if torch.rand(()) < p_gray:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return TF.pil_to_tensor(img)


# ------------------------------------------------------------------ standard views on the device

# torchvision's RandAugment ops, in its order (the index a draw picks), and whether each takes a random sign
RANDAUGMENT_OPS: tuple[tuple[str, bool], ...] = (
    ("Identity", False), ("ShearX", True), ("ShearY", True), ("TranslateX", True), ("TranslateY", True),
    ("Rotate", True), ("Brightness", True), ("Color", True), ("Contrast", True), ("Sharpness", True),
    ("Posterize", False), ("Solarize", False), ("AutoContrast", False), ("Equalize", False),
)
NUM_MAGNITUDE_BINS = 31  # torchvision's default: magnitude bins 0..30


@functools.cache
def randaugment_magnitude(op: str, magnitude: int, height: int, width: int) -> float:
    """Unsigned magnitude of ``op`` at bin ``magnitude``, from the same float32 tables as torchvision's
    ``RandAugment`` (shear 0..0.3, translate 0..150/331 of the side in pixels, rotate 0..30 degrees, colour
    0..0.9, posterize 8..4 bits, solarize threshold 255..0; the rest take none)."""
    bins = NUM_MAGNITUDE_BINS
    ranges = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height,
              "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if op in ranges:
        return float(torch.linspace(0.0, ranges[op], bins)[magnitude].item())
    if op == "Posterize":
        return float((8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int())[magnitude].item())
    if op == "Solarize":
        return float(torch.linspace(255.0, 0.0, bins)[magnitude].item())
    return 0.0


def draw_views(num_ops: int | None) -> dict[str, torch.Tensor]:
    """One sample's view draws from the global torch RNG, in the loader path's order: the weak flip, then
    (``num_ops`` not None: a strong view) RandAugment's op index and sign per slot as torchvision's
    ``RandAugment.forward`` draws them, then the strong view's flip."""
    out = {"flip": torch.tensor(bool(torch.rand(()) < 0.5))}
    if num_ops is None:
        return out
    ops, signs = [], []
    for _ in range(num_ops):
        index = int(torch.randint(len(RANDAUGMENT_OPS), (1,)).item())
        negative = RANDAUGMENT_OPS[index][1] and bool(torch.randint(2, (1,)))
        ops.append(index)
        signs.append(-1 if negative else 1)
    out["strong_ops"] = torch.tensor(ops, dtype=torch.int64)
    out["strong_signs"] = torch.tensor(signs, dtype=torch.int8)
    out["strong_flip"] = torch.tensor(bool(torch.rand(()) < 0.5))
    return out


def apply_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment op with a signed ``magnitude`` on a uint8 batch (..., 3, H, W), as torchvision's
    RandAugment applies it to a tensor (nearest-neighbour resampling, black fill)."""
    nearest = InterpolationMode.NEAREST
    if op == "ShearX":
        return F2.affine(images, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest,
                         shear=[math.degrees(math.atan(magnitude)), 0.0], center=[0, 0])
    if op == "ShearY":
        return F2.affine(images, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest,
                         shear=[0.0, math.degrees(math.atan(magnitude))], center=[0, 0])
    if op == "TranslateX":
        return F2.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                         interpolation=nearest)
    if op == "TranslateY":
        return F2.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                         interpolation=nearest)
    if op == "Rotate":
        return F2.rotate(images, magnitude, interpolation=nearest)
    ops = {"Brightness": lambda x: F2.adjust_brightness(x, 1.0 + magnitude),
           # v1's kernels, as the loader path's RandAugment: v2's blend rounds where v1's truncates
           "Color": lambda x: TF.adjust_saturation(x, 1.0 + magnitude),
           "Contrast": lambda x: F2.adjust_contrast(x, 1.0 + magnitude),
           "Sharpness": lambda x: TF.adjust_sharpness(x, 1.0 + magnitude),
           "Posterize": lambda x: F2.posterize(x, int(magnitude)),
           "Solarize": lambda x: F2.solarize(x, magnitude),
           "AutoContrast": TF.autocontrast,  # (v2's divides by the range where v1 multiplies by its inverse)
           "Equalize": F2.equalize, "Identity": lambda x: x}
    return ops[op](images)


class DeviceAugment:
    """The standard views of a batch on its device, from the draws the loader sent (:func:`draw_views`).

    ``num_ops`` / ``magnitude``: params ``train.strong_num_ops`` / ``strong_magnitude``. The draws stay on
    the host (they decide which samples form a group), so the device never waits for the host."""

    def __init__(self, num_ops: int, magnitude: int):
        self.num_ops, self.magnitude = num_ops, magnitude

    @staticmethod
    def flip(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Each image of (B, ..., W) mirrored where its flag is set."""
        flags = flags.to(images.device, non_blocking=True).view(-1, *([1] * (images.dim() - 1)))
        return torch.where(flags, images.flip(-1), images)

    def rand_augment(self, images: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """RandAugment of a uint8 batch (B, 3, H, W): slot by slot, each sample's op (``ops`` (B, num_ops),
        indices into :data:`RANDAUGMENT_OPS`) with its sign (``signs``, +-1), one call per (op, sign) group."""
        height, width = images.shape[-2:]
        out = None
        for slot in range(ops.shape[1]):
            keys = ops[:, slot].cpu() * 2 + (signs[:, slot].cpu() < 0)
            for key in torch.unique(keys).tolist():
                name = RANDAUGMENT_OPS[key // 2][0]
                if name == "Identity":
                    continue
                out = images.clone() if out is None else out  # the weak view shares the input
                rows = torch.nonzero(keys == key).flatten().to(images.device, non_blocking=True)
                magnitude = randaugment_magnitude(name, self.magnitude, height, width) * (-1.0 if key % 2 else 1.0)
                out.index_copy_(0, rows, apply_op(out.index_select(0, rows), name, magnitude))
        return images if out is None else out

    def strong(self, images: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor,
               flips: torch.Tensor) -> torch.Tensor:
        """The strong view: RandAugment, then the flip (the loader path's order)."""
        return self.flip(self.rand_augment(images, ops, signs), flips)
