"""``spml bench``: training-step time (and memory) of several methods on the same model, batch and data.

The bench builds what it times as ``spml train`` does: each method's configuration comes from
:func:`pipeline.train.resolve_run_config` (its ``train`` blocks, protocol block and ``method_params``,
variants included), the process is set up by :func:`pipeline.train.setup_process` (threads, host memory,
device), and the model, method, optimizer, LR schedule, grad scaler and weight EMA come from
:func:`pipeline.train.build_training`. The timed step is :func:`pipeline.train.train_step`, the loop's own
(including the loop's scoring of what the method reports against the hidden labels).
Options (``--model``, ``--image-size``, ``--batch-size``, ``--device``, ``--threads``, ``--amp``,
``--channels-last``, ``--host-malloc``) replace the params value of the same name; without one, the params
value holds. Two things differ from training, on purpose: trunk weights are random unless ``--weights``
says otherwise (timing needs no download), and ``train.deterministic`` is not applied (it is there for
repeatable metrics, and the published step times were measured without it).

Each method gets its own model, built from the same seed, and all see the same batches: random images (or
``--prepare DATASET``'s rows), normalised on the device by the loop's :class:`pipeline.data.Normalizer`, with
a flipped and colour-jittered stand-in for the strong view. After ``--warmup`` untimed steps per method, the
timed steps alternate between the methods (step 1 of every method, then step 2, ...) so that drifting
machine load affects all of them alike. Data loading and augmentation are not timed. The step runs at the
last epoch of the configured run, past any warm-up, so methods that reject after a warm-up do so.

Host memory: like ``spml train``, the bench runs with a caching allocator (jemalloc, else tcmalloc) when
one is installed, preloaded by the ``spml`` command's re-exec (``runtime.host.preload_allocator``; params
``runtime.host_allocator``), else with glibc's malloc made to keep freed memory for reuse
(``runtime.host.cache_host_memory``; params ``runtime.host_malloc_cache``). ``--host-malloc`` picks one:
jemalloc, tcmalloc, cache (glibc keeping blocks up to 32 MiB), system (glibc's default, which page-faults each
step's activations in again; it costs IGNORE, with its larger working set, relatively more than AN). The
header line says which one ran (``host_malloc=``).

``--compile`` compiles each model (``runtime.compile``); its compilation happens in the untimed warm-up steps
(at least 2 then), whose total time the header reports as ``warmup_s``.

``--loader`` times the input pipeline instead of the step (:func:`run_loader_bench`): the training loader
over a cached-image memory map of random images, with the params' workers (``--workers``), then the loop's
:class:`pipeline.data.Normalizer` on the device, views made where ``train.augment_on`` says
(``--augment-on loader|device``); images/s delivered, to set against the step's. With ``--dataset coco2014`` it
times the real-format input pipeline instead: JPEG files, ours against an official-style loader
(:mod:`pipeline.tools.input_bench`).

Output, one line per method: median ms/step, images/s, ratio of the median to AN's as ``N.NNx``, the median
(and mean) minor page faults of the process per step (Unix), and memory:
on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the method's steps (all models' weights
included) and the part above the allocation at step start; on CPU the bytes of the tensors autograd saves
for backward in one step (an estimate of activation memory, measured with saved-tensor hooks), since a
process RSS cannot be split between methods that share the process.

On a GPU machine that has only torch: ``pip install typer rich pyyaml``, then ``python -m pipeline.cli bench``;
nothing on that path imports dvc, pycocotools, pyarrow, pandas or scikit-learn (docs/bench-gpu.md).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import load_params
from pipeline.data import Normalizer
from pipeline.errors import SpmlError
from pipeline.methods import Batch, MethodContext, get_method_class
from pipeline.methods.diagnostics import FalseNegativeMeter, HiddenLabels
from pipeline.runtime.distributed import DistContext
from pipeline.runtime.host import THREADS_ENV, host_memory, usable_cpus
from pipeline.run_config import MIN_IMAGE_SIZE, RunConfig, RuntimeConfig, resolve_run_config, search_config
from pipeline.train import Training, build_normalizer, build_training, setup_process, train_step

if TYPE_CHECKING:
    from pipeline.tables import LabelTable

PREPARED_IMAGE_SIZE = 64  # --prepare: the size of the random images that go with the prepared label rows
PREPARED_ROWS = 512  # --prepare: how many prepared training rows the bench trains on
# train settings all methods of one bench share (one process, one set of batches), and the option that sets each
SHARED_SETTINGS = {"image_size": "--image-size", "batch_size": "--batch-size", "channels_last": "--channels-last",
                   "device": "--device", "threads": "--threads", "host_allocator": "--host-malloc",
                   "host_malloc_cache": "--host-malloc", "compile": "--compile", "num_workers": "--workers",
                   "augment_on": "--augment-on", "decode": "--decode"}
COMPILE_WARMUP = 2  # --compile: at least this many untimed steps (the first compiles, the second may recompile)


@dataclass
class BenchData:
    """uint8 images (N, 3, S, S), observed labels (N, C) in {0, 1} (or -1), full labels (N, C)."""

    images: torch.Tensor
    observed: torch.Tensor
    full: torch.Tensor


class Timed:
    """Median time and images/s of a result's ``times_ms`` (ms per batch of ``batch_size`` images); the
    dataclasses below declare both fields, each in its own place among their fields."""

    times_ms: list[float]
    batch_size: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms


@dataclass
class BenchResult(Timed):
    method: str
    times_ms: list[float]
    batch_size: int
    memory_mib: float | None = None
    memory_step_mib: float | None = None
    memory_kind: str = ""
    host_malloc: str = ""  # jemalloc, tcmalloc, or glibc's: cache (runtime.host.cache_host_memory) or system
    page_faults: list[int] = field(default_factory=list)  # minor page faults of the process per timed step
    extra: dict[str, Any] = field(default_factory=dict)


def random_data(num_images: int, num_classes: int, image_size: int, seed: int = 0) -> BenchData:
    """Random images with 1 to 4 true labels per image and one observed positive among them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    full = torch.zeros(num_images, num_classes)
    observed = torch.zeros(num_images, num_classes)
    for i in range(num_images):
        k = int(torch.randint(1, min(4, num_classes) + 1, (), generator=g))
        classes = torch.randperm(num_classes, generator=g)[:k]
        full[i, classes] = 1
        observed[i, classes[0]] = 1
    return BenchData(images, observed, full)


