"""``spml bench step`` (and ``spml bench prepare``): training-step time (and memory) of several methods on the same
model, batch and data.

The bench builds what it times as ``spml train`` does: each method's configuration comes from
:func:`pipeline.run_config.resolve_run_config` (its ``train`` blocks, protocol block and ``method_params``,
variants included), the process is set up by :func:`pipeline.train.setup_process` (threads, host memory,
device), and the model, method, optimizer, LR schedule, grad scaler and weight EMA come from
:func:`pipeline.train.build_training`. The timed step is :func:`pipeline.train.train_step`, the loop's own
(including the loop's scoring of what the method reports against the hidden labels).
An option named after a params key (``--model``, ``--image-size``, ``--batch-size``, ``--device``, ``--threads``,
``--amp``, ``--channels-last``, ``--host-allocator``, ``--host-malloc-cache``, ``--compile``) replaces that value
(:mod:`pipeline.tools.settings` says where each lives); without one, the params value holds. Two things differ
from training, on purpose: trunk weights are random unless ``--weights`` says otherwise (timing needs no
download), and ``runtime.deterministic`` is not applied (it is there for repeatable metrics, and the published
step times were measured without it).

Each method gets its own model, built from the same seed, and all see the same batches: random images (or, with
``spml bench prepare DATASET``, the prepared rows of :mod:`pipeline.tools.bench_prepare`), normalised on the
device by the loop's :class:`pipeline.data.Normalizer`, with a flipped and colour-jittered stand-in for the
strong view. After ``--warmup`` untimed steps per method, the timed steps alternate between the methods (step 1
of every method, then step 2, ...) so that drifting machine load affects all of them alike. Data loading and
augmentation are not timed (``spml bench loader`` times them: :mod:`pipeline.tools.bench_loader`). The step runs
at the last epoch of the configured run, past any warm-up, so methods that reject after a warm-up do so.

Host memory: like ``spml train``, the bench runs with a caching allocator (jemalloc, else tcmalloc) when
one is installed, preloaded by the ``spml`` command's re-exec (``runtime.host.preload_allocator``; params
``runtime.host_allocator``), else with glibc's malloc made to keep freed memory for reuse
(``runtime.host.cache_host_memory``; params ``runtime.host_malloc_cache``). ``--host-allocator`` picks the library
(auto, jemalloc, tcmalloc, glibc); with glibc, ``--no-host-malloc-cache`` leaves glibc's default, which
page-faults each step's activations in again (it costs IGNORE, with its larger working set, relatively more
than AN). The header line says which one ran (``host_malloc=``: jemalloc, tcmalloc, cache or system).

``--compile`` compiles each model (``runtime.compile``); its compilation happens in the untimed warm-up steps
(at least 2 then), whose total time the header reports as ``warmup_s``.

Output, one line per method: median ms/step, images/s, ratio of the median to AN's as ``N.NNx``, the median
(and mean) minor page faults of the process per step (Unix), and memory:
on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the method's steps (all models' weights
included) and the part above the allocation at step start; on CPU the bytes of the tensors autograd saves
for backward in one step (an estimate of activation memory, measured with saved-tensor hooks), since a
process RSS cannot be split between methods that share the process.

On a GPU machine that has only torch: ``pip install typer rich pyyaml``, then ``python -m pipeline.cli bench
step``; nothing on that path imports dvc, pycocotools, pyarrow, pandas or scikit-learn (docs/bench-gpu.md).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import load_params
from pipeline.contracts import Batch, HiddenLabels, MethodContext
from pipeline.data import Normalizer
from pipeline.errors import SpmlError
from pipeline.hidden_scoring import FalseNegativeMeter
from pipeline.methods import get_method_class
from pipeline.run_config import MIN_IMAGE_SIZE, RunConfig, resolve_run_config, search_config
from pipeline.runtime.distributed import DistContext
from pipeline.runtime.host import host_memory
from pipeline.tools.settings import option_name, params_key, replace_settings, setting
from pipeline.train import Training, build_normalizer, build_training, setup_process, train_step

if TYPE_CHECKING:
    from pipeline.tables import LabelTable

PREPARED_IMAGE_SIZE = 64  # bench prepare: the size of the random images that go with the prepared label rows
PREPARED_ROWS = 512  # bench prepare: how many prepared training rows the bench trains on
# settings all methods of one bench share (one process, one set of batches); the option named after each sets it
SHARED_SETTINGS = ("image_size", "batch_size", "channels_last", "device", "threads", "host_allocator",
                   "host_malloc_cache", "compile", "num_workers", "augment_on", "decode")
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
    """The first training rows of a prepared label table (``pipeline.tools.bench_prepare.run``'s): their true
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
    ``overrides`` replace settings (:func:`pipeline.tools.settings.replace_settings`), ``model_kwargs`` add to
    the model's params block, and the trunk weights are ``weights`` or, for a model that takes weights,
    ``none`` (timing needs no download)."""
    runs = []
    for method in methods:
        run = resolve_run_config(params, dataset, method, seed, model)
        if run.search:  # a protocol that is a search (Cole et al.) trains its points alike: time the first
            run = search_config(run, run.search[0])
        replace_settings(run, overrides or {})
        run.model_kwargs.update(model_kwargs or {})
        if weights is not None:
            run.model_kwargs["weights"] = weights
        elif "weights" in run.model_kwargs:
            run.model_kwargs["weights"] = "none"
        runs.append(run)
    for key in SHARED_SETTINGS:  # protocol: original may give each method its own
        values = {run.method: setting(run, key) for run in runs}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{method} {value}" for method, value in values.items())
            raise SpmlError(f"the methods train with different {params_key(key)} ({listed}) under protocol "
                            f"{runs[0].protocol}; pass {option_name(key)} to bench them alike")
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
        batch, hidden = self.batches[i % len(self.batches)]
        train_step(self.training, batch, self.epoch, meter=self.meter, hidden=hidden)


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
    """Time ``methods``' training steps. ``overrides``: settings replaced for every method, by params key
    (image_size, batch_size, device, threads, amp, channels_last, host_allocator, host_malloc_cache, compile).
    ``prepare``: a dataset whose ``prepare`` is benchmarked first (:mod:`pipeline.tools.bench_prepare`); the
    steps then train on its prepared rows, at :data:`PREPARED_IMAGE_SIZE`.

    Returns one result per method and the settings the bench ran with (the ``# ...`` line)."""
    if not methods:
        raise SpmlError("no method to bench; pass e.g. --method an --method ignore")
    if steps < 1 or warmup < 0 or overrides.get("batch_size", 1) < 1 or overrides.get("threads", 1) < 1:
        raise SpmlError("--steps must be >= 1, --warmup >= 0, --batch-size >= 1 and --threads >= 1")
    if overrides.get("image_size", MIN_IMAGE_SIZE) < MIN_IMAGE_SIZE:
        raise SpmlError(f"--image-size must be >= {MIN_IMAGE_SIZE} (every model downsamples by 8 or more)")
    if prepare:
        if "image_size" in overrides:  # the prepared rows come with images of one size: an option would be ignored
            raise SpmlError(f"bench prepare trains on {PREPARED_IMAGE_SIZE} px images; drop --image-size")
        dataset, overrides = prepare, {**overrides, "image_size": PREPARED_IMAGE_SIZE}
    runs = bench_configs(load_params(params_path), dataset, methods, seed, model, overrides, model_kwargs, weights)
    cfg = runs[0].train  # what every method shares (bench_configs checked)
    device = setup_process(cfg, runs[0].runtime, DistContext())
    # asked again only to report it: the call is idempotent and says what runs
    malloc_used = host_memory(setting(runs[0], "host_allocator"), setting(runs[0], "host_malloc_cache")).label
    compiled = setting(runs[0], "compile")
    if compiled:
        warmup = max(warmup, COMPILE_WARMUP)
    torch.manual_seed(seed)
    if prepare:
        from pipeline.tools import bench_prepare

        data = prepared_data(bench_prepare.run(prepare, params_path=params_path), seed)
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
        normalize = build_normalizer(run.train, device, setting(run, "channels_last"))
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
              "device": device_name(device), "amp": str(amp).replace("torch.", "") if amp else "off",
              "channels_last": setting(runs[0], "channels_last"), "host_malloc": malloc_used,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if compiled:
        header.update(compile="on", warmup_s=f"{warmup_s:.1f}")
    return [results[name] for name in methods], header


def header_line(header: dict[str, Any]) -> str:
    """The ``# key=value ...`` line every bench prints first: what it ran with."""
    return "# " + " ".join(f"{k}={v}" for k, v in header.items())


def format_results(results: list[BenchResult], header: dict[str, Any] | None = None) -> str:
    ref = next((r for r in results if r.method == "an"), None)
    lines = []
    if header:
        lines.append(header_line(header))
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"
