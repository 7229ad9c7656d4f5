"""Images and labels for training and evaluation.

Images are decoded once, resized to the training size and held as a uint8 tensor (N, 3, S, S); the
per-sample work left in the loader is a flip and, for the strong view, RandAugment. Normalisation runs
on the device, on the whole batch.

The strong view follows the official IGNORE code: RandAugment runs on the full-resolution image, *before*
the resize (its translations are a fraction of the full image, its nearest-neighbour rotations and shears
act on full-resolution pixels), then the resize and an independent flip. An image stored at the training
size already (the synthetic data) is the cached array itself, so there the cache is used; any other is
decoded from its file for the strong view (the weak view still comes from the cache), and its resize after
RandAugment is torch's (:func:`pipeline.decode.resize_uint8`: PIL's bilinear filter to within 1 level of 255,
3x faster; the official code resizes with PIL).

For the paper's datasets at 448 px the images do not fit in RAM (COCO: ~74 GB of uint8), so
:func:`cached_images` decodes and resizes them once into ``data/cache/<dataset>/<size>-<key>.npy``, a
uint8 memory map keyed by the images' names and content (:func:`cache_key`), built with a progress bar
and moved into place atomically; training reads rows from it (:class:`ImageArray`), with decoding off the critical path.
Before building, it refuses (one line, needed and free bytes) a disk that cannot hold it.

Augmentation is seeded per sample: a loader key ``(row, seed)`` (see :class:`pipeline.runtime.distributed.EpochSampler`)
makes the flips and RandAugment of a sample a function of that seed alone.

With ``augment_on="device"`` (params ``train.augment_on``) the loader does none of that work: it hands out the
cached image and the sample's draws (:func:`pipeline.augment.draw_views`, the same draws from the same seed),
and :class:`Normalizer` makes the views on the device, batched (:class:`pipeline.augment.DeviceAugment`).
With ``decode="device"`` as well (params ``train.decode``) it hands out the file's JPEG bytes instead of the
cached image, and the device decodes them (:mod:`pipeline.decode`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torchvision.transforms import RandAugment

from pipeline.contracts import Batch, HiddenLabels
from pipeline.decode import decode_resize, read_jpeg, resize_uint8
from pipeline.errors import SpmlError, bomb_error, missing_image_error
from pipeline.progress import progress_bar

if TYPE_CHECKING:
    from pipeline.augment import DeviceAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_INSTANCES = 8
NPY_HEADER_BYTES = 128  # numpy's .npy format pads its header to a multiple of 64 bytes; this shape's takes 128


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img if img.mode == mode else img.convert(mode)  # convert to the same mode would copy it
    except Image.DecompressionBombError as exc:
        raise bomb_error(path, exc) from None
    except FileNotFoundError:
        raise missing_image_error(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SpmlError(f"image {path} is corrupt or not an image ({exc}); replace the file") from None


def seed_sample(seed: int) -> None:
    """Seed the draws of one sample: torch.manual_seed, but in a loader worker the CPU generator's alone (the same
    draws): there torch.manual_seed's queuing of the device generators' seeding, which captures a Python stack
    each call (0.3-0.6 ms, 5 % of a real-data sample's loader work), serves no one, since workers run no device
    code. In the main process (num_workers 0) it stays torch.manual_seed, device generators included, as before."""
    if get_worker_info() is not None:
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


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


def _decode(root: Path, rel: str, size: int) -> np.ndarray:
    img = _open(root / rel, "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


class _DecodeSet(Dataset):
    def __init__(self, root: Path, rel_paths: list[str], size: int):
        self.root, self.rel_paths, self.size = root, rel_paths, size

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(_decode(self.root, self.rel_paths[i], self.size)))


def cache_key(root: Path, rel_paths: list[str], size: int, source_hash: str) -> tuple[str, str]:
    """Key of the image cache: (which images, what they hold).

    The first part hashes the resolved root, the size and the file names; the second the label table's
    source hash (``provenance.labels_sha256``: labels and image ids) and, per listed file, its byte size
    and modification time (ns). Regenerated or replaced images change size or mtime, so they get a new
    cache; a hit costs one stat() per image (29 ms for the synthetic 5,000 on the 2-core dev machine), where hashing the bytes
    would read the whole dataset (~20 GB for COCO) on every run.
    """
    root = Path(root).resolve()
    names = hashlib.sha256(f"{root}\n{size}\n".encode())
    content = hashlib.sha256(f"{source_hash}\n".encode())
    for rel in rel_paths:
        try:
            st = os.stat(root / rel)
        except FileNotFoundError:
            raise missing_image_error(root / rel) from None
        names.update(rel.encode() + b"\n")
        content.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
    return names.hexdigest()[:16], content.hexdigest()[:16]


def cache_bytes(num_images: int, size: int) -> int:
    """Bytes of the image cache of ``num_images`` images at ``size`` px: uint8 pixels and the .npy header."""
    return num_images * 3 * size * size + NPY_HEADER_BYTES


def cached_images(root: Path, rel_paths: list[str], size: int, cache_dir: Path, source_hash: str,
                  what: str = "images", num_workers: int = 0) -> Path:
    """Path of a (N, 3, size, size) uint8 .npy of the images, building it once if needed (atomic).

    ``<size>-<names>-<content>.npy`` (see :func:`cache_key`); once a new one is in place, the caches of the
    same images with an older content are deleted (regenerated data would otherwise pile up).
    """
    from pipeline.io import TMP_MARK, atomic_file, ensure_dir, reserve

    names_key, content_key = cache_key(root, rel_paths, size, source_hash)
    path = Path(cache_dir) / f"{size}-{names_key}-{content_key}.npy"
    if path.exists():
        return path
    ensure_dir(path.parent)
    needed = cache_bytes(len(rel_paths), size)
    free = shutil.disk_usage(path.parent).free
    if free < needed:  # before any decoding: a full disk would otherwise stop the build hours in
        raise SpmlError(f"the image cache of {what} at {size} px needs {needed:,} bytes ({needed / 1e9:.1f} GB) in "
                        f"{path.parent}, which has {free:,} bytes free; free space there or make {Path(cache_dir)} a "
                        "link to a disk with room (with train.decode: device the training images are not cached)")
    # its own generator: building the cache must not move the global RNG (model init follows)
    loader = DataLoader(_DecodeSet(Path(root), rel_paths, size), batch_size=64, num_workers=num_workers,
                        generator=torch.Generator())
    with atomic_file(path, needed=needed) as tmp, progress_bar(transient=True) as bar:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rel_paths), 3, size, size))
        reserve(tmp)  # a memory map on a full disk dies of SIGBUS at the first page it cannot write
        task = bar.add_task(f"caching {what} at {size} px", total=len(rel_paths))
        start = 0
        for block in loader:
            out[start:start + len(block)] = block.numpy()
            start += len(block)
            bar.advance(task, len(block))
        out.flush()
        del out
    for stale in path.parent.glob(f"{size}-{names_key}-*.npy"):  # a reader mapping one keeps it until it exits
        if stale != path and TMP_MARK not in stale.name:
            stale.unlink(missing_ok=True)
    return path


class ImageArray:
    """Rows of a cached image .npy, opened lazily (per process) as a read-only memory map.

    ``images[i]`` is a (3, S, S) uint8 tensor; the object pickles as its path, so loader workers
    started by fork or spawn each map the file themselves instead of copying it.
    """

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | None = None):
        self.path = Path(path)
        self._array = None
        n = np.load(self.path, mmap_mode="r").shape[0]
        self.rows = np.arange(n) if rows is None else np.asarray(rows)

    def _open(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._open()[self.rows[i]]))

    def __getstate__(self):
        return {"path": self.path, "rows": self.rows, "_array": None}


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
    """Weak view (random horizontal flip) and, on request, an independent strong view.

    ``augment="standard"``: strong = RandAugment on the full-resolution image (``source``: the image root
    and each row's file, read when its size differs from the cached one), resize, random flip.
    ``augment="lac"`` (Xie et al.): strong = random flip of the resized image, then
    :func:`pipeline.augment.lac_strong_view`.
    ``augment_on="device"`` (``augment="standard"`` only; the lac views are always made here): the item holds
    the unflipped cached image (and instance map) and the sample's view draws instead of the views
    (:func:`pipeline.augment.draw_views`). With ``decode="device"`` as well, it holds the file's JPEG bytes
    instead of the cached image (``images`` may then be None; batch with :func:`collate_jpeg`).
    """

    def __init__(self, images: torch.Tensor, observed: torch.Tensor, full: torch.Tensor,
                 strong: bool = False, strong_num_ops: int = 3, strong_magnitude: int = 5,
                 instances: torch.Tensor | None = None, instance_classes: torch.Tensor | None = None,
                 source: tuple[Path, list[str]] | None = None, augment: str = "standard",
                 augment_on: str = "loader", decode: str = "cpu"):
        self.images, self.observed, self.full = images, observed, full
        self.instances, self.instance_classes = instances, instance_classes
        self.source, self.augment = source, augment
        if augment_on not in ("loader", "device"):
            raise ValueError(f"augment_on must be loader or device, got {augment_on!r}")
        self.augment_on = augment_on if augment == "standard" else "loader"  # Xie et al.'s views: PIL, in the loader
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode must be cpu or device, got {decode!r}")
        if decode == "device" and (self.augment_on != "device" or source is None):
            raise ValueError("decode on the device needs augment_on device, the standard views and the image files "
                             "(source)")
        self.decode = decode
        self.strong_num_ops = strong_num_ops if strong else None
        if self.augment_on == "device":
            # imported before the loader workers fork (not by each worker's first item), and not at the top:
            # pretraining imports this module, not the augmentations
            from pipeline.augment import draw_views

            self._draw_views = draw_views
        # per row: 1 if its file is stored at the training size (the cache holds its pixels), 0 if not, -1 not
        # yet known; probed once per row and process, not every epoch (a header read costs ~0.5 ms)
        self._native = np.full(len(observed), -1, dtype=np.int8)
        self.randaugment = RandAugment(num_ops=strong_num_ops, magnitude=strong_magnitude) if strong else None

    def __len__(self) -> int:
        return len(self.observed)  # images is None where the device decodes the files

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):  # (row, seed): this sample's augmentation depends on its seed only
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                seed_sample(seed)
                return self._item(int(i))
        return self._item(key)

    def _item(self, i: int) -> dict[str, Any]:
        if self.augment_on == "device":
            return self._draws_item(i)
        image = self.images[i]
        flip = bool(torch.rand(()) < 0.5)
        item = {"index": i, "image": image.flip(-1) if flip else image,
                "observed": self.observed[i], "full": self.full[i]}
        if self.instances is not None:
            item["instances"] = self.instances[i].flip(-1) if flip else self.instances[i]
            item["instance_classes"] = self.instance_classes[i]
        if self.randaugment is not None:
            item["strong"] = self._strong(i, image)
        return item

    def _draws_item(self, i: int) -> dict[str, Any]:
        if self.decode == "device":  # the file's bytes; the device decodes and resizes them (pipeline.decode)
            root, rel_paths = self.source
            pixels = {"jpeg": read_jpeg(root / rel_paths[i])}
        else:
            pixels = {"image": self.images[i]}
        item = {"index": i, **pixels, "observed": self.observed[i], "full": self.full[i],
                **self._draw_views(self.strong_num_ops)}
        if self.instances is not None:
            item["instances"], item["instance_classes"] = self.instances[i], self.instance_classes[i]
        return item

    def _strong(self, i: int, image: torch.Tensor) -> torch.Tensor:
        if self.augment == "lac":
            from pipeline.augment import lac_strong_view

            flipped = image.flip(-1) if bool(torch.rand(()) < 0.5) else image
            return lac_strong_view(Image.fromarray(flipped.permute(1, 2, 0).numpy()))
        size = tuple(image.shape[-2:])
        full = self._full_resolution(i, size)
        if full is None:  # stored at the training size: RandAugment, then the flip, on the cached pixels
            strong = self.randaugment(image)
        else:  # torch's resize: PIL's filter to within 1 level, 3x faster (pipeline.decode)
            strong = resize_uint8(torch.from_numpy(np.array(self.randaugment(full))).permute(2, 0, 1), size)
        return strong.flip(-1) if bool(torch.rand(()) < 0.5) else strong

    def _full_resolution(self, i: int, size: tuple[int, int]) -> Image.Image | None:
        """The row's original image when it is larger or smaller than the training size, else None."""
        if self.source is None:
            return None
        root, rel_paths = self.source
        if self._native[i] < 0:
            with Image.open(root / rel_paths[i]) as probe:  # reads the header only
                self._native[i] = probe.size == size[::-1]
        return None if self._native[i] else _open(root / rel_paths[i], "RGB")


def collate_jpeg(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of training items that carry JPEG bytes (``TrainSet(decode="device")``): the bytes, of
    different lengths, stay a list of tensors."""
    batch = default_collate([{key: value for key, value in item.items() if key != "jpeg"} for item in items])
    batch["jpeg"] = [item["jpeg"] for item in items]
    return batch


class EvalSet(Dataset):
    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[0] if isinstance(key, (tuple, list)) else key
        return {"index": i, "image": self.images[i], "full": self.targets[i]}


@dataclass
class Normalizer:
    """uint8 images to ImageNet-normalised floats (or to [0, 1] with ``imagenet=False``, Xie et al.'s
    pipeline), on the device, for a whole batch at once; with ``augment``, training items that carry view
    draws (``TrainSet(augment_on="device")``) get their views made here first, and with ``decode_size``
    (height, width) items that carry JPEG bytes (``TrainSet(decode="device")``) are decoded and resized here
    before that (:func:`pipeline.decode.decode_resize`)."""

    device: torch.device
    channels_last: bool = False
    imagenet: bool = True
    augment: DeviceAugment | None = None
    decode_size: tuple[int, int] | None = None

    def __post_init__(self):
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.imagenet else ((0.0,) * 3, (1.0,) * 3)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, item: dict[str, Any], label_source: str = "observed") -> Batch:
        """A loader item as a method sees it: no hidden labels; ``item[label_source]`` (the method's
        ``Method.label_source``: "observed", or "full" for the full-label upper bound) as ``observed``."""
        dev = self.device
        weak, strong = item.get("image"), item.get("strong")
        if "jpeg" in item:  # the loader sent the files' bytes: decode them here, batched
            if self.decode_size is None:
                raise SpmlError("the training loader hands out JPEG bytes (train.decode device) but the normaliser "
                                "decodes none; build it with pipeline.train.build_normalizer")
            weak = decode_resize(item["jpeg"], self.decode_size, dev)
        if "flip" in item:  # the loader sent draws, not views: make them here, batched
            if self.augment is None:
                raise SpmlError("the training loader hands out view draws (train.augment_on device) but the "
                                "normaliser has no device augmentation; build it with pipeline.train.build_normalizer")
            raw = weak.to(dev, non_blocking=True)
            weak = self.augment.flip(raw, item["flip"])
            if "strong_ops" in item:
                strong = self.augment.strong(raw, item["strong_ops"], item["strong_signs"], item["strong_flip"])
        return Batch(
            index=item["index"].to(dev, non_blocking=True),
            image=self(weak),
            observed=item[label_source].to(dev, non_blocking=True).float(),
            strong=self(strong) if strong is not None else None,
        )

    def hidden(self, item: dict[str, Any]) -> HiddenLabels:
        """The item's ground truth, for the training loop's diagnostics only (never handed to a method)."""
        dev = self.device
        instances = item["instances"].to(dev, non_blocking=True) if "instances" in item else None
        if instances is not None and "flip" in item:  # device views: the weak view's flip, as the loader's
            flags = item["flip"].to(dev, non_blocking=True).view(-1, 1, 1)
            instances = torch.where(flags, instances.flip(-1), instances)
        return HiddenLabels(
            full=item["full"].to(dev, non_blocking=True).float(),
            instances=instances,
            instance_classes=(item["instance_classes"].to(dev, non_blocking=True)
                              if "instance_classes" in item else None),
        )


@dataclass
class MethodBatches:
    """The training loader as a method sees it (``Method.on_epoch_end``): each pass iterates ``loader`` once,
    lazily, and yields :meth:`Normalizer.batch` of every item, without the hidden labels."""

    loader: Iterable[dict[str, Any]]
    normalize: Normalizer
    label_source: str = "observed"

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:  # a generator: the loader is iterated only if the method asks
            yield self.normalize.batch(item, self.label_source)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]