def prepared_data(table: LabelTable, seed: int) -> BenchData:
    """The first training rows of a prepared label table (``pipeline.bench_prepare.run``'s): their true
    labels, community-sampled observed labels, and random images."""
    import numpy as np

    from pipeline.sampling import sample_observed_labels

    rows = table.official_rows("train")[:PREPARED_ROWS]
    full = table.labels[rows].astype(np.float32)
    observed = sample_observed_labels(table.labels[rows]).astype(np.float32)
    g = torch.Generator().manual_seed(seed)
    size = PREPARED_IMAGE_SIZE
    images = torch.randint(0, 256, (len(rows), 3, size, size), dtype=torch.uint8, generator=g)
    return BenchData(images=images, observed=torch.from_numpy(observed), full=torch.from_numpy(full))


def _batches(data: BenchData, batch_size: int, normalize: Normalizer, strong: bool, seed: int,
             label_source: str) -> list[tuple[Batch, HiddenLabels]]:
    """Fixed device batches, normalised as the loop normalises a loader's: the weak view and, if asked, a
    flipped + colour-jittered stand-in for the strong view; each with its hidden labels, which only the
    bench's copy of the loop's diagnostics sees (a method gets its ``label_source``'s labels only)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data.images)
    out = []
    for start in range(0, n - batch_size + 1, batch_size):
        idx = torch.arange(start, start + batch_size)
        item = {"index": idx, "image": data.images[idx], "observed": data.observed[idx], "full": data.full[idx]}
        if strong:
            jitter = 1.0 + 0.3 * (torch.rand(batch_size, 1, 1, 1, generator=g) - 0.5)
            item["strong"] = (data.images[idx].flip(-1) * jitter).clamp(0, 255).to(torch.uint8)
        out.append((normalize.batch(item, label_source), normalize.hidden(item)))
    if not out:
        raise SpmlError(f"bench data has {n} images, fewer than one batch of {batch_size}; lower --batch-size")
    return out


def bench_configs(params: dict[str, Any], dataset: str, methods: list[str], seed: int, model: str | None = None,
                  overrides: dict[str, Any] | None = None, model_kwargs: dict[str, Any] | None = None,
                  weights: str | None = None) -> list[RunConfig]:
    """Each method's run configuration as ``spml train`` resolves it, with the bench's options applied:
    ``overrides`` replace ``train`` values, ``model_kwargs`` add to the model's params block, and the trunk
    weights are ``weights`` or, for a model that takes weights, ``none`` (timing needs no download)."""
    runs = []
    for method in methods:
        run = resolve_run_config(params, dataset, method, seed, model)
        if run.search:  # a protocol that is a search (Cole et al.) trains its points alike: time the first
            run = search_config(run, run.search[0])
        # each option replaces the value of the block it belongs to: runtime (threads, device...) or train
        runtime_keys = {f.name for f in dataclasses.fields(RuntimeConfig)}
        given = overrides or {}
        run.train = dataclasses.replace(run.train, **{k: v for k, v in given.items() if k not in runtime_keys})
        run.runtime = dataclasses.replace(run.runtime, **{k: v for k, v in given.items() if k in runtime_keys})
        run.model_kwargs.update(model_kwargs or {})
        if weights is not None:
            run.model_kwargs["weights"] = weights
        elif "weights" in run.model_kwargs:
            run.model_kwargs["weights"] = "none"
        runs.append(run)
    for key, option in SHARED_SETTINGS.items():  # protocol: original may give each method its own
        block = "runtime" if hasattr(runs[0].runtime, key) else "train"
        values = {run.method: getattr(getattr(run, block), key) for run in runs}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{method} {value}" for method, value in values.items())
            raise SpmlError(f"the methods train with different {block}.{key} ({listed}) under protocol "
                            f"{runs[0].protocol}; pass {option} to bench them alike")
    return runs


@dataclass
class _Runner:
    """One method's model and training parts, and the batches it steps on."""

    method: str
    training: Training
    epoch: int  # the configured run's last epoch: past any warm-up
    batches: list[tuple[Batch, HiddenLabels]]
    meter: FalseNegativeMeter  # the loop's diagnostics run in the step too (their cost is part of it)

    def step(self, i: int) -> None:
        t = self.training
        batch, hidden = self.batches[i % len(self.batches)]
        train_step(t.model, t.method, batch, self.epoch, t.optimizer, t.scheduler, t.scaler, t.amp, t.ema,
                   self.meter, hidden)


