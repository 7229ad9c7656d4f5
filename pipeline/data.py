"""Images and labels for training and evaluation.

Images are decoded once, resized to the training size and held as a uint8 tensor (N, 3, S, S); the
per-sample work left in the loader is a flip and, for the strong view, RandAugment. Normalisation runs
on the device, on the whole batch. (The official IGNORE code applies RandAugment at full resolution
before resizing; we apply it to the resized image, which is what makes the in-memory cache possible.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import RandAugment

from pipeline.errors import SpmlError
from pipeline.methods import Batch
from pipeline.progress import progress_bar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_INSTANCES = 8


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError:
        raise SpmlError(f"image {path} is listed in the label table but missing; restore it or rerun "
                        "`spml download` and `spml prepare`") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SpmlError(f"image {path} is corrupt or not an image ({exc}); replace the file") from None


def load_images(root: Path, rel_paths: list[str], size: int, what: str = "images") -> torch.Tensor:
    """Decode and resize (bilinear, aspect ratio not kept, as every SPML codebase does) to uint8."""
    out = torch.empty((len(rel_paths), 3, size, size), dtype=torch.uint8)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"loading {what}", total=len(rel_paths))
        for i, rel in enumerate(rel_paths):
            img = _open(root / rel, "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out[i] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            bar.advance(task)
    return out


def load_instance_maps(root: Path, rel_paths: list[str], size: int) -> torch.Tensor:
    out = torch.empty((len(rel_paths), size, size), dtype=torch.uint8)
    for i, rel in enumerate(rel_paths):
        img = _open(root / rel, "L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        out[i] = torch.from_numpy(np.asarray(img).copy())
    return out


def pad_instance_classes(instance_classes: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(instance_classes), MAX_INSTANCES), -1, dtype=torch.long)
    for i, classes in enumerate(instance_classes):
        out[i, : len(classes)] = torch.as_tensor(classes[:MAX_INSTANCES], dtype=torch.long)
    return out


class TrainSet(Dataset):
    """Weak view (random horizontal flip) and, on request, an independent strong view
    (random horizontal flip + RandAugment)."""

    def __init__(self, images: torch.Tensor, observed: torch.Tensor, full: torch.Tensor,
                 strong: bool = False, strong_num_ops: int = 3, strong_magnitude: int = 5,
                 instances: torch.Tensor | None = None, instance_classes: torch.Tensor | None = None):
        self.images, self.observed, self.full = images, observed, full
        self.instances, self.instance_classes = instances, instance_classes
        self.randaugment = RandAugment(num_ops=strong_num_ops, magnitude=strong_magnitude) if strong else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i]
        flip = bool(torch.rand(()) < 0.5)
        item = {"index": i, "image": image.flip(-1) if flip else image,
                "observed": self.observed[i], "full": self.full[i]}
        if self.instances is not None:
            item["instances"] = self.instances[i].flip(-1) if flip else self.instances[i]
            item["instance_classes"] = self.instance_classes[i]
        if self.randaugment is not None:
            strong = image.flip(-1) if bool(torch.rand(()) < 0.5) else image
            item["strong"] = self.randaugment(strong)
        return item


class EvalSet(Dataset):
    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "full": self.targets[i]}


@dataclass
class Normalizer:
    """uint8 images to ImageNet-normalised floats, on the device, for a whole batch at once."""

    device: torch.device
    channels_last: bool = False

    def __post_init__(self):
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, item: dict[str, Any]) -> Batch:
        dev = self.device
        return Batch(
            index=item["index"].to(dev, non_blocking=True),
            image=self(item["image"]),
            observed=item["observed"].to(dev, non_blocking=True).float(),
            full=item["full"].to(dev, non_blocking=True).float(),
            strong=self(item["strong"]) if "strong" in item else None,
            instances=item["instances"].to(dev, non_blocking=True) if "instances" in item else None,
            instance_classes=item["instance_classes"].to(dev, non_blocking=True) if "instance_classes" in item else None,
        )
