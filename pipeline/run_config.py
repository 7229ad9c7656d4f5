"""A run's configuration, resolved from params.yaml: what a cell trains (:class:`RunConfig`) and how this machine
runs it (:class:`RuntimeConfig`).

The two halves are kept apart on purpose. :class:`TrainConfig` and the method's block decide the numbers a run
reports; they are what a DVC cell tracks and what ``config_sha256`` hashes. :class:`RuntimeConfig` (params
``runtime``: threads, workers, device, allocator, compile...) can change speed and float noise only, so no cell
tracks it and a user may set it for their machine without making a committed result stale (docs/params.md).

Resolution order for a run's ``train`` values: the ``train`` blocks (scoped by dataset and model, see
:mod:`pipeline.config`), then, under ``protocol: original``, the method's authors' protocol
(``method_params.<method>.original``, scoped the same way). A method without an ``original`` block runs
``unified`` there, and its run records that. Then the one timeline rule (:mod:`pipeline.timeline`) maps the
method's schedules to the run's length, once the training set's size is known (:func:`apply_timeline`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pipeline import paths
from pipeline.config import Range, config_sha256, deep_merge, derive_seed, parse_dataclass, scoped
from pipeline.errors import SpmlError
from pipeline.methods import get_method_class
from pipeline.models import model_names, parse_model_params
from pipeline.timeline import Reference, steps_per_epoch, timeline_for

# The smallest input: every trunk downsamples by 8 or more, and a CAM needs at least 2x2 maps (smallcnn).
MIN_IMAGE_SIZE = 16


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
    strong_num_ops: Annotated[int, Range(ge=0)]  # RandAugment of the strong view
    strong_magnitude: Annotated[int, Range(ge=0, le=30)]  # RandAugment's 31 magnitude bins: 0..30
    # where the flips and the strong view's RandAugment run: loader (per sample, in the loader's processes) |
    # device (batched on the training device, pipeline.augment.DeviceAugment); augment: lac's views stay in the loader
    augment_on: Literal["loader", "device"]
    # where the training JPEGs are decoded: cpu (PIL, in the loader; the image cache) | device (batched on the
    # training device, torchvision.io.decode_jpeg: nvJPEG on CUDA; needs augment_on device; pipeline/decode.py)
    decode: Literal["cpu", "device"]
    # mixed precision changes the numbers (see pipeline/runtime/optim.py); no-op on CPU unless bf16 is asked for
    amp: bool  # mixed precision, opt-in (see runtime.optim.amp_dtype)
    amp_dtype: Literal["auto", "bf16", "fp16"]  # auto: bf16 where supported, else fp16 + GradScaler
    sync_bn: bool  # DDP: BatchNorm statistics over all ranks' samples (the global batch)
    scheduler: Literal["none", "onecycle"]  # onecycle: OneCycleLR (max_lr = lr), stepped every iteration
    onecycle_pct_start: Annotated[float, Range(gt=0, lt=1)]
    # protocol knobs (set per method by `method_params.<method>.original`: its authors' published protocol)
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
class RuntimeConfig:
    """``params.yaml: runtime``: how this machine runs a cell. Nothing here can change a metric beyond float noise
    (a different thread count, kernel or allocator), so no DVC cell tracks it and ``config_sha256`` leaves it out."""

    device: str  # auto: cuda if available, else cpu
    num_workers: Annotated[int, Range(ge=0)]  # augmentation is seeded per sample, so any count gives the same views
    threads: Annotated[int, Range(ge=1)] | None  # torch intra-op threads; None: runtime.host.torch_threads decides
    # which malloc serves host memory: auto (jemalloc, else tcmalloc, else glibc) | jemalloc | tcmalloc | glibc;
    # the CLI preloads the library by a re-exec (runtime.host.preload_allocator); $SPML_ALLOCATOR wins
    host_allocator: Literal["auto", "jemalloc", "tcmalloc", "glibc"]
    host_malloc_cache: bool  # where glibc's malloc runs: keep freed memory for reuse (runtime.host.cache_host_memory)
    deterministic: bool  # torch deterministic algorithms
    channels_last: bool
    cudnn_benchmark: bool
    compile: bool  # torch.compile the model (its first steps compile it: slower start, faster steps on a GPU)
    # a step loss above this (or any non-finite one) stops the run as diverged; None: only non-finite losses.
    # It decides whether a run writes metrics, never what they are
    max_loss: Annotated[float, Range(gt=0)] | None


def resolve_runtime(params: dict[str, Any]) -> RuntimeConfig:
    """params ``runtime``, checked."""
    section = params.get("runtime")
    if section is None:
        raise SpmlError("params runtime is missing; add the `runtime:` block (threads, num_workers, device ...) to "
                        "params.yaml (docs/params.md)")
    return parse_dataclass(RuntimeConfig, section, "runtime")


@dataclass
class TimelineParams:
    """``params.yaml: timeline.<dataset>``: the real dataset an embedded one stands for (pipeline/timeline.py)."""

    reference: str  # a dataset name: whose `original` blocks the schedules were set for
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
    # how this machine runs it (params runtime): not part of the config (to_dict, config.json, the hash)
    runtime: RuntimeConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["cell_sha256"], out["runtime"]
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


def block_owner(method: str) -> str:
    """Whose ``method_params`` block a method reads: its own, or for an ablation (IGNORE's Table 3 rows) that of
    the method it ablates (one key per value: a preset that changes IGNORE's block changes its ablations too)."""
    return get_method_class(method).ablation_of or method


def method_block(params: dict[str, Any], method: str) -> dict[str, Any]:
    """``method_params.<owner>`` (empty if absent)."""
    return (params.get("method_params") or {}).get(block_owner(method)) or {}


def protocol_block(params: dict[str, Any], method: str) -> tuple[str, dict[str, Any]]:
    """The protocol the run trains under and its scoped block of train values for ``method``: ``unified`` has
    none (``train`` alone); ``original`` is ``method_params.<method>.original``. A method with no such block runs
    ``unified`` under ``protocol: original`` (adding a method needs only its module and its params block)."""
    protocol = params.get("protocol")
    if protocol is None:
        raise SpmlError("params protocol is missing; add `protocol: unified` (or original) to params.yaml")
    if protocol not in PROTOCOLS:
        raise SpmlError(f"params protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    block = method_block(params, method).get("original") if protocol == "original" else None
    if block is None:
        return "unified", {}
    if not isinstance(block, dict):
        raise SpmlError(f"params method_params.{block_owner(method)}.original must be a block of scoped train values "
                        f"(default, <dataset>, <model>), got {block!r}")
    return protocol, block


def resolve_run_config(params: dict[str, Any], dataset: str, method: str, seed: int,
                       model: str | None = None) -> RunConfig:
    """The run's full configuration: ``train`` blocks, then the active protocol's block for the method
    (``protocol: original``: its authors' published protocol), then the method's params.

    ``model`` replaces params ``train.model`` before anything is scoped by it (``spml bench step --model``)."""
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
    where = f"method_params.{block_owner(method)}.original"
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
    # each method reads its own block only (a train cell tracks only that block in dvc.yaml); `original` is a
    # protocol, not a scope, so scoped() never merges it into the method's params
    method_params = scoped(method_block(params, method), dataset, train.model)
    run = RunConfig(dataset, method, seed, derive_seed(dataset, method, seed), protocol, train, model_kwargs,
                    method_params, schedule_reference(params, dataset, method, train.model), search=search,
                    runtime=resolve_runtime(params))
    if train.two_stage:
        stage1_config(run)  # a method without a stage 1 fails here, before any training
    return run


def schedule_reference(params: dict[str, Any], dataset: str, method: str, model: str) -> Reference:
    """The protocol ``method``'s schedules were published for: its ``method_params.<method>.original`` block on the
    run's dataset, or on the real dataset an embedded one stands for (``timeline.<dataset>``)."""
    owner = block_owner(method)
    block = method_block(params, method).get("original")
    if block is None:
        return Reference(f"none: method_params.{owner} has no original block", None, None, False, None)
    embedded = (params.get("timeline") or {}).get(dataset)
    images = None
    reference = dataset
    if embedded is not None:
        stand_in = parse_dataclass(TimelineParams, embedded, f"timeline.{dataset}")
        reference, images = stand_in.reference, stand_in.train_images
    values = deep_merge(scoped(params.get("train") or {}, reference, model), scoped(block, reference, model))
    where = f"method_params.{owner}.original"
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
                        f"false in the block that sets it (method_params.{block_owner(run.method)}.original or train)")
    return dataclasses.replace(run, train=dataclasses.replace(run.train, two_stage=False), method_params=params,
                               model_kwargs=dict(run.model_kwargs))


