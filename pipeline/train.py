"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``, with no method known by name.

Model selection follows the SPML protocol: after every epoch the clean-label val mAP is computed; the
reported number is the test mAP of the checkpoint from the best-val epoch (strictly better wins).

``fit`` is the recipe, one line per step; the steps are the functions above it, in the order it calls them.
``spml bench`` (:mod:`pipeline.bench`) resolves its config, builds its model, method and optimizer and runs
its timed step through the same functions (:func:`resolve_run_config`, :func:`build_training`,
:func:`train_step`).
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import __version__, paths
from pipeline.config import Range, config_sha256, deep_merge, derive_seed, parse_dataclass, scoped
from pipeline.data import (
    EvalSet,
    ImageArray,
    MethodBatches,
    Normalizer,
    TrainSet,
    cached_images,
    load_instance_maps,
    pad_instance_classes,
)
from pipeline.errors import SpmlError
from pipeline.methods import Batch, Method, MethodContext, StepOutput, build_method, get_method_class
from pipeline.methods.diagnostics import FalseNegativeMeter, HiddenLabels, score_step
from pipeline.models import build_model, model_names, parse_model_params, weight_files
from pipeline.progress import progress_bar
from pipeline.runtime.checkpoint import Best, Checkpoint, clear_resume, run_fingerprint, save_file
from pipeline.runtime.distributed import DistContext, EpochSampler, broadcast_buffers, gather_arrays
from pipeline.runtime.host import announcing, host_memory, running_allocator, torch_threads
from pipeline.runtime.optim import WeightEMA, amp_dtype, autocast, build_scheduler
from pipeline.timeline import Reference, steps_per_epoch, timeline_for

# pipeline.tables (pyarrow) and pipeline.metrics (scikit-learn) are imported where they are used: `spml bench`
# builds through this module on GPU machines that have torch but neither of those (docs/bench-gpu.md)
if TYPE_CHECKING:
    from pipeline.metrics import MapResult
    from pipeline.tables import LabelTable

# The smallest input: every trunk downsamples by 8 or more, and a CAM needs at least 2x2 maps (smallcnn).
MIN_IMAGE_SIZE = 16
RUN_FILES = ("metrics.json", "config.json", "history.csv", "best.pt")  # what fit writes into a run folder


@dataclass
class TrainConfig:
    """``params.yaml: train`` (scoped by dataset and model, see :mod:`pipeline.config`).

    No defaults here: params.yaml holds every value, and a missing key is an error naming it.
    """

    model: str
    epochs: Annotated[int, Range(ge=1)]
    batch_size: Annotated[int, Range(ge=1)]
    eval_batch_size: Annotated[int, Range(ge=1)]
    lr: Annotated[float, Range(gt=0)]
    head_lr_mult: Annotated[float, Range(ge=0)]  # the 1x1-conv / linear head's lr is lr * head_lr_mult
    weight_decay: Annotated[float, Range(ge=0)]
    optimizer: Literal["adam", "adamw"]
    image_size: Annotated[int, Range(ge=MIN_IMAGE_SIZE)]
    num_workers: Annotated[int, Range(ge=0)]
    device: str  # auto: cuda if available, else cpu
    strong_num_ops: Annotated[int, Range(ge=0)]  # RandAugment of the strong view
    strong_magnitude: Annotated[int, Range(ge=0, le=30)]  # RandAugment's 31 magnitude bins: 0..30
    # where the flips and the strong view's RandAugment run: loader (per sample, in the loader's processes) |
    # device (batched on the training device, pipeline.augment.DeviceAugment); augment: lac's views stay in the loader
    augment_on: Literal["loader", "device"]
    deterministic: bool  # torch deterministic algorithms (CPU metrics are then reproducible)
    # which malloc serves host memory: auto (jemalloc, else tcmalloc, else glibc) | jemalloc | tcmalloc | glibc;
    # the CLI preloads the library by a re-exec (runtime.host.preload_allocator); $SPML_ALLOCATOR wins
    host_allocator: Literal["auto", "jemalloc", "tcmalloc", "glibc"]
    host_malloc_cache: bool  # where glibc's malloc runs: keep freed memory for reuse (runtime.host.cache_host_memory)
    threads: Annotated[int, Range(ge=1)] | None  # torch intra-op threads; None: runtime.host.torch_threads decides
    # a step loss above this (or any non-finite one) stops the run as diverged; None: only non-finite losses
    max_loss: Annotated[float, Range(gt=0)] | None
    # GPU path (see pipeline/runtime/); all of it is ignored or a no-op on CPU
    amp: bool  # mixed precision, opt-in (see runtime.optim.amp_dtype)
    amp_dtype: Literal["auto", "bf16", "fp16"]  # auto: bf16 where supported, else fp16 + GradScaler
    channels_last: bool
    cudnn_benchmark: bool
    compile: bool  # torch.compile the model (its first steps compile it: slower start, faster steps on a GPU)
    sync_bn: bool  # DDP: BatchNorm statistics over all ranks' samples (the global batch)
    scheduler: Literal["none", "onecycle"]  # onecycle: OneCycleLR (max_lr = lr), stepped every iteration
    onecycle_pct_start: Annotated[float, Range(gt=0, lt=1)]
    # protocol knobs (params `protocols`: each method's authors' published training protocol)
    drop_last: bool  # drop the last partial training batch
    eval_drop_last: bool  # also drop the last partial val/test batch (Cole et al.'s loaders)
    # none | no_improvement: stop after the first epoch whose val mAP is not a new best (Zhou et al.) |
    # drop: stop once val mAP falls more than early_stop_value points below the best (Kim et al.) |
    # patience: stop once early_stop_value epochs passed without a new best (Xie et al.)
    early_stop: Literal["none", "no_improvement", "drop", "patience"]
    early_stop_value: Annotated[float, Range(ge=0)]
    weight_ema: Annotated[float, Range(gt=0, lt=1)] | None  # decay of an every-step EMA of the weights
    augment: Literal["standard", "lac"]  # lac: Xie et al.'s views, no ImageNet normalisation
    # two stages in one cell: the method first trains in its stage-1 form (Method.stage1_params, e.g.
    # PLC+LAC without LAC), then again from stage 1's best model with fresh optimiser, schedule and EMA
    two_stage: bool


