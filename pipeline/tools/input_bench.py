"""The training input pipeline on real-format JPEGs: ours against a loader built like the official IGNORE code's.

``spml bench input`` (:func:`run_input_bench`). The data: ``--images`` JPEGs in COCO 2014's
layout (:func:`pipeline.tools.coco_like.write_coco_like`: COCO's sizes and file sizes, photo-like content), or the
first ``--images`` training images of a real COCO 2014 folder (``--coco-root``); their rows come from the COCO
instance file through :func:`pipeline.datasets.coco2014.format_phase`, as ``spml prepare`` makes them (read with the
standard ``json`` module, so the bench runs where only torch is installed, as ``spml bench`` does).

The two loaders, each seeded per sample from the same :class:`pipeline.runtime.distributed.EpochSampler` (the same
samples, order and augmentation draws):

* **ours**: what ``spml train`` builds for a real dataset. The image cache at the training size is built first
  (:func:`pipeline.data.cached_images`; its build time per image is reported and projected to COCO), then
  :class:`pipeline.data.TrainSet` with the params' ``augment_on`` and ``decode``: with ``loader``/``cpu`` the weak view
  is a cached row and a flip, the strong view the file decoded, RandAugment at full resolution, the resize and a
  flip, all uint8; with ``device``/``cpu`` the loader hands out cached rows and draws; with ``device``/``device`` the
  files' bytes and draws. The loop's :class:`pipeline.data.Normalizer` makes the views and normalises on the device.
* **official**: :class:`OfficialStyleSet`, per sample as the official code (``datasets.py``, spec ``ignore.md``
  section 4.4): PIL opens the file and converts it to RGB per view; weak = Resize, RandomHorizontalFlip, ToTensor,
  Normalize; strong = RandAugment first, on the full-resolution image, then the same; and, as the official code
  does for every sample, a third view (``raw``: resized, ToTensor, not normalised) that training never uses but
  that the loader makes and hands over in the batch. Float32 batches leave the workers.
* **official-2v**: the same without the unused raw view: a stricter comparison (a loader built the official way
  with only the views training reads).

What is timed: for each round, worker count and loader (interleaved, the loaders' order alternating by round), one
epoch over the images after an untimed one (which starts the persistent workers and reads the files into the page
cache): images / wall time from the epoch's first request to its last batch, the batches only handed to the main
process. Separately, the device side of each loader (``device side``): the loop's work on the delivered batches,
timed on a few of them: ours :meth:`Normalizer.batch` (normalisation, and with ``augment_on: device`` the views,
with ``decode: device`` the decode); official the copy to the device. On a GPU the two sides overlap and the slower
one bounds training; on a CPU they share the cores. Reported per loader and worker count: the median images/s of
the rounds, per worker, the CPU milliseconds per image of its workers (Linux's /proc; other load on the machine
moves it far less than the wall time) and of the main process, and the cores (one worker each) needed to feed
:data:`FEED_TARGETS`. docs/bench-cpu.md has the command the documented figures come from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.tools.bench_prepare import SHAPES
from pipeline.config import load_params
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, seed_sample
from pipeline.errors import SpmlError

if TYPE_CHECKING:
    from pipeline.run_config import RuntimeConfig, TrainConfig

# images/s to feed: ResNet-50 IGNORE's step on an H200 in bf16 + channels_last (docs/bench-gpu.md), and a
# round figure past AN's (801) for a compiled or faster step
FEED_TARGETS = (361, 1000)
DEVICE_SIDE_BATCHES = 4  # batches the device side is timed on (each round)
LOADERS = ("ours", "official", "official-2v")


class OfficialStyleSet(Dataset):
    """A training set built as the official IGNORE code builds its own (from the spec's description, not its code):
    per sample PIL opens the file and each view converts it to RGB and runs torchvision's transforms on it."""

    def __init__(self, root: Path, rel_paths: list[str], observed: torch.Tensor, full: torch.Tensor, size: int,
                 strong: bool, num_ops: int, magnitude: int, raw: bool = False):
        from torchvision import transforms as T

        self.root, self.rel_paths, self.observed, self.full = Path(root), rel_paths, observed, full
        weak = [T.Resize((size, size)), T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.weak = T.Compose(weak)
        # the official code's `image_raw` (resize, ToTensor): made and batched for every sample, read by nothing
        self.raw = T.Compose([T.Resize((size, size)), T.ToTensor()]) if raw else None
        # the official strong pipeline: a copy of the weak one with RandAugment inserted first
        self.strong = T.Compose([T.RandAugment(num_ops, magnitude), *copy.deepcopy(weak)]) if strong else None

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):  # (row, seed), as TrainSet: the same draws for the same sample
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                seed_sample(seed)  # in a worker ~0.02 ms: the official code's own draws cost nothing extra either
                return self._item(int(i))
        return self._item(key)

    def _item(self, i: int) -> dict[str, Any]:
        with Image.open(self.root / self.rel_paths[i]) as file:
            item = {"index": i, "image": self.weak(file.convert("RGB")), "observed": self.observed[i],
                    "full": self.full[i]}
            if self.raw is not None:  # the official order: weak, raw, strong
                item["raw"] = self.raw(file.convert("RGB"))
            if self.strong is not None:
                item["strong"] = self.strong(file.convert("RGB"))
        return item


@dataclass
class EpochCpu:
    """CPU seconds a timed epoch took: its loader workers' (None where /proc cannot be read) and the main
    process's (receiving the batches), over ``images`` images."""

    workers: float | None
    main: float
    images: int


@dataclass
class InputRate:
    """One loader at one worker count: images/s of each round's timed epoch, its CPU time, and the images/s
    of its device side."""

    loader: str
    workers: int
    reads: str  # what its workers read per sample
    rates: list[float] = field(default_factory=list)
    cpu: list[EpochCpu] = field(default_factory=list)
    device_rates: list[float] = field(default_factory=list)

    @property
    def worker_cpu_ms(self) -> float | None:
        """Median CPU milliseconds the workers spent per image: the share of a core each image costs, which
        other load on the machine does not change as it changes the wall time."""
        values = [1000 * c.workers / c.images for c in self.cpu if c.workers is not None]
        return statistics.median(values) if values else None

    @property
    def main_cpu_ms(self) -> float:
        return statistics.median(1000 * c.main / c.images for c in self.cpu)

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def per_worker(self) -> float:
        return self.images_per_s / self.workers

    def cores_for(self, target: float) -> int:
        """Workers (one core each) to deliver ``target`` images/s at this per-worker rate."""
        return math.ceil(target / self.per_worker)


@dataclass
class FileStats:
    count: int
    total_bytes: int
    mean_pixels: float
    grayscale: int
    sizes: dict[str, int]  # "WxH": count, most common first


@dataclass
class InputBench:
    rates: list[InputRate]
    header: dict[str, Any]
    files: FileStats
    cache_s: float  # time to build the image cache of the files, in one process
    cache_bytes: int
    coco_cache: dict[str, tuple[int, int]]  # COCO 2014's cache at the bench's size: what -> (rows, bytes)


def coco_train_rows(root: Path, limit: int) -> tuple[list[str], np.ndarray]:
    """The first ``limit`` training rows of a COCO 2014 folder as ``spml prepare`` orders them: paths and labels."""
    from pipeline.datasets.coco2014 import annotation_file, format_phase

    path = annotation_file(Path(root), "train")
    try:
        document = json.loads(path.read_text())
        annotations, categories = document["annotations"], document["categories"]
        image_ids = np.asarray([a["image_id"] for a in annotations], dtype=np.int64)
        category_ids = np.asarray([a["category_id"] for a in annotations], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpmlError(f"annotation file {path} is not a COCO instances JSON ({exc!r}); pass a COCO 2014 folder "
                        "or leave --coco-root out to generate one") from None
    rows = format_phase(categories, image_ids, category_ids, "train", path)
    if len(rows.paths) < limit:
        raise SpmlError(f"{path} lists {len(rows.paths)} annotated training images, fewer than --images {limit}; "
                        "lower --images")
    return rows.paths[:limit], rows.labels[:limit]


def file_stats(root: Path, rel_paths: list[str]) -> FileStats:
    from collections import Counter

    sizes, pixels, gray, total = Counter(), [], 0, 0
    for rel in rel_paths:
        path = root / rel
        total += path.stat().st_size
        with Image.open(path) as image:  # the header only
            sizes[f"{image.size[0]}x{image.size[1]}"] += 1
            pixels.append(image.size[0] * image.size[1])
            gray += image.mode == "L"
    return FileStats(len(rel_paths), total, float(np.mean(pixels)), gray, dict(sizes.most_common()))


def _observed(labels: np.ndarray) -> torch.Tensor:
    """One observed positive per row (its first), as a single-positive table holds."""
    observed = np.zeros(labels.shape, dtype=np.float32)
    observed[np.arange(len(labels)), labels.argmax(1)] = 1.0
    return torch.from_numpy(observed)


def run_input_bench(methods: list[str], params_path: Path = Path("params.yaml"), dataset: str = "coco2014",
                    num_images: int = 64, worker_counts: tuple[int, ...] = (1, 2), rounds: int = 3, seed: int = 0,
                    coco_root: Path | None = None, **overrides: Any) -> InputBench:
    """Time ours against the official-style loader (module docstring). ``overrides``: ``train`` values
    (image_size, batch_size, device, threads, augment_on, decode)."""
    from pipeline.tools.bench import bench_configs, device_name
    from pipeline.data import ImageArray, TrainSet, cache_bytes, cached_images, collate_jpeg
    from pipeline.methods import get_method_class
    from pipeline.runtime.distributed import DistContext
    from pipeline.train import build_normalizer, check_decode, setup_process

    if dataset != "coco2014":
        raise SpmlError(f"the real-format loader bench reads COCO 2014 files only, got dataset {dataset}; use "
                        "coco2014 (`spml bench loader` times random arrays for any dataset's params)")
    if not methods:
        raise SpmlError("no method given; pass e.g. --method ignore")
    if not worker_counts or min(worker_counts) < 1 or rounds < 1 or num_images < 1:
        raise SpmlError("--worker-count must be >= 1 (e.g. --worker-count 1 --worker-count 2), --rounds >= 1 and "
                        "--images >= 1")
    params = load_params(params_path)
    runs = bench_configs(params, dataset, methods, seed, None, overrides)
    cfg, rt = runs[0].train, runs[0].runtime
    if cfg.augment != "standard":
        raise SpmlError(f"the official-style loader makes IGNORE's standard views; {runs[0].method} trains with "
                        f"train.augment {cfg.augment}; bench a method with the standard views (e.g. --method ignore)")
    if num_images < cfg.batch_size:
        raise SpmlError(f"--images {num_images} is less than one batch of {cfg.batch_size}; raise --images")
    device = setup_process(cfg, rt, DistContext())
    strong = any(get_method_class(run.method).needs_strong_view for run in runs)
    size = cfg.image_size
    with tempfile.TemporaryDirectory(prefix="spml-bench-input-") as tmp:
        if coco_root is None:
            from pipeline.tools.coco_like import write_coco_like

            root = Path(tmp) / "coco2014"
            write_coco_like(root, num_images, num_val=1, seed=seed)
            origin = f"generated by pipeline.tools.coco_like (seed {seed})"
        else:
            root, origin = Path(coco_root), f"the first {num_images} training rows of {coco_root}"
        rel_paths, labels = coco_train_rows(root, num_images)
        check_decode(cfg, root / rel_paths[0])
        files = file_stats(root, rel_paths)
        started = time.perf_counter()  # in this process: a per-image cost, without worker start-up
        cache = cached_images(root, rel_paths, size, Path(tmp) / "cache", "bench", f"{dataset} images", 0)
        cache_s = time.perf_counter() - started

        observed, full = _observed(labels), torch.from_numpy(labels.astype(np.float32))
        ours = TrainSet(ImageArray(cache) if cfg.decode == "cpu" else None, observed, full, strong, cfg.strong_num_ops,
                        cfg.strong_magnitude, source=(root, rel_paths), augment=cfg.augment,
                        augment_on=cfg.augment_on, decode=cfg.decode)
        official = OfficialStyleSet(root, rel_paths, observed, full, size, strong, cfg.strong_num_ops,
                                    cfg.strong_magnitude, raw=True)
        official_2v = OfficialStyleSet(root, rel_paths, observed, full, size, strong, cfg.strong_num_ops,
                                       cfg.strong_magnitude)
        ours_reads = {("loader", "cpu"): "cache + files" if strong else "cache", ("device", "cpu"): "cache",
                      ("device", "device"): "files (bytes)"}[(cfg.augment_on, cfg.decode)]

        def to_device(item: dict[str, Any]) -> None:  # the official loop's only device work: its batches are ready
            for key in ("image", "strong"):
                if key in item:
                    item[key].to(device, non_blocking=True)

        normalize = build_normalizer(cfg, device, rt.channels_last)
        sets = {"ours": (ours, collate_jpeg if cfg.decode == "device" else None, normalize.batch),
                "official": (official, None, to_device if device.type != "cpu" else None),
                "official-2v": (official_2v, None, to_device if device.type != "cpu" else None)}
        results = {(name, w): InputRate(name, w, ours_reads if name == "ours" else "files")
                   for w in worker_counts for name in LOADERS}
        for index in range(rounds):
            for workers in worker_counts:
                for name in (LOADERS if index % 2 == 0 else LOADERS[::-1]):
                    data, collate, device_side = sets[name]
                    rate, cpu, device_rate = _time_epoch(data, collate, device_side, workers, cfg, rt, device,
                                                         seed)
                    results[(name, workers)].rates.append(rate)
                    results[(name, workers)].cpu.append(cpu)
                    if device_rate is not None:
                        results[(name, workers)].device_rates.append(device_rate)
    train_rows, test_rows = SHAPES["train"][1], SHAPES["val"][1]  # COCO 2014's annotated images: the table's rows
    coco = {"all rows": train_rows + test_rows,  # decode: device caches val and test only
            "val + test rows": round(params["split"]["val_fraction"] * train_rows) + test_rows}
    header = {"dataset": dataset, "image_size": size, "batch": cfg.batch_size, "views": "weak+strong" if strong else "weak",
              "device": device_name(device), "augment_on": cfg.augment_on, "decode": cfg.decode, "rounds": rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "origin": origin}
    return InputBench([results[(name, w)] for w in worker_counts for name in LOADERS], header, files, cache_s,
                      cache_bytes(num_images, size),
                      {what: (rows, cache_bytes(rows, size)) for what, rows in coco.items()})


def _time_epoch(data: Dataset, collate, device_side, workers: int, cfg: TrainConfig, rt: RuntimeConfig,
                device: torch.device, seed: int) -> tuple[float, EpochCpu, float | None]:
    """Images/s of one epoch after an untimed one, the CPU time it took, and the images/s of ``device_side``
    (None: there is none) on its first batches."""
    from pipeline.runtime.distributed import EpochSampler
    from pipeline.train import loader_settings

    sampler = EpochSampler(len(data), seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed),
                        **loader_settings(dataclasses.replace(rt, num_workers=workers), device))
    sampler.set_epoch(1)
    for _ in loader:  # starts the workers, fills the page cache and the loaders' per-row header probes
        pass
    sampler.set_epoch(2)
    kept = []
    started, main_started = time.perf_counter(), time.process_time()
    batches = iter(loader)  # the persistent workers start on the epoch's first batches here
    pids = [worker.pid for worker in getattr(batches, "_workers", [])]  # torch's (private) worker handles
    workers_started = _cpu_seconds(pids)
    for item in batches:
        if device_side is not None and len(kept) < DEVICE_SIDE_BATCHES:
            kept.append(item)
    rate = len(data) / (time.perf_counter() - started)
    workers_cpu = _cpu_seconds(pids)
    cpu = EpochCpu(None if workers_cpu is None or workers_started is None else workers_cpu - workers_started,
                   time.process_time() - main_started, len(data))
    del batches, loader  # its workers exit

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device_side is None:
        return rate, cpu, None
    device_side(kept[0])  # the first call pays one-time costs (kernels, allocator)
    sync()
    started = time.perf_counter()
    for item in kept:
        device_side(item)
    sync()
    return rate, cpu, sum(len(item["index"]) for item in kept) / (time.perf_counter() - started)


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes ``pids`` have used (Linux's /proc); None where it cannot be read."""
    import os

    try:
        ticks = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: the stat file's fields 14 and 15
        return ticks / os.sysconf("SC_CLK_TCK") if pids else None
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def format_input_bench(bench: InputBench) -> str:
    f, h = bench.files, bench.header
    sizes = ", ".join(f"{k} {v}" for k, v in list(f.sizes.items())[:4])
    lines = [
        "# " + " ".join(f"{k}={v}" for k, v in h.items() if k != "origin"),
        f"# {h['dataset']}: read {f.count} JPEG files in COCO 2014's layout ({f.total_bytes / 1e6:.1f} MB, mean "
        f"{f.total_bytes / f.count / 1e3:.0f} KB, mean {f.mean_pixels / 1e3:.0f}k pixels; {sizes}; {f.grayscale} "
        f"grayscale), {h['origin']}",
        f"# image cache of the {f.count} images at {h['image_size']} px: {bench.cache_bytes / 1e6:.1f} MB, built in "
        f"{bench.cache_s:.1f} s in one process ({1000 * bench.cache_s / f.count:.1f} ms per image)",
    ]
    per_image_s = bench.cache_s / f.count
    lines += [f"# COCO 2014's cache at {h['image_size']} px, {what} ({rows:,}): {size / 1e9:.1f} GB, about "
              f"{rows * per_image_s / 3600:.1f} core-hours to build at this rate (divide by the loader workers)"
              for what, (rows, size) in bench.coco_cache.items()]
    width = max(len(r.loader) for r in bench.rates)
    for r in bench.rates:
        rounds = " ".join(f"{x:.1f}" for x in r.rates)
        device = f"{statistics.median(r.device_rates):8.1f} img/s" if r.device_rates else "none (batches are ready)"
        cores = " / ".join(str(r.cores_for(t)) for t in FEED_TARGETS)
        cpu = f"{r.worker_cpu_ms:.1f}" if r.worker_cpu_ms is not None else "n/a"
        lines.append(f"{r.loader:<{width}}  workers={r.workers}  {r.images_per_s:8.1f} img/s  {r.per_worker:8.1f} "
                     f"img/s per worker  (rounds: {rounds})  CPU ms per image: workers {cpu}, main "
                     f"{r.main_cpu_ms:.1f}  reads {r.reads}  cores for {' / '.join(map(str, FEED_TARGETS))} img/s: "
                     f"{cores}  device side {device}")
    by_key = {(r.loader, r.workers): r for r in bench.rates}
    counts = sorted({r.workers for r in bench.rates})
    for official in LOADERS[1:]:
        ratios = [f"{by_key[('ours', w)].per_worker / by_key[(official, w)].per_worker:.2f}x ({w} "
                  f"worker{'s' if w > 1 else ''})" for w in counts]
        lines.append(f"# ours / {official}, images/s per worker: {', '.join(ratios)}")
        if all(by_key[(name, w)].worker_cpu_ms for name in ("ours", official) for w in counts):
            cpu_ratios = [f"{by_key[(official, w)].worker_cpu_ms / by_key[('ours', w)].worker_cpu_ms:.2f}x"
                          for w in counts]
            lines.append(f"# {official} / ours, workers' CPU time per image: {', '.join(cpu_ratios)} (same order)")
    return "\n".join(lines)
