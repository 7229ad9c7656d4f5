"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``, with no method known by name.

Model selection follows the SPML protocol: after every epoch the clean-label val mAP is computed; the
reported number is the test mAP of the checkpoint from the best-val epoch (strictly better wins).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import __version__, paths, runtime
from pipeline.config import Range, deep_merge, derive_seed, parse_dataclass, scoped
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
from pipeline.methods import Method, MethodContext, build_method, get_method_class
from pipeline.methods.diagnostics import FalseNegativeMeter, score_step
from pipeline.metrics import mean_average_precision
from pipeline.models import build_model, model_names, parse_model_params, weight_files
from pipeline.progress import progress_bar
from pipeline.tables import LabelTable, read_label_table, read_observed_table

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
    deterministic: bool  # torch deterministic algorithms (CPU metrics are then reproducible)
    host_malloc_cache: bool  # glibc malloc keeps freed memory for reuse (runtime.cache_host_memory)
    threads: Annotated[int, Range(ge=1)] | None  # torch intra-op threads; None: runtime.torch_threads decides
    # a step loss above this (or any non-finite one) stops the run as diverged; None: only non-finite losses
    max_loss: Annotated[float, Range(gt=0)] | None
    # GPU path (see pipeline/runtime.py); all of it is ignored or a no-op on CPU
    amp: bool  # mixed precision, opt-in (see runtime.amp_dtype)
    amp_dtype: Literal["auto", "bf16", "fp16"]  # auto: bf16 where supported, else fp16 + GradScaler
    channels_last: bool
    cudnn_benchmark: bool
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
class RunConfig:
    dataset: str
    method: str
    seed: int
    run_seed: int
    protocol: str
    train: TrainConfig
    model_kwargs: dict[str, Any]
    method_params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def resolve_run_config(params: dict[str, Any], dataset: str, method: str, seed: int) -> RunConfig:
    """The run's full configuration: ``train`` blocks, then the active protocol's block for the method
    (``protocol: original``: its authors' published protocol), then the method's params."""
    get_method_class(method)  # unknown method names fail first, listing the valid ones
    train_section = params.get("train") or {}
    model = scoped(train_section, dataset).get("model")
    if model is None:
        raise SpmlError("params train.model is missing; add it to params.yaml")
    if not isinstance(model, str):
        raise SpmlError(f"params train.model must be one of {', '.join(model_names())}, got {model!r}")
    protocol, proto = protocol_block(params, method)
    train = parse_dataclass(TrainConfig, deep_merge(scoped(train_section, dataset, model),
                                                    scoped(proto, dataset, model)), "train")
    model_kwargs = parse_model_params(train.model, (params.get("models") or {}).get(train.model))
    # each method reads its own block only (a train cell tracks only that block in dvc.yaml)
    method_params = scoped((params.get("method_params") or {}).get(method), dataset, train.model)
    run = RunConfig(dataset, method, seed, derive_seed(dataset, method, seed), protocol, train, model_kwargs,
                    method_params)
    if train.two_stage:
        stage1_config(run)  # a method without a stage 1 fails here, before any training
    return run


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
        return torch.device(name)
    except RuntimeError:
        raise SpmlError(f"params train.device {name!r} is not a torch device; use auto, cpu or cuda") from None


@dataclass
class RunData:
    train: TrainSet
    val: EvalSet
    test: EvalSet
    table: LabelTable
    train_rows: np.ndarray


def load_run_data(dataset: str, cfg: TrainConfig, strong: bool, instances: bool,
                  dist: runtime.DistContext | None = None) -> RunData:
    table = read_label_table(paths.label_table(dataset))
    observed = read_observed_table(paths.observed_table(dataset))
    if not np.array_equal(observed.image_id, table.image_id):
        raise SpmlError(f"{paths.observed_table(dataset)} does not match {paths.label_table(dataset)} row for row; "
                        f"rerun `spml sample {dataset}`")
    root = Path(table.meta["image_root"])
    rows = {split: table.rows(split) for split in ("train", "val", "test")}
    for split, idx in rows.items():
        if len(idx) == 0:
            raise SpmlError(f"label table {paths.label_table(dataset)} has no {split} rows; check params split/data")
    # all rows decoded and resized once into data/cache/<dataset>/ (one builder per node under DDP)
    dist = dist or runtime.DistContext()
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
                     source=(root, [table.path[i] for i in rows["train"]]), augment=cfg.augment)
    return RunData(train, EvalSet(images["val"], full[rows["val"]]), EvalSet(images["test"], full[rows["test"]]),
                   table, rows["train"])


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, method: Method) -> torch.optim.Optimizer:
    groups = model.parameter_groups(cfg.lr, cfg.head_lr_mult) + method.parameter_groups(cfg.lr)
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class DivergedError(SpmlError):
    """The loss or the scores became non-finite (or the loss passed ``train.max_loss``)."""