@dataclass
class TimelineParams:
    """``params.yaml: timeline.<dataset>``: the real dataset an embedded one stands for (pipeline/timeline.py)."""

    reference: str  # a dataset name: whose protocols.original blocks the schedules were set for
    train_images: Annotated[int, Range(ge=1)]  # its training images (the community's 80 % of official train)


@dataclass
class RunConfig:
    dataset: str
    method: str
    seed: int
    run_seed: int
    protocol: str
    train: TrainConfig
    model_kwargs: dict[str, Any]
    method_params: dict[str, Any]
    # the protocol the method's schedules were set for; `timeline` (None until apply_timeline ran) records the
    # run's and the reference's length, and train / method_params then hold the mapped values
    reference: Reference
    timeline: dict[str, Any] | None = None
    # a protocol that is a search (Cole et al.): the train values of each point, in the authors' order; the cell
    # trains every point and keeps the one with the best val mAP (stages/train.py). None: one run
    search: list[dict[str, Any]] | None = None
    # SHA-256 of the cell's config as params.yaml resolves it (before the timeline maps its schedules and before a
    # search picks a point): what metrics.json records and `aggregate` recomputes. Not part of to_dict()
    cell_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["cell_sha256"]
        if out["search"] is None:  # a single run's config (and resume fingerprint) is what it was before searches
            del out["search"]
        return out

    def cell_config_sha256(self) -> str:
        return self.cell_sha256 or config_sha256(self.to_dict())


def search_points(search: Any, where: str) -> list[dict[str, Any]] | None:
    """The points of a protocol's ``search``: a list of axes, each a mapping of train keys to equally long lists
    of values (keys of one axis move together, e.g. batch_size and eval_batch_size); the points are the product
    of the axes, the first axis outermost (Cole et al.'s loops: batch outer, lr inner). None: no search."""
    if search is None:
        return None
    if not isinstance(search, list) or not search:
        raise SpmlError(f"params {where}.search must be a list of axes (mappings of train keys to lists of values) "
                        f"or null, got {search!r}")
    points: list[dict[str, Any]] = [{}]
    for axis in search:
        lengths = {len(v) for v in axis.values() if isinstance(v, list)} if isinstance(axis, dict) else set()
        if not isinstance(axis, dict) or not axis or len(lengths) != 1 or 0 in lengths \
                or not all(isinstance(v, list) for v in axis.values()):
            raise SpmlError(f"params {where}.search axis {axis!r} must map train keys to non-empty lists of the same "
                            "length (keys of one axis move together)")
        steps = [{key: values[i] for key, values in axis.items()} for i in range(lengths.pop())]
        points = [{**point, **step} for point in points for step in steps]
    return points


PROTOCOLS = ("unified", "original")


