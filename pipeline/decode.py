"""Training images as uint8 tensors: torch's resize, and the decode on the training device.

:func:`resize_uint8` is the strong view's resize after its full-resolution RandAugment (:class:`pipeline.data.TrainSet`)
and the device path's: bilinear with antialiasing, the filter of PIL's ``BILINEAR`` resize that builds the image cache
and that the official code's ``Resize`` runs. It is within 1 level of 255 of PIL's on every pixel (tested; on
COCO-like images 0.02 % of a landscape image's pixels differ by 1, about 20 % of a portrait one's, where PIL rounds
between its two passes) and 3x faster on the CPU (0.8 against 2.3 ms for 640x480 to 448 px), the largest per-sample
cost of the loader path after the decode and RandAugment (docs/bench-cpu.md).

**Decode on the device** (params ``train.decode: device``, with ``train.augment_on: device``): the training loader
hands out each file's JPEG bytes (:func:`read_jpeg`) with the sample's view draws; :func:`decode_resize` decodes the
batch on the training device (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on the CPU), resizes each
image to the training size there, and the device augmentation (:class:`pipeline.augment.DeviceAugment`) makes the
views. The loader's work per sample is then a file read; the training rows need no image cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import SpmlError, missing_image_error

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI and the first marker's 0xFF: every JPEG starts so, PNG and the rest do not


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (3, H, W) uint8 image resized to ``size`` (height, width), bilinear with antialiasing, uint8.

    On the CPU torch's uint8 kernel runs; on other devices (which lack it) the float kernel, rounded."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image.unsqueeze(0)
    if image.device.type == "cpu":
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return _resize_float(batch, size)[0]


def _resize_float(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = F.interpolate(batch.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def read_jpeg(path: Path) -> torch.Tensor:
    """The bytes of the JPEG file ``path`` as a 1-D uint8 tensor (what ``decode_jpeg`` reads)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise missing_image_error(path) from None
    except OSError as exc:
        raise SpmlError(f"image {path} cannot be read ({exc}); check the file and its permissions") from None
    if not data.startswith(JPEG_MAGIC):
        raise SpmlError(f"image {path} is not a JPEG; train.decode: device decodes JPEG files only (nvJPEG), "
                        "set train.decode: cpu for this dataset")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_resize(blobs: list[torch.Tensor], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """JPEG byte tensors (on the host) decoded to RGB on ``device`` in one batched call, each resized to ``size``:
    a (B, 3, H, W) uint8 batch on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpmlError(f"decoding a training batch on {device} failed ({first}): a file is corrupt; set "
                        "train.decode: cpu to have the file named, then replace it") from None
    return torch.stack([resize_uint8(image, size) for image in images])
