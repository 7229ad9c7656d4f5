"""``spml bench loader``: the training input pipeline alone, in images/s delivered to the device.

The loader is the one ``spml train`` builds: :class:`pipeline.data.TrainSet` over the images in a format of
:data:`IMAGE_FORMATS` (``--format``), the seeded loader with :func:`pipeline.train.loader_settings` (workers:
``--num-workers``, pinned memory on CUDA, persistent workers), then the loop's :class:`pipeline.data.Normalizer`
on the device, with the views made where ``augment_on`` says (``--augment-on loader|device``). Set its images/s
against the step's (``spml bench step``): when the loader's figure is the lower one, the loader bounds training.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import load_params
from pipeline.data import ImageArray
from pipeline.errors import SpmlError
from pipeline.methods import get_method_class
from pipeline.runtime.distributed import DistContext
from pipeline.tools.bench import BenchData, Timed, bench_configs, device_name, header_line, random_data
from pipeline.tools.settings import setting
from pipeline.train import build_normalizer, setup_process

LOADER_ROWS_PER_BATCH = 8  # distinct images, in batches; the sampler cycles over them by epoch


def cached_images(data: BenchData, folder: Path) -> ImageArray:
    """``cached``: the (N, 3, S, S) uint8 memory map that ``spml train`` decodes a dataset's images into once
    (``data/cache/``) and reads every epoch after."""
    import numpy as np

    path = folder / "images.npy"
    np.save(path, data.images.numpy())
    return ImageArray(path)


# --format: how the bench's images are stored for the loader to read, each a function writing ``data``'s images
# into a temporary folder and returning what TrainSet reads. Another format (e.g. the dataset's own files) is
# one more entry here.
IMAGE_FORMATS: dict[str, Callable[[BenchData, Path], ImageArray]] = {"cached": cached_images}


@dataclass
class LoaderResult(Timed):
    augment_on: str
    times_ms: list[float]  # per batch: from the previous batch's views on the device to this one's
    batch_size: int


def run_loader_bench(methods: list[str], params_path: Path = Path("params.yaml"), dataset: str = "synthetic",
                     steps: int = 20, warmup: int = 3, num_classes: int = 20, seed: int = 0,
                     image_format: str = "cached", **overrides: Any) -> tuple[LoaderResult, dict[str, Any]]:
    """Time the training input pipeline as ``spml train`` builds it over random uint8 images stored as
    ``image_format``. A strong view is made if one of ``methods`` needs it. ``overrides``: settings by params
    key (image_size, batch_size, device, threads, num_workers, channels_last, augment_on). Returns the median
    time per delivered batch after ``warmup`` batches (at least one per worker: their start), and the header."""
    from torch.utils.data import DataLoader

    from pipeline.data import TrainSet
    from pipeline.runtime.distributed import EpochSampler
    from pipeline.train import loader_settings

    if not methods:
        raise SpmlError("no method to bench; pass e.g. --method an --method ignore")
    if image_format not in IMAGE_FORMATS:
        raise SpmlError(f"--format {image_format!r}: use {' or '.join(IMAGE_FORMATS)}")
    if steps < 1 or warmup < 0 or overrides.get("batch_size", 1) < 1 or overrides.get("num_workers", 0) < 0:
        raise SpmlError("--steps must be >= 1, --warmup >= 0, --batch-size >= 1 and --num-workers >= 0")
    runs = bench_configs(load_params(params_path), dataset, methods, seed, None, overrides)
    cfg, rt = runs[0].train, runs[0].runtime
    if cfg.decode == "device":
        raise SpmlError("params train.decode is device, but this bench times cached arrays, no files; time the "
                        "device decode on JPEGs with `spml bench input --decode device`")
    workers = setting(runs[0], "num_workers")
    warmup = max(warmup, workers)  # every worker's first batch (its start) is left out
    device = setup_process(cfg, rt, DistContext())
    strong = any(get_method_class(run.method).needs_strong_view for run in runs)
    data = random_data(cfg.batch_size * LOADER_ROWS_PER_BATCH, num_classes, cfg.image_size, seed)
    normalize = build_normalizer(cfg, device, setting(runs[0], "channels_last"))
    times = []
    with tempfile.TemporaryDirectory(prefix="spml-bench-loader-") as tmp:
        train = TrainSet(IMAGE_FORMATS[image_format](data, Path(tmp)), data.observed, data.full, strong,
                         cfg.strong_num_ops, cfg.strong_magnitude, augment=cfg.augment, augment_on=cfg.augment_on)
        sampler = EpochSampler(len(train), seed)
        loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                            **loader_settings(rt, device))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        epoch, done, last = 0, 0, time.perf_counter()
        while done < warmup + steps:
            epoch += 1
            sampler.set_epoch(epoch)
            for item in loader:
                batch = normalize.batch(item)
                sync()
                now = time.perf_counter()
                if done >= warmup:
                    times.append(1000.0 * (now - last))
                last, done = now, done + 1
                if done == warmup + steps:
                    break
            del batch
        del loader  # its workers exit before the temporary files go
    header = {"loader": "train", "format": image_format, "image_size": cfg.image_size, "batch": cfg.batch_size,
              "workers": workers, "device": device_name(device), "augment_on": cfg.augment_on,
              "views": "weak+strong" if strong else "weak", "batches": steps, "threads": torch.get_num_threads()}
    return LoaderResult(cfg.augment_on, times, cfg.batch_size), header


def format_loader(result: LoaderResult, header: dict[str, Any]) -> str:
    line = (f"loader  augment_on={result.augment_on:<6}  {result.median_ms:8.2f} ms/batch  "
            f"{result.images_per_s:8.1f} img/s delivered")
    return "\n".join([header_line(header), line])