def protocol_block(params: dict[str, Any], method: str) -> tuple[str, dict[str, Any]]:
    """The active protocol's name and its block for ``method``."""
    protocol = params.get("protocol")
    if protocol is None:
        raise SpmlError("params protocol is missing; add `protocol: unified` (or original) to params.yaml")
    if protocol not in PROTOCOLS:
        raise SpmlError(f"params protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    blocks = (params.get("protocols") or {}).get(protocol) or {}
    block = blocks.get(method)
    if protocol == "original" and block is None:
        raise SpmlError(f"params protocols.original has no block for method {method!r}; add one (docs/protocols.md)")
    return protocol, block or {}


def resolve_run_config(params: dict[str, Any], dataset: str, method: str, seed: int,
                       model: str | None = None) -> RunConfig:
    """The run's full configuration: ``train`` blocks, then the active protocol's block for the method
    (``protocol: original``: its authors' published protocol), then the method's params.

    ``model`` replaces params ``train.model`` before anything is scoped by it (``spml bench --model``)."""
    get_method_class(method)  # unknown method names fail first, listing the valid ones
    train_section = params.get("train") or {}
    chosen = model or scoped(train_section, dataset).get("model")
    if chosen is None:
        raise SpmlError("params train.model is missing; add it to params.yaml")
    if not isinstance(chosen, str):
        raise SpmlError(f"params train.model must be one of {', '.join(model_names())}, got {chosen!r}")
    protocol, proto = protocol_block(params, method)
    values = deep_merge(scoped(train_section, dataset, chosen), scoped(proto, dataset, chosen))
    if model:
        values["model"] = model
    where = f"protocols.{protocol}.{method}"
    search = search_points(values.pop("search", None), where)
    train = parse_dataclass(TrainConfig, values, "train")
    for i, point in enumerate(search or []):  # every point is a valid train config, checked before any training
        if "model" in point:
            raise SpmlError(f"params {where}.search may not vary the model; run each model as its own cell")
        checked = parse_dataclass(TrainConfig, {**values, **point}, f"{where}.search point {point}")
        search[i] = {key: getattr(checked, key) for key in point}
    if search and train.two_stage:
        raise SpmlError(f"params {where}: a search with two_stage true is not supported; set one of them off")
    model_kwargs = parse_model_params(train.model, (params.get("models") or {}).get(train.model))
    # each method reads its own block only (a train cell tracks only that block in dvc.yaml)
    method_params = scoped((params.get("method_params") or {}).get(method), dataset, train.model)
    run = RunConfig(dataset, method, seed, derive_seed(dataset, method, seed), protocol, train, model_kwargs,
                    method_params, schedule_reference(params, dataset, method, train.model), search=search)
    if train.two_stage:
        stage1_config(run)  # a method without a stage 1 fails here, before any training
    return run


def schedule_reference(params: dict[str, Any], dataset: str, method: str, model: str) -> Reference:
    """The protocol ``method``'s schedules were published for: its ``protocols.original`` block on the run's
    dataset, or on the real dataset an embedded one stands for (``timeline.<dataset>``)."""
    block = ((params.get("protocols") or {}).get("original") or {}).get(method)
    if block is None:
        return Reference(f"none: protocols.original has no block for {method}", None, None, False, None)
    embedded = (params.get("timeline") or {}).get(dataset)
    images = None
    reference = dataset
    if embedded is not None:
        stand_in = parse_dataclass(TimelineParams, embedded, f"timeline.{dataset}")
        reference, images = stand_in.reference, stand_in.train_images
    values = deep_merge(scoped(params.get("train") or {}, reference, model), scoped(block, reference, model))
    where = f"protocols.original.{method}"
    epochs, batch_size, drop_last = values.get("epochs"), values.get("batch_size"), values.get("drop_last")
    for key, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpmlError(f"params {where}.{key} must be an integer >= 1 (the reference of the method's schedules), "
                            f"got {value!r}")
    if not isinstance(drop_last, bool):
        raise SpmlError(f"params {where}.drop_last must be true or false, got {drop_last!r}")
    source = f"{where} on {reference}" + (f" ({images} training images)" if images is not None else "")
    return Reference(source, epochs, batch_size, drop_last, images)


def train_schedules(cfg: TrainConfig) -> dict[str, str]:
    """The loop's own schedules (units of pipeline/timeline.py): the weight EMA's per-step decay, and the
    patience of ``early_stop: patience`` (in epochs; the other rules' values are mAP points)."""
    return {"weight_ema": "step_decay", **({"early_stop_value": "epochs"} if cfg.early_stop == "patience" else {})}


def apply_timeline(run: RunConfig, train_images: int) -> RunConfig:
    """``run`` with every schedule (the method's ``Method.schedules`` and :func:`train_schedules`) mapped from
    its reference protocol to this run's epochs and steps by the one rule of :mod:`pipeline.timeline`.
    ``train_images``: rows of the run's training set. Applied once: a run that has its timeline is returned as is."""
    if run.timeline is not None:
        return run
    cell = run.cell_config_sha256()
    cfg = run.train
    timeline = timeline_for(run.reference, cfg.epochs, steps_per_epoch(train_images, cfg.batch_size, cfg.drop_last),
                            train_images)
    schedules = train_schedules(cfg)
    mapped = timeline.apply({key: getattr(cfg, key) for key in schedules}, schedules, "train")
    params = timeline.apply(run.method_params, get_method_class(run.method).schedules, f"method_params.{run.method}")
    return dataclasses.replace(run, train=dataclasses.replace(cfg, **mapped), method_params=params,
                               timeline=timeline.describe(), cell_sha256=cell)


def training_rows(dataset: str) -> int:
    """Rows of the prepared table's training split (the timeline's steps per epoch, before the data loads)."""
    from pipeline.tables import read_label_table

    return len(read_label_table(paths.label_table(dataset)).rows("train"))


def search_config(run: RunConfig, point: dict[str, Any]) -> RunConfig:
    """One point of a search: the run with the point's train values, as a single run."""
    return dataclasses.replace(run, train=dataclasses.replace(run.train, **point), search=None, timeline=None,
                               model_kwargs=dict(run.model_kwargs), cell_sha256=run.cell_config_sha256())


def stage1_config(run: RunConfig) -> RunConfig:
    """Stage 1 of a two-stage run: the same method in its stage-1 form (``Method.stage1_params``), same
    train config and seed, one stage only."""
    params = get_method_class(run.method).stage1_params(run.method_params, run.train.epochs)
    if params is None:
        raise SpmlError(f"train.two_stage is true for method {run.method!r}, which has no stage 1; set it to "
                        f"false in the block that sets it (protocols.{run.protocol}.{run.method} or train)")
    return dataclasses.replace(run, train=dataclasses.replace(run.train, two_stage=False), method_params=params,
                               model_kwargs=dict(run.model_kwargs))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpmlError(f"params train.device {name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpmlError(f"params train.device {name!r}: CUDA is not available on this machine; use auto or cpu")
    return device


def setup_process(cfg: TrainConfig, dist: DistContext) -> torch.device:
    """Threads, host memory and the device, before any work (``spml bench`` starts the same way)."""
    torch.set_num_threads(torch_threads(cfg.threads))  # before any work (see runtime.host.torch_threads)
    memory = host_memory(cfg.host_allocator, cfg.host_malloc_cache)  # the glibc fallback is applied here
    if announcing() and dist.is_main:  # one line, from the spml command (in-process callers stay quiet)
        print(memory.notice, file=sys.stderr, flush=True)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.batch_size % dist.world_size:  # checked here, before the data are loaded (or cached)
        raise SpmlError(f"params train.batch_size {cfg.batch_size} is not divisible by the {dist.world_size} "
                        "DDP processes; change one of them")
    return device


@dataclass
class RunData:
    train: TrainSet
    val: EvalSet
    test: EvalSet
    table: LabelTable
    train_rows: np.ndarray


def load_run_data(dataset: str, cfg: TrainConfig, strong: bool, instances: bool,
                  dist: DistContext | None = None) -> RunData:
    from pipeline.datasets import check_source
    from pipeline.tables import read_label_table, read_observed_table

    table = read_label_table(paths.label_table(dataset))
    check_source(table.meta, paths.label_table(dataset))  # labels made from the raw data the images come from
    observed = read_observed_table(paths.observed_table(dataset))
    if not np.array_equal(observed.image_id, table.image_id) \
            or observed.meta.get("source_labels_sha256") != table.meta["provenance"]["labels_sha256"]:
        raise SpmlError(f"{paths.observed_table(dataset)} was not sampled from {paths.label_table(dataset)} as it is "
                        f"now; rerun `spml sample {dataset}`")
    root = Path(table.meta["image_root"])
    rows = {split: table.rows(split) for split in ("train", "val", "test")}
    for split, idx in rows.items():
        if len(idx) == 0:
            raise SpmlError(f"label table {paths.label_table(dataset)} has no {split} rows; check params split/data")
    # all rows decoded and resized once into data/cache/<dataset>/ (one builder per node under DDP)
    dist = dist or DistContext()
    cache_args = (root, list(table.path), cfg.image_size, paths.DATA / "cache" / dataset,
                  table.meta["provenance"]["labels_sha256"], f"{dataset} images", cfg.num_workers)
    if dist.local_rank == 0:
        cache = cached_images(*cache_args)
    dist.barrier()
    if dist.local_rank != 0:
        cache = cached_images(*cache_args)
    images = {split: ImageArray(cache, idx) for split, idx in rows.items()}
    full = torch.from_numpy(table.labels.astype(np.float32))
    inst = inst_classes = None
    if instances and "mask_path" in table.extras:
        tr = rows["train"]
        inst = load_instance_maps(root, [table.extras["mask_path"][i] for i in tr], cfg.image_size)
        inst_classes = pad_instance_classes([table.extras["instance_classes"][i] for i in tr])
    train = TrainSet(images["train"], torch.from_numpy(observed.labels[rows["train"]].astype(np.float32)),
                     full[rows["train"]], strong, cfg.strong_num_ops, cfg.strong_magnitude, inst, inst_classes,
                     source=(root, [table.path[i] for i in rows["train"]]), augment=cfg.augment,
                     augment_on=cfg.augment_on)
    return RunData(train, EvalSet(images["val"], full[rows["val"]]), EvalSet(images["test"], full[rows["test"]]),
                   table, rows["train"])


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    sampler: EpochSampler  # the train loader's; set_epoch before every epoch
    generator: torch.Generator  # the train loader's; a checkpoint saves it


def loader_settings(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The DataLoader settings of every loader (``spml bench --loader`` builds its loader with them too)."""
    return {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda", "worker_init_fn": _seed_worker,
            "persistent_workers": cfg.num_workers > 0}


def build_loaders(data: RunData, cfg: TrainConfig, seed: int, device: torch.device, dist: DistContext) -> Loaders:
    """Seeded loaders (see :class:`EpochSampler`); under DDP each rank loads its share of every batch."""
    generator = torch.Generator().manual_seed(seed)
    loader_kwargs = loader_settings(cfg, device)
    sampler = EpochSampler(len(data.train), seed, True, dist.rank, dist.world_size)
    train = DataLoader(data.train, batch_size=cfg.batch_size // dist.world_size, sampler=sampler,
                       generator=generator, drop_last=cfg.drop_last, **loader_kwargs)
    val, test = (
        DataLoader(split, batch_size=cfg.eval_batch_size, **loader_kwargs, generator=torch.Generator(),
                   sampler=EpochSampler(len(split), 0, False, dist.rank, dist.world_size),
                   drop_last=cfg.eval_drop_last)
        for split in (data.val, data.test))
    for name, loader, size in (("batch_size", train, cfg.batch_size), ("eval_batch_size", val, cfg.eval_batch_size),
                               ("eval_batch_size", test, cfg.eval_batch_size)):
        if len(loader) == 0:
            raise SpmlError(f"train.{name} {size} with drop_last leaves no batch of the {len(loader.dataset)} "
                            "images of a split; lower it")
    return Loaders(train, val, test, sampler, generator)


def build_normalizer(cfg: TrainConfig, device: torch.device) -> Normalizer:
    """The loop's input scaling; with ``augment_on: device`` it also makes the training views (batched)."""
    augment = None
    if cfg.augment_on == "device" and cfg.augment == "standard":  # Xie et al.'s views stay in the loader
        from pipeline.augment import DeviceAugment

        augment = DeviceAugment(cfg.strong_num_ops, cfg.strong_magnitude)
    # augment: lac feeds Xie et al.'s views, which are not ImageNet-normalised
    return Normalizer(device, channels_last=cfg.channels_last, imagenet=cfg.augment != "lac", augment=augment)


def method_context(run: RunConfig, data: RunData, steps_per_epoch: int, device: torch.device) -> MethodContext:
    stats = data.table.meta.get("stats", {})
    return MethodContext(
        dataset=run.dataset, model=run.train.model, num_classes=data.table.num_classes, num_train=len(data.train),
        epochs=run.train.epochs, steps_per_epoch=steps_per_epoch,
        mean_positives=float(stats.get("mean_positives_train", 1.0)),
        # a method gets its label_source's labels only: the observed ones, or the full ones for `full`
        observed_train=(data.train.full if get_method_class(run.method).label_source == "full"
                        else data.train.observed).to(device),
        device=device,
    )


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, method: Method) -> torch.optim.Optimizer:
    groups = model.parameter_groups(cfg.lr, cfg.head_lr_mult) + method.parameter_groups(cfg.lr)
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Training:
    """The model and everything one training step uses; :func:`build_training` makes it for ``fit`` and
    ``spml bench`` alike."""

    model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped every iteration
    scaler: torch.amp.GradScaler | None  # fp16 autocast only
    ema: WeightEMA | None
    amp: torch.dtype | None  # autocast dtype; None: fp32


def build_training(run: RunConfig, ctx: MethodContext, dist: DistContext | None = None,
                   init_model: dict[str, torch.Tensor] | None = None) -> Training:
    """The method, then the model (the method may ask for a variant: plc-lac's projector), then what
    updates the weights. ``init_model``: starting weights (keys the model lacks or adds are allowed)."""
    cfg, device, dist = run.train, ctx.device, dist or DistContext()
    method = build_method(run.method, run.method_params, ctx)
    model = build_model(cfg.model, ctx.num_classes, **{**run.model_kwargs, **method.model_kwargs()})
    if dist.enabled and cfg.sync_bn and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if init_model is not None:
        model.load_state_dict(init_model, strict=False)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = build_optimizer(cfg, model, method)
    ema = WeightEMA(model, cfg.weight_ema) if cfg.weight_ema is not None else None
    if cfg.compile:  # in place, after the EMA's copy: parameters, state_dict keys and checkpoints stay as they are
        compile_model(model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.epochs, ctx.steps_per_epoch, cfg.onecycle_pct_start)
    amp = amp_dtype(cfg.amp, cfg.amp_dtype, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    return Training(model, method, optimizer, scheduler, scaler, ema, amp)


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` the model's forward in place (``nn.Module.compile``). Its first calls in each mode
    (training, no-grad, eval) compile a graph, which ``spml bench`` leaves to its untimed warm-up steps."""
    if not hasattr(torch, "compile"):
        raise SpmlError(f"train.compile is true but torch {torch.__version__} has no torch.compile; set it to false")
    model.compile()


def resume_fingerprint(run: RunConfig, dist: DistContext) -> dict[str, Any]:
    """What a resume checkpoint of this run must match (:func:`pipeline.runtime.checkpoint.run_fingerprint`)."""
    inputs = [paths.label_table(run.dataset), paths.observed_table(run.dataset),
              *weight_files(run.train.model, run.model_kwargs),  # a retrained `pretrain` trunk invalidates a resume
              *get_method_class(run.method).input_files(run.dataset)]  # so do new CLIP scores
    return run_fingerprint(run.to_dict(), dist.world_size, inputs)


def wrap_ddp(model: torch.nn.Module, device: torch.device, dist: DistContext) -> torch.nn.Module:
    """The module the training steps run through: under DDP a wrapper that averages gradients over the
    ranks (evaluation, the EMA's copy and checkpoints use the bare model), else the model itself."""
    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda"
                                                     else None)


class DivergedError(SpmlError):
    """The loss or the scores became non-finite (or the loss passed ``train.max_loss``)."""


def diverged(epoch: int, where: str, what: str) -> DivergedError:
    return DivergedError(f"training diverged at epoch {epoch}, {where}: {what}; lower train.lr (or raise "
                         "train.max_loss if such losses are expected); no metrics were written")


def _first_bad_step(loss: torch.Tensor, max_loss: float | None) -> torch.Tensor:
    """A device-side bool: the loss is non-finite or above ``max_loss`` (no host sync)."""
    bad = ~torch.isfinite(loss)
    return bad if max_loss is None else bad | (loss.abs() > max_loss)


def train_step(model: torch.nn.Module, method: Method, batch: Batch, epoch: int, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
               scaler: torch.amp.GradScaler | None = None, amp: torch.dtype | None = None,
               ema: WeightEMA | None = None, meter: FalseNegativeMeter | None = None,
               hidden: HiddenLabels | None = None) -> StepOutput:
    """One training step, as the loop runs it and ``spml bench`` times it: the method's forward passes and
    loss, what it reported scored against the hidden labels (``meter``, ``hidden``), backward, the optimizer
    (and LR schedule) step, the method's post-step hook, the weight EMA. Returns the loss and logs only."""
    with autocast(batch.image.device, amp):
        out = method.training_step(model, batch, epoch)
    if meter is not None and hidden is not None:
        # scored before backward so the report's tensors are freed early (no_grad, draws no random numbers)
        score_step(meter, batch, out, hidden)
    out = StepOutput(out.loss, out.logs)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 only; bf16 needs no loss scaling
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    method.after_optimizer_step(batch, epoch)
    if ema is not None:
        ema.update(model)
    return out


def train_one_epoch(model, method: Method, loader, optimizer, normalize: Normalizer, epoch: int,
                    bar=None, task=None, scheduler=None, scaler=None, amp: torch.dtype | None = None,
                    ema: WeightEMA | None = None, max_loss: float | None = None) -> dict[str, float]:
    """One pass over ``loader``; no host-device synchronisation inside the loop (logs stay on the device).

    The method gets each batch without its hidden labels (:meth:`Normalizer.batch`); what it reports in its
    :class:`StepOutput` is scored against them here, in this epoch's :class:`FalseNegativeMeter`, and the
    returned row holds those columns (fn_*, gap_*, mask coverage...) after the loss and the method's logs.

    Divergence is recorded on the device (the first bad step and its loss) and raised once, at the end of
    the epoch, as :class:`DivergedError`: a non-finite loss, or one above ``max_loss`` if that is set."""
    model.train()
    method.on_epoch_start(epoch)
    total_loss = torch.zeros((), device=normalize.device)
    no_step = torch.iinfo(torch.int64).max
    first_bad = torch.full((), no_step, dtype=torch.int64, device=normalize.device)
    bad_loss = torch.zeros((), device=normalize.device)
    log_sums: dict[str, torch.Tensor] = {}
    meter = FalseNegativeMeter(normalize.device)  # the loop's, not the method's: one per epoch
    steps = 0
    for item in loader:
        batch = normalize.batch(item, method.label_source)
        out = train_step(model, method, batch, epoch, optimizer, scheduler, scaler, amp, ema, meter,
                         normalize.hidden(item))
        loss = out.loss.detach().float()
        newly_bad = _first_bad_step(loss, max_loss) & (first_bad == no_step)
        first_bad = torch.where(newly_bad, steps, first_bad)
        bad_loss = torch.where(newly_bad, loss, bad_loss)
        total_loss += loss
        for key, value in out.logs.items():
            log_sums[key] = log_sums.get(key, 0) + value.detach().float()
        steps += 1
        if bar is not None:
            bar.advance(task)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # one collective per epoch
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    if (step := int(first_bad.item())) != no_step:
        limit = "" if max_loss is None else f" (train.max_loss {max_loss:g})"
        raise diverged(epoch, f"step {step + 1} of {steps}", f"loss {float(bad_loss.item()):.4g}{limit}")
    row = {"train_loss": (total_loss / max(steps, 1)).item()}
    row.update({key: (value / max(steps, 1)).item() for key, value in log_sums.items()})
    row.update(meter.summary() if meter.active else {})
    return row


@torch.no_grad()
def predict(model, method: Method, loader, normalize: Normalizer, amp: torch.dtype | None = None,
            dist: DistContext | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and full labels of the whole loader; under DDP gathered from every rank, in row order."""
    model.eval()
    scores, targets, index = [], [], []
    for item in loader:
        with autocast(normalize.device, amp):
            logits = method.predict(model, normalize(item["image"]))
        scores.append(torch.sigmoid(logits.float()))
        targets.append(item["full"])
        if "index" in item:
            index.append(item["index"])
    s, t = torch.cat(scores).cpu().numpy(), torch.cat(targets).numpy()
    if dist is not None and dist.enabled:
        s, t, idx = gather_arrays(dist, s, t, torch.cat(index).numpy())
        order = np.argsort(idx, kind="stable")
        s, t = s[order], t[order]
    return s, t


def evaluate(model, method: Method, loader, normalize: Normalizer, amp: torch.dtype | None = None,
             dist: DistContext | None = None, epoch: int | None = None, split: str = "val") -> MapResult:
    from pipeline.metrics import mean_average_precision

    scores, targets = predict(model, method, loader, normalize, amp, dist)
    if not np.isfinite(scores).all():  # a NaN would otherwise reach scikit-learn as a traceback
        bad = int((~np.isfinite(scores)).any(axis=1).sum())
        where = f"{split} evaluation" if epoch is None else f"{split} evaluation after its last step"
        raise diverged(epoch or 0, where, f"{bad} of {len(scores)} images got non-finite scores")
    return mean_average_precision(targets, scores)


def validate(training: Training, loader: DataLoader, normalize: Normalizer, dist: DistContext,
             epoch: int) -> tuple[dict[str, float], torch.nn.Module]:
    """The epoch's history columns for val mAP and the model they select: the trained weights or, with a
    weight EMA, the better of those and the EMA's (Xie et al. keep the better of the two every epoch)."""
    model, method, amp = training.model, training.method, training.amp
    val = evaluate(model, method, loader, normalize, amp, dist, epoch)
    if training.ema is None:
        return {"val_map": val.map}, model
    val_ema = evaluate(training.ema.model, method, loader, normalize, amp, dist, epoch)
    if val_ema.map > val.map:
        return {"val_map_raw": val.map, "val_map_ema": val_ema.map, "val_map": val_ema.map}, training.ema.model
    return {"val_map_raw": val.map, "val_map_ema": val_ema.map, "val_map": val.map}, model


def should_stop(rule: str, value: float, history: list[dict[str, Any]]) -> bool:
    """The protocol's early-stopping rule, after the last epoch of ``history`` (rows with ``val_map``: the
    selected model's, and ``val_map_raw``/``val_map_ema`` when a weight EMA runs)."""
    maps = [row["val_map"] for row in history]
    if rule == "none" or len(maps) < 2:
        return False
    if rule == "no_improvement":  # Zhou et al.: the first epoch that is not a new best ends training
        return maps[-1] <= max(maps[:-1])
    if rule == "drop":  # Kim et al.: val mAP more than `value` points below the best so far
        return max(maps) - maps[-1] > value
    if rule == "patience":  # Xie et al.: `value` epochs past both the best epoch and the best raw-model epoch,
        raw = [row.get("val_map_raw", row["val_map"]) for row in history]  # while the EMA is below its best
        since = len(maps) - 1 - max(int(np.argmax(maps)), int(np.argmax(raw)))
        ema = [row["val_map_ema"] for row in history if "val_map_ema" in row]
        return since > value and (not ema or ema[-1] < max(ema))
    raise SpmlError(f"unknown early-stopping rule {rule!r}")


def select_and_stop(state: Checkpoint, row: dict[str, Any], selected: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Record the epoch's ``row``; if its val mAP is a new best (strictly better wins), keep CPU copies of
    the ``selected`` weights and of the method's state; then say whether the early-stopping rule ends
    training here."""
    state.history.append(row)
    state.epoch = row["epoch"]
    if row["val_map"] > state.best.val_map:
        # deepcopy: on CPU .cpu() returns the live tensors, which the next step would change
        weights = copy.deepcopy({k: v.detach().cpu() for k, v in selected.state_dict().items()})
        state.best = Best(row["val_map"], row["epoch"], weights, _to_cpu(state.method.state_dict()))
    return should_stop(cfg.early_stop, cfg.early_stop_value, state.history)


def evaluate_best(training: Training, best: Best, loader: DataLoader, normalize: Normalizer,
                  dist: DistContext) -> MapResult:
    """Test mAP of the best epoch's weights and method state, the number the protocol reports."""
    training.model.load_state_dict(best.model)
    training.method.load_state_dict(best.method)
    return evaluate(training.model, training.method, loader, normalize, training.amp, dist, best.epoch, "test")


def run_metrics(run: RunConfig, data: RunData, state: Checkpoint, test: MapResult, train_seconds: float,
                stage1: dict[str, Any] | None, device: torch.device, dist: DistContext,
                amp: torch.dtype | None) -> dict[str, Any]:
    """metrics.json: the selected epoch's val and test mAP, how the run went, and what it ran on."""
    cfg = run.train
    return {
        "dataset": run.dataset, "method": run.method, "model": cfg.model, "seed": run.seed,
        "config_sha256": run.cell_config_sha256(),  # what `aggregate` checks the run against its cell with
        "val_map": state.best.val_map, "test_map": test.map, "best_epoch": state.best.epoch,
        "epochs": cfg.epochs, "epochs_run": len(state.history), "protocol": run.protocol,
        "train_seconds": train_seconds,
        "test_classes_without_positives": test.classes_without_positives,
        "class_names": data.table.class_names, "test_per_class_ap": test.per_class_ap,
        "versions": {"spml_bench": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "stage1": {k: stage1[k] for k in ("method", "val_map", "test_map", "best_epoch", "epochs_run")}
        if stage1 else None,
        # what a bit-for-bit rerun must match on a CPU (spml verify): threads, the malloc, torch's version above
        "device": str(device), "threads": torch.get_num_threads(), "allocator": running_allocator()[0],
        "world_size": dist.world_size, "amp": str(amp).replace("torch.", "") if amp else "off",
        "timeline": run.timeline,
    }


def write_run(out_dir: Path, run: RunConfig, metrics: dict[str, Any], history: list[dict[str, Any]],
              best: Best) -> None:
    """The run folder's :data:`RUN_FILES`; ``best.pt`` holds the selected epoch's weights and method state."""
    import json

    import pandas as pd  # here, not at module level: spml bench imports this module where pandas is absent

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False, float_format="%.6g")
    save_file({"model": best.model, "method": best.method, "epoch": best.epoch, "config": run.to_dict()},
              out_dir / "best.pt")


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return copy.deepcopy(state)


def fit(run: RunConfig, out_dir: Path, resume_dir: Path | None = None, dist: DistContext | None = None,
        init_model: dict[str, torch.Tensor] | None = None, stage1: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one (dataset, method, seed) run and write its outputs into ``out_dir`` (rank 0 only).

    With ``resume_dir``, a checkpoint is written there after every epoch and, when one for the same
    config, input tables and code exists, training continues from it; the directory is removed once the
    outputs are written. A diverged run (:class:`DivergedError`) writes nothing.
    ``init_model``: starting weights (a previous stage's best; keys the model lacks or adds are allowed),
    ``stage1`` that stage's metrics, recorded in this run's.
    """
    cfg, dist = run.train, dist or DistContext()
    device = setup_process(cfg, dist)
    seed_everything(run.run_seed, cfg.deterministic)
    method_cls = get_method_class(run.method)
    data = load_run_data(run.dataset, cfg, method_cls.needs_strong_view, method_cls.needs_instances, dist)
    run = apply_timeline(run, len(data.train))  # the schedules, mapped to this run's epochs and steps
    cfg = run.train
    loaders = build_loaders(data, cfg, run.run_seed, device, dist)
    normalize = build_normalizer(cfg, device)
    # the method, then the model, draw their initial values from the seeded RNG: reordering moves every number
    training = build_training(run, method_context(run, data, len(loaders.train), device), dist, init_model)
    model, method = training.model, training.method
    state = Checkpoint(model, training.optimizer, method, loaders.generator, training.scheduler, training.scaler,
                       training.ema)
    fingerprint = resume_fingerprint(run, dist)
    if resume_dir is not None:
        state.load(resume_dir, fingerprint)
    train_model = wrap_ddp(model, device, dist)

    started = time.perf_counter() - state.train_seconds
    stopped = bool(state.history) and should_stop(cfg.early_stop, cfg.early_stop_value, state.history)
    with progress_bar() as bar:
        name, steps = f"{run.dataset}/{run.method}/{run.seed}", len(loaders.train)
        task = bar.add_task(name, total=cfg.epochs * steps, completed=state.epoch * steps)
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            if dist.enabled:  # rank-distinct dropout / method randomness, reproducible per epoch
                torch.manual_seed(derive_seed(run.run_seed, dist.rank, epoch))
            loaders.sampler.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch}
            row.update(train_one_epoch(train_model, method, loaders.train, training.optimizer, normalize, epoch,
                                       bar, task, training.scheduler, training.scaler, training.amp, training.ema,
                                       cfg.max_loss))
            # the train loader as the method sees it: batches without the hidden labels
            method.on_epoch_end(epoch, model, MethodBatches(loaders.train, normalize, method.label_source))
            row.update(method.epoch_diagnostics())  # what needs no hidden labels (tau...); fn_* came above
            broadcast_buffers(dist, model)
            val, selected = validate(training, loaders.val, normalize, dist, epoch)
            row.update(val, epoch_seconds=time.perf_counter() - t0)
            stopped = select_and_stop(state, row, selected, cfg)
            if resume_dir is not None and dist.is_main:
                state.train_seconds = time.perf_counter() - started
                state.save(resume_dir, fingerprint)
            bar.update(task, description=f"{name} val mAP {row['val_map']:.2f}")

    test = evaluate_best(training, state.best, loaders.test, normalize, dist)
    metrics = run_metrics(run, data, state, test, time.perf_counter() - started, stage1, device, dist, training.amp)
    if dist.is_main:
        write_run(out_dir, run, metrics, state.history, state.best)
        if resume_dir is not None:
            clear_resume(resume_dir)
    dist.barrier()
    return metrics


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a run checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