def _saved_tensor_bytes(step: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_bench(methods: list[str], params_path: Path = Path("params.yaml"), dataset: str = "synthetic",
              model: str | None = None, steps: int = 20, warmup: int = 3, num_classes: int = 20, seed: int = 0,
              prepare: str | None = None, num_batches: int = 4, weights: str | None = None,
              model_kwargs: dict[str, Any] | None = None,
              **overrides: Any) -> tuple[list[BenchResult], dict[str, Any]]:
    """Time ``methods``' training steps. ``overrides``: ``train`` values replaced for every method
    (image_size, batch_size, device, threads, amp, channels_last, host_allocator, host_malloc_cache, compile).

    Returns one result per method and the settings the bench ran with (the ``# ...`` line)."""
    if not methods:
        raise SpmlError("--methods is empty; pass e.g. --methods an,ignore")
    if steps < 1 or warmup < 0 or overrides.get("batch_size", 1) < 1 or overrides.get("threads", 1) < 1:
        raise SpmlError("--steps must be >= 1, --warmup >= 0, --batch-size >= 1 and --threads >= 1")
    if overrides.get("image_size", MIN_IMAGE_SIZE) < MIN_IMAGE_SIZE:
        raise SpmlError(f"--image-size must be >= {MIN_IMAGE_SIZE} (every model downsamples by 8 or more)")
    if prepare:
        dataset, overrides = prepare, {**overrides, "image_size": PREPARED_IMAGE_SIZE}
    runs = bench_configs(load_params(params_path), dataset, methods, seed, model, overrides, model_kwargs, weights)
    cfg, rt = runs[0].train, runs[0].runtime  # what every method shares (bench_configs checked)
    device = setup_process(cfg, rt, DistContext())
    # asked again only to report it: the call is idempotent and says what runs
    malloc_used = host_memory(rt.host_allocator, rt.host_malloc_cache).label
    if rt.compile:
        warmup = max(warmup, COMPILE_WARMUP)
    torch.manual_seed(seed)
    if prepare:
        from pipeline import bench_prepare

        data = prepared_data(bench_prepare.run(prepare), seed)
    else:
        data = random_data(cfg.batch_size * num_batches, num_classes, cfg.image_size, seed)

    strong = any(get_method_class(run.method).needs_strong_view for run in runs)
    batches: dict[tuple[bool, str], list[tuple[Batch, HiddenLabels]]] = {}  # lac views: [0, 1] images
    runners = []
    for run in runs:
        label_source = get_method_class(run.method).label_source
        ctx = MethodContext(dataset=run.dataset, model=run.train.model, num_classes=data.full.shape[1],
                            num_train=len(data.images), epochs=run.train.epochs,
                            # every step of the bench in one epoch: a OneCycle schedule never runs out
                            steps_per_epoch=warmup + steps + 1, mean_positives=float(data.full.sum(1).mean()),
                            observed_train=(data.full if label_source == "full" else data.observed).to(device).float(),
                            device=device)
        torch.manual_seed(seed)  # each method's model starts from the same draws (methods that draw none)
        training = build_training(run, ctx)
        normalize = build_normalizer(run.train, device, run.runtime.channels_last)
        key = (normalize.imagenet, label_source)
        if key not in batches:
            batches[key] = _batches(data, cfg.batch_size, normalize, strong, seed, label_source)
        runners.append(_Runner(run.method, training, run.train.epochs, batches[key], FalseNegativeMeter(device)))

    try:
        import resource

        def faults() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on Unix
        faults = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmup_started = time.perf_counter()
    for r in runners:
        r.training.model.train()
        r.training.method.on_epoch_start(r.epoch)
        for i in range(warmup):
            r.step(i)
    sync()
    warmup_s = time.perf_counter() - warmup_started

    results = {r.method: BenchResult(r.method, [], cfg.batch_size, host_malloc=malloc_used) for r in runners}
    for i in range(steps):
        for r in runners:
            if device.type == "cuda":
                start_alloc = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            f0 = faults() if faults else 0
            t0 = time.perf_counter()
            r.step(i)
            sync()
            result = results[r.method]
            result.times_ms.append(1000.0 * (time.perf_counter() - t0))
            if faults:
                result.page_faults.append(faults() - f0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                result.memory_mib = max(result.memory_mib or 0.0, peak / 2**20)
                result.memory_step_mib = max(result.memory_step_mib or 0.0, (peak - start_alloc) / 2**20)
                result.memory_kind = "cuda"

    if device.type != "cuda":  # one extra, untimed step per method to measure what autograd keeps
        for r in runners:
            results[r.method].memory_step_mib = _saved_tensor_bytes(functools.partial(r.step, 0)) / 2**20
            results[r.method].memory_kind = "cpu-saved"
    for r in runners:  # drop what the meters accumulated
        r.meter.reset()
    amp = runners[0].training.amp
    header = {"model": cfg.model, "image_size": cfg.image_size, "batch": cfg.batch_size, "steps": steps,
              "device": _device_name(device), "amp": str(amp).replace("torch.", "") if amp else "off",
              "channels_last": rt.channels_last, "host_malloc": malloc_used, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if rt.compile:
        header.update(compile="on", warmup_s=f"{warmup_s:.1f}")
    return [results[name] for name in methods], header


def format_results(results: list[BenchResult], header: dict[str, Any] | None = None) -> str:
    ref = next((r for r in results if r.method == "an"), None)
    lines = []
    if header:
        lines.append("# " + " ".join(f"{k}={v}" for k, v in header.items()))
    width = max(len(r.method) for r in results)
    for r in results:
        ratio = f"{r.median_ms / ref.median_ms:.2f}x" if ref is not None else "n/a (no an)"
        if r.memory_kind == "cuda":
            mem = f"peak {r.memory_mib:.0f} MiB (cuda max_memory_allocated), step +{r.memory_step_mib:.0f} MiB"
        elif r.memory_kind == "cpu-saved":
            mem = f"saved-for-backward {r.memory_step_mib:.1f} MiB (CPU estimate via autograd saved-tensor hooks)"
        else:
            mem = "memory n/a"
        # the median says what a steady step does; the mean shows occasional bursts (glibc's cache refilling)
        faults = (f"  {statistics.median(r.page_faults):7.0f} page faults/step (mean {statistics.mean(r.page_faults):7.0f})"
                  if r.page_faults else "")
        lines.append(f"{r.method:<{width}}  {r.median_ms:8.2f} ms/step  {r.images_per_s:8.1f} img/s  "
                     f"{ratio:>6} vs an{faults}  {mem}")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


# ------------------------------------------------------------------------- the input pipeline (--loader)

LOADER_ROWS_PER_BATCH = 8  # --loader: distinct cached images, in batches; the sampler cycles over them by epoch


@dataclass
class LoaderResult(Timed):
    augment_on: str
    times_ms: list[float]  # per batch: from the previous batch's views on the device to this one's
    batch_size: int


def run_loader_bench(methods: list[str], params_path: Path = Path("params.yaml"), dataset: str = "synthetic",
                     steps: int = 20, warmup: int = 3, num_classes: int = 20, seed: int = 0,
                     **overrides: Any) -> tuple[LoaderResult, dict[str, Any]]:
    """Time the training input pipeline as ``spml train`` builds it: :class:`pipeline.data.TrainSet` over a
    cached-image memory map (:class:`pipeline.data.ImageArray`) of random uint8 images, the seeded loader
    (:func:`pipeline.train.build_loaders`' settings: workers, pinned memory on CUDA, persistent workers),
    and the loop's :class:`pipeline.data.Normalizer` on the device, which makes the views there with
    ``augment_on: device``. A strong view is made if one of ``methods`` needs it. ``overrides``: ``train``
    values (image_size, batch_size, device, threads, num_workers, augment_on). Returns the median time per
    delivered batch after ``warmup`` batches (at least one per worker: their start), and the header."""
    import numpy as np
    from torch.utils.data import DataLoader

    from pipeline.data import ImageArray, TrainSet
    from pipeline.runtime.distributed import EpochSampler
    from pipeline.train import loader_settings

    if not methods:
        raise SpmlError("--methods is empty; pass e.g. --methods an,ignore")
    if steps < 1 or warmup < 0 or overrides.get("batch_size", 1) < 1 or overrides.get("num_workers", 0) < 0:
        raise SpmlError("--steps must be >= 1, --warmup >= 0, --batch-size >= 1 and --workers >= 0")
    runs = bench_configs(load_params(params_path), dataset, methods, seed, None, overrides)
    cfg, rt = runs[0].train, runs[0].runtime
    if cfg.decode == "device":
        raise SpmlError("params train.decode is device, but this bench times random arrays, no files; time the "
                        "device decode on JPEGs with --loader --dataset coco2014 --decode device")
    warmup = max(warmup, rt.num_workers)  # every worker's first batch (its start) is left out
    device = setup_process(cfg, rt, DistContext())
    strong = any(get_method_class(run.method).needs_strong_view for run in runs)
    data = random_data(cfg.batch_size * LOADER_ROWS_PER_BATCH, num_classes, cfg.image_size, seed)
    normalize = build_normalizer(cfg, device, rt.channels_last)
    times = []
    with tempfile.TemporaryDirectory(prefix="spml-bench-loader-") as tmp:
        path = Path(tmp) / "images.npy"
        np.save(path, data.images.numpy())
        train = TrainSet(ImageArray(path), data.observed, data.full, strong, cfg.strong_num_ops, cfg.strong_magnitude,
                         augment=cfg.augment, augment_on=cfg.augment_on)
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
        del loader  # its workers exit before the temporary file goes
    header = {"loader": "train", "image_size": cfg.image_size, "batch": cfg.batch_size, "workers": rt.num_workers,
              "device": _device_name(device), "augment_on": cfg.augment_on,
              "views": "weak+strong" if strong else "weak", "batches": steps, "threads": torch.get_num_threads()}
    return LoaderResult(cfg.augment_on, times, cfg.batch_size), header


def format_loader(result: LoaderResult, header: dict[str, Any]) -> str:
    line = (f"loader  augment_on={result.augment_on:<6}  {result.median_ms:8.2f} ms/batch  "
            f"{result.images_per_s:8.1f} img/s delivered")
    return "\n".join(["# " + " ".join(f"{k}={v}" for k, v in header.items()), line])


# ------------------------------------------------------------------------- trainings side by side (--parallel)

# The workload of ``spml bench --parallel``: whole tiny trainings, so process start-up, data loading and
# evaluation count as they do in a grid of cells. A bench setting, deep-merged over the given params.yaml.
PARALLEL_WORKLOAD: dict[str, Any] = {
    "data": {"synthetic": {"num_train": 160, "num_test": 40, "image_size": 32, "seed": 0}},
    "train": {"default": {"model": "smallcnn", "epochs": 2, "batch_size": 16, "image_size": 32}},
    "runtime": {"num_workers": 0, "threads": None},
    "models": {"smallcnn": {"width": 8}},
}


@dataclass
class ParallelResult:
    mode: str  # "one after another" or "side by side"
    wall_s: float
    threads: list[int]  # torch threads each training used (its metrics.json)


def run_parallel_bench(count: int, params_path: Path = Path("params.yaml"), threads: int | None = None,
                       method: str = "an") -> list[ParallelResult]:
    """Wall time of ``count`` tiny trainings one after another (automatic threads), then side by side with
    automatic threads, then side by side with ``threads`` each (default: usable CPUs // count) via $SPML_THREADS.

    Runs ``spml`` as subprocesses in a temporary workspace (tiny synthetic data from :data:`PARALLEL_WORKLOAD`).
    """
    import contextlib
    import json
    import os
    import subprocess
    import tempfile

    from pipeline.config import deep_merge

    if count < 1:
        raise SpmlError(f"--parallel {count}: run at least 1 training")
    if threads is not None and threads < 1:
        raise SpmlError(f"--threads {threads}: use at least 1 thread")
    import yaml

    params = deep_merge(load_params(params_path), PARALLEL_WORKLOAD)
    share = threads if threads is not None else max(1, usable_cpus() // count)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "SPML_NO_PROGRESS": "1"}
    env.pop(THREADS_ENV, None)

    def spml(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env={**env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            _, stderr = proc.communicate()
            if proc.returncode:
                raise SpmlError(f"spml {' '.join(proc.args[3:])} failed: {stderr.strip().splitlines()[-1:]}")

    results = []
    with tempfile.TemporaryDirectory(prefix="spml-bench-parallel-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        from stages import download, prepare, sample

        with contextlib.chdir(work):  # the data stages in this process: three fewer interpreter start-ups
            for stage in (download, prepare, sample):
                stage.run("synthetic")
        wait([spml("train", "synthetic", method, "--out", "runs/warm", "--no-resume", cwd=work)])  # builds the cache
        modes = [("one after another", False, None), ("side by side", True, None),
                 ("side by side", True, {THREADS_ENV: str(share)})]
        for index, (mode, together, extra_env) in enumerate(modes):
            outs = [f"runs/{index}-{k}" for k in range(count)]
            started = time.perf_counter()
            if together:
                wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                           extra_env=extra_env) for k, out in enumerate(outs)])
            else:
                for k, out in enumerate(outs):
                    wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                               extra_env=extra_env)])
            wall = time.perf_counter() - started
            used = [json.loads((work / out / "metrics.json").read_text())["threads"] for out in outs]
            label = f"{mode}, {THREADS_ENV}={extra_env[THREADS_ENV]}" if extra_env else f"{mode}, auto"
            results.append(ParallelResult(label, wall, used))
    return results


def format_parallel(results: list[ParallelResult], count: int) -> str:
    epochs = PARALLEL_WORKLOAD["train"]["default"]["epochs"]
    lines = [f"# {count} tiny trainings (spml train, {epochs} epochs); usable CPUs {usable_cpus()}"]
    for r in results:
        lines.append(f"{r.mode:<36} wall {r.wall_s:7.2f} s   threads per training {r.threads}")
    return "\n".join(lines)