def diverged(epoch: int, where: str, what: str) -> DivergedError:
    return DivergedError(f"training diverged at epoch {epoch}, {where}: {what}; lower train.lr (or raise "
                         "train.max_loss if such losses are expected); no metrics were written")


def _first_bad_step(loss: torch.Tensor, max_loss: float | None) -> torch.Tensor:
    """A device-side bool: the loss is non-finite or above ``max_loss`` (no host sync)."""
    bad = ~torch.isfinite(loss)
    return bad if max_loss is None else bad | (loss.abs() > max_loss)


def train_one_epoch(model, method: Method, loader, optimizer, normalize: Normalizer, epoch: int,
                    bar=None, task=None, scheduler=None, scaler=None, amp: torch.dtype | None = None,
                    ema: runtime.WeightEMA | None = None, max_loss: float | None = None) -> dict[str, float]:
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
        with runtime.autocast(normalize.device, amp):
            out = method.training_step(model, batch, epoch)
        # scored before backward so the report's tensors are freed as early as before (no_grad, no RNG)
        score_step(meter, batch, out, normalize.hidden(item))
        step_loss, logs = out.loss, out.logs
        del out
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 only; bf16 needs no loss scaling
            scaler.scale(step_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            step_loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        method.after_optimizer_step(batch, epoch)
        if ema is not None:
            ema.update(model)
        loss = step_loss.detach().float()
        newly_bad = _first_bad_step(loss, max_loss) & (first_bad == no_step)
        first_bad = torch.where(newly_bad, steps, first_bad)
        bad_loss = torch.where(newly_bad, loss, bad_loss)
        total_loss += loss
        for key, value in logs.items():
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
            dist: runtime.DistContext | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and full labels of the whole loader; under DDP gathered from every rank, in row order."""
    model.eval()
    scores, targets, index = [], [], []
    for item in loader:
        with runtime.autocast(normalize.device, amp):
            logits = method.predict(model, normalize(item["image"]))
        scores.append(torch.sigmoid(logits.float()))
        targets.append(item["full"])
        if "index" in item:
            index.append(item["index"])
    s, t = torch.cat(scores).cpu().numpy(), torch.cat(targets).numpy()
    if dist is not None and dist.enabled:
        s, t, idx = runtime.gather_arrays(dist, s, t, torch.cat(index).numpy())
        order = np.argsort(idx, kind="stable")
        s, t = s[order], t[order]
    return s, t


def evaluate(model, method: Method, loader, normalize: Normalizer, amp: torch.dtype | None = None,
             dist: runtime.DistContext | None = None, epoch: int | None = None, split: str = "val"):
    scores, targets = predict(model, method, loader, normalize, amp, dist)
    if not np.isfinite(scores).all():  # a NaN would otherwise reach scikit-learn as a traceback
        bad = int((~np.isfinite(scores)).any(axis=1).sum())
        where = f"{split} evaluation" if epoch is None else f"{split} evaluation after its last step"
        raise diverged(epoch or 0, where, f"{bad} of {len(scores)} images got non-finite scores")
    return mean_average_precision(targets, scores)


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


def fit(run: RunConfig, out_dir: Path, resume_dir: Path | None = None,
        dist: runtime.DistContext | None = None, init_model: dict[str, torch.Tensor] | None = None,
        stage1: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one (dataset, method, seed) run and write its outputs into ``out_dir`` (rank 0 only).

    With ``resume_dir``, a checkpoint is written there after every epoch and, when one for the same
    config, input tables and code exists, training continues from it; the directory is removed once the
    outputs are written. A diverged run (:class:`DivergedError`) writes nothing.
    ``init_model``: starting weights (a previous stage's best; keys the model lacks or adds are allowed),
    ``stage1`` that stage's metrics, recorded in this run's.
    """
    cfg = run.train
    dist = dist or runtime.DistContext()
    torch.set_num_threads(runtime.torch_threads(cfg.threads))  # before any work (see runtime.torch_threads)
    seed_everything(run.run_seed, cfg.deterministic)
    if cfg.host_malloc_cache:
        runtime.cache_host_memory()
    device = pick_device(cfg.device)
    if device.type == "cuda":
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.batch_size % dist.world_size:
        raise SpmlError(f"params train.batch_size {cfg.batch_size} is not divisible by the {dist.world_size} "
                        "DDP processes; change one of them")
    method_cls = get_method_class(run.method)
    data = load_run_data(run.dataset, cfg, method_cls.needs_strong_view, method_cls.needs_instances, dist)
    num_classes = data.table.num_classes

    generator = torch.Generator().manual_seed(run.run_seed)
    loader_kwargs = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda",
                     "worker_init_fn": _seed_worker, "persistent_workers": cfg.num_workers > 0}
    train_sampler = runtime.EpochSampler(len(data.train), run.run_seed, True, dist.rank, dist.world_size)
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size // dist.world_size, sampler=train_sampler,
                              generator=generator, drop_last=cfg.drop_last, **loader_kwargs)
    val_loader, test_loader = (
        DataLoader(split, batch_size=cfg.eval_batch_size, **loader_kwargs, generator=torch.Generator(),
                   sampler=runtime.EpochSampler(len(split), 0, False, dist.rank, dist.world_size),
                   drop_last=cfg.eval_drop_last)
        for split in (data.val, data.test))
    for name, loader, size in (("batch_size", train_loader, cfg.batch_size),
                               ("eval_batch_size", val_loader, cfg.eval_batch_size),
                               ("eval_batch_size", test_loader, cfg.eval_batch_size)):
        if len(loader) == 0:
            raise SpmlError(f"train.{name} {size} with drop_last leaves no batch of the {len(loader.dataset)} "
                            "images of a split; lower it")
    normalize = Normalizer(device, channels_last=cfg.channels_last, imagenet=cfg.augment != "lac")

    stats = data.table.meta.get("stats", {})
    ctx = MethodContext(
        dataset=run.dataset, model=cfg.model, num_classes=num_classes, num_train=len(data.train),
        epochs=cfg.epochs, steps_per_epoch=len(train_loader),
        mean_positives=float(stats.get("mean_positives_train", 1.0)),
        # a method gets its label_source's labels only: the observed ones, or the full ones for `full`
        observed_train=(data.train.full if method_cls.label_source == "full" else data.train.observed).to(device),
        device=device,
    )
    method = build_method(run.method, run.method_params, ctx)
    model = build_model(cfg.model, num_classes, **{**run.model_kwargs, **method.model_kwargs()})
    if dist.enabled and cfg.sync_bn and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if init_model is not None:
        model.load_state_dict(init_model, strict=False)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = build_optimizer(cfg, model, method)
    ema = runtime.WeightEMA(model, cfg.weight_ema) if cfg.weight_ema is not None else None
    scheduler = runtime.build_scheduler(cfg.scheduler, optimizer, cfg.epochs, len(train_loader),
                                        cfg.onecycle_pct_start)
    amp = runtime.amp_dtype(cfg.amp, cfg.amp_dtype, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    history: list[dict[str, Any]] = []
    best = {"val_map": -math.inf, "epoch": 0, "model": None, "method": None}
    start_epoch, elapsed = 1, 0.0
    inputs = [paths.label_table(run.dataset), paths.observed_table(run.dataset),
              *weight_files(cfg.model, run.model_kwargs)]  # a retrained `pretrain` trunk invalidates a resume
    fingerprint = runtime.run_fingerprint(run.to_dict(), dist.world_size, inputs)
    loaded = runtime.load_resume(resume_dir, fingerprint) if resume_dir is not None else None
    if loaded is not None:
        state, best_state = loaded
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        history, start_epoch, elapsed = state["history"], state["epoch"] + 1, state["train_seconds"]
        best = {"val_map": state["best_val_map"], "epoch": state["best_epoch"],
                "model": best_state["model"] if best_state else None,
                "method": best_state["method"] if best_state else None}
        runtime.set_rng_state(state["rng"])
        generator.set_state(state["loader_generator"])
    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    started = time.perf_counter() - elapsed
    stopped = should_stop(cfg.early_stop, cfg.early_stop_value, history) if history else False
    with progress_bar() as bar:
        task = bar.add_task(f"{run.dataset}/{run.method}/{run.seed}", total=cfg.epochs * len(train_loader),
                            completed=(start_epoch - 1) * len(train_loader))
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            if dist.enabled:  # rank-distinct dropout / method randomness, reproducible per epoch
                torch.manual_seed(derive_seed(run.run_seed, dist.rank, epoch))
            train_sampler.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch}
            row.update(train_one_epoch(train_model, method, train_loader, optimizer, normalize, epoch, bar, task,
                                       scheduler, scaler, amp, ema, cfg.max_loss))
            # the train loader as the method sees it: batches without the hidden labels
            method.on_epoch_end(epoch, model, MethodBatches(train_loader, normalize, method.label_source))
            row.update(method.epoch_diagnostics())  # what needs no hidden labels (tau...); fn_* came above
            runtime.broadcast_buffers(dist, model)
            val = evaluate(model, method, val_loader, normalize, amp, dist, epoch)
            selected = model
            if ema is not None:  # Xie et al.: each epoch keeps the better of the raw and the EMA weights
                val_ema = evaluate(ema.model, method, val_loader, normalize, amp, dist, epoch)
                row["val_map_raw"], row["val_map_ema"] = val.map, val_ema.map
                if val_ema.map > val.map:
                    val, selected = val_ema, ema.model
            row["val_map"] = val.map
            row["epoch_seconds"] = time.perf_counter() - t0
            history.append(row)
            if val.map > best["val_map"]:
                best = {"val_map": val.map, "epoch": epoch,
                        "model": copy.deepcopy({k: v.detach().cpu() for k, v in selected.state_dict().items()}),
                        "method": _to_cpu(method.state_dict())}
            stopped = should_stop(cfg.early_stop, cfg.early_stop_value, history)
            if resume_dir is not None and dist.is_main:
                runtime.save_resume(resume_dir, {
                    "fingerprint": fingerprint, "epoch": epoch, "history": history,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "method": method.state_dict(), "rng": runtime.rng_state(),
                    "loader_generator": generator.get_state(), "best_val_map": best["val_map"],
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "train_seconds": time.perf_counter() - started,
                }, {"model": best["model"], "method": best["method"]}, best["epoch"])
            bar.update(task, description=f"{run.dataset}/{run.method}/{run.seed} val mAP {val.map:.2f}")

    model.load_state_dict(best["model"])
    method.load_state_dict(best["method"])
    test = evaluate(model, method, test_loader, normalize, amp, dist, best["epoch"], "test")
    metrics = {
        "dataset": run.dataset, "method": run.method, "model": cfg.model, "seed": run.seed,
        "val_map": best["val_map"], "test_map": test.map, "best_epoch": best["epoch"],
        "epochs": cfg.epochs, "epochs_run": len(history), "protocol": run.protocol,
        "train_seconds": time.perf_counter() - started,
        "test_classes_without_positives": test.classes_without_positives,
        "class_names": data.table.class_names, "test_per_class_ap": test.per_class_ap,
        "versions": {"spml_bench": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "stage1": {k: stage1[k] for k in ("method", "val_map", "test_map", "best_epoch", "epochs_run")}
        if stage1 else None,
        "device": str(device), "threads": torch.get_num_threads(), "world_size": dist.world_size,
        "amp": str(amp).replace("torch.", "") if amp else "off",
    }
    if dist.is_main:
        _write_run(out_dir, run, metrics, history, best)
        if resume_dir is not None:
            runtime.clear_resume(resume_dir)
    dist.barrier()
    return metrics


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return copy.deepcopy(state)


def _write_run(out_dir: Path, run: RunConfig, metrics, history, best) -> None:
    import json

    import pandas as pd

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False, float_format="%.6g")
    torch.save({"model": best["model"], "method": best["method"], "epoch": best["epoch"],
                "config": run.to_dict()}, out_dir / "best.pt")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a run checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
