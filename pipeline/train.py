"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``, with no method known by name.

Model selection follows the SPML protocol: after every epoch the clean-label val mAP is computed; the
reported number is the test mAP of the checkpoint from the best-val epoch (strictly better wins).

``fit`` is the recipe, one line per step; the steps are the functions above it, in the order it calls them.
``spml bench step`` (:mod:`pipeline.tools.bench`) resolves its config, builds its model, method and optimizer
and runs its timed step through the same functions (:func:`resolve_run_config`, :func:`build_training`,
:func:`train_step`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import __version__, paths
from pipeline.config import derive_seed
from pipeline.contracts import Batch, HiddenLabels, MethodContext, StepOutput
from pipeline.data import (
    EvalSet,
    ImageArray,
    MethodBatches,
    Normalizer,
    TrainSet,
    cached_images,
    collate_jpeg,
    load_instance_maps,
    pad_instance_classes,
)
from pipeline.errors import SpmlError
from pipeline.hidden_scoring import FalseNegativeMeter, score_step
from pipeline.methods import Method, build_method, get_method_class
from pipeline.models import build_model, weight_files
from pipeline.progress import progress_bar
from pipeline.runtime.checkpoint import Best, Checkpoint, clear_resume, run_fingerprint, save_file
from pipeline.runtime.distributed import DistContext, EpochSampler, broadcast_buffers, gather_arrays
from pipeline.runtime.host import announcing, host_memory, running_allocator, torch_threads
from pipeline.runtime.optim import WeightEMA, amp_dtype, autocast, build_scheduler
from pipeline.run_config import RunConfig, RuntimeConfig, TrainConfig, apply_timeline

# pipeline.tables (pyarrow) and pipeline.metrics (scikit-learn) are imported where they are used: `spml bench`
# builds through this module on GPU machines that have torch but neither of those (docs/bench-gpu.md)
if TYPE_CHECKING:
    from pipeline.metrics import MapResult
    from pipeline.tables import LabelTable

RUN_FILES = ("metrics.json", "config.json", "history.csv", "best.pt")  # what fit writes into a run folder


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
        raise SpmlError(f"params runtime.device {name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpmlError(f"params runtime.device {name!r}: CUDA is not available on this machine; use auto or cpu")
    return device


def setup_process(cfg: TrainConfig, rt: RuntimeConfig, dist: DistContext) -> torch.device:
    """Threads, host memory and the device, before any work (``spml bench`` starts the same way)."""
    torch.set_num_threads(torch_threads(rt.threads))  # before any work (see runtime.host.torch_threads)
    memory = host_memory(rt.host_allocator, rt.host_malloc_cache)  # the glibc fallback is applied here
    if announcing() and dist.is_main:  # one line, from the spml command (in-process callers stay quiet)
        print(memory.notice, file=sys.stderr, flush=True)
    device = pick_device(rt.device)
    if device.type == "cuda":
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
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


def load_run_data(dataset: str, cfg: TrainConfig, strong: bool, instances: bool, num_workers: int,
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
    check_decode(cfg, root / table.path[rows["train"][0]])
    # the rows decoded and resized once into data/cache/<dataset>/ (one builder per node under DDP): all of them,
    # or with decode: device only val and test (the device decodes the training files every epoch)
    cached = np.arange(len(table.path)) if cfg.decode == "cpu" else np.sort(np.concatenate([rows["val"], rows["test"]]))
    dist = dist or DistContext()
    cache_args = (root, [table.path[i] for i in cached], cfg.image_size, paths.DATA / "cache" / dataset,
                  table.meta["provenance"]["labels_sha256"], f"{dataset} images", num_workers)
    if dist.local_rank == 0:
        cache = cached_images(*cache_args)
    dist.barrier()
    if dist.local_rank != 0:
        cache = cached_images(*cache_args)
    position = np.full(len(table.path), -1, dtype=np.int64)  # table row -> cache row
    position[cached] = np.arange(len(cached))
    images = {split: ImageArray(cache, position[idx]) for split, idx in rows.items()
              if split != "train" or cfg.decode == "cpu"}
    full = torch.from_numpy(table.labels.astype(np.float32))
    inst = inst_classes = None
    if instances and "mask_path" in table.extras:
        tr = rows["train"]
        inst = load_instance_maps(root, [table.extras["mask_path"][i] for i in tr], cfg.image_size)
        inst_classes = pad_instance_classes([table.extras["instance_classes"][i] for i in tr])
    train = TrainSet(images.get("train"), torch.from_numpy(observed.labels[rows["train"]].astype(np.float32)),
                     full[rows["train"]], strong, cfg.strong_num_ops, cfg.strong_magnitude, inst, inst_classes,
                     source=(root, [table.path[i] for i in rows["train"]]), augment=cfg.augment,
                     augment_on=cfg.augment_on, decode=cfg.decode)
    return RunData(train, EvalSet(images["val"], full[rows["val"]]), EvalSet(images["test"], full[rows["test"]]),
                   table, rows["train"])


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    sampler: EpochSampler  # the train loader's; set_epoch before every epoch
    generator: torch.Generator  # the train loader's; a checkpoint saves it


def loader_settings(rt: RuntimeConfig, device: torch.device) -> dict[str, Any]:
    """The DataLoader settings of every loader (``spml bench loader`` builds its loader with them too)."""
    return {"num_workers": rt.num_workers, "pin_memory": device.type == "cuda", "worker_init_fn": _seed_worker,
            "persistent_workers": rt.num_workers > 0}


def build_loaders(data: RunData, cfg: TrainConfig, rt: RuntimeConfig, seed: int, device: torch.device,
                  dist: DistContext) -> Loaders:
    """Seeded loaders (see :class:`EpochSampler`); under DDP each rank loads its share of every batch."""
    generator = torch.Generator().manual_seed(seed)
    loader_kwargs = loader_settings(rt, device)
    sampler = EpochSampler(len(data.train), seed, True, dist.rank, dist.world_size)
    train = DataLoader(data.train, batch_size=cfg.batch_size // dist.world_size, sampler=sampler,
                       generator=generator, drop_last=cfg.drop_last,
                       collate_fn=collate_jpeg if cfg.decode == "device" else None, **loader_kwargs)
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


def build_normalizer(cfg: TrainConfig, device: torch.device, channels_last: bool) -> Normalizer:
    """The loop's input scaling; with ``augment_on: device`` it also makes the training views (batched)."""
    augment = None
    if cfg.augment_on == "device" and cfg.augment == "standard":  # Xie et al.'s views stay in the loader
        from pipeline.augment import DeviceAugment

        augment = DeviceAugment(cfg.strong_num_ops, cfg.strong_magnitude)
    # augment: lac feeds Xie et al.'s views, which are not ImageNet-normalised
    return Normalizer(device, channels_last=channels_last, imagenet=cfg.augment != "lac", augment=augment,
                      decode_size=(cfg.image_size, cfg.image_size) if cfg.decode == "device" else None)


def check_decode(cfg: TrainConfig, first_image: Path) -> None:
    """``train.decode: device`` needs the device views and JPEG files (``first_image``, a training file, is probed)."""
    if cfg.decode == "cpu":
        return
    if cfg.augment_on != "device" or cfg.augment != "standard":
        raise SpmlError(f"params train.decode device needs train.augment_on device and train.augment standard (the "
                        f"device makes the views of the images it decodes), got augment_on {cfg.augment_on}, augment "
                        f"{cfg.augment}; set them or train.decode cpu")
    from pipeline.decode import read_jpeg

    read_jpeg(first_image)  # a PNG dataset (the synthetic one) fails here, before any caching, with what to do


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
    # a step loss above this (or any non-finite one) is divergence (runtime.max_loss); None: non-finite only
    max_loss: float | None


def build_training(run: RunConfig, ctx: MethodContext, dist: DistContext | None = None,
                   init_model: dict[str, torch.Tensor] | None = None) -> Training:
    """The method, then the model (the method may ask for a variant: plc-lac's projector), then what
    updates the weights. ``init_model``: starting weights (keys the model lacks or adds are allowed)."""
    cfg, rt, device, dist = run.train, run.runtime, ctx.device, dist or DistContext()
    method = build_method(run.method, run.method_params, ctx)
    model = build_model(cfg.model, ctx.num_classes, **{**run.model_kwargs, **method.model_kwargs()})
    if dist.enabled and cfg.sync_bn and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if init_model is not None:
        model.load_state_dict(init_model, strict=False)
    model = model.to(device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    optimizer = build_optimizer(cfg, model, method)
    ema = WeightEMA(model, cfg.weight_ema) if cfg.weight_ema is not None else None
    if rt.compile:  # in place, after the EMA's copy: parameters, state_dict keys and checkpoints stay as they are
        compile_model(model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.epochs, ctx.steps_per_epoch, cfg.onecycle_pct_start)
    amp = amp_dtype(cfg.amp, cfg.amp_dtype, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    return Training(model, method, optimizer, scheduler, scaler, ema, amp, rt.max_loss)


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` the model's forward in place (``nn.Module.compile``). Its first calls in each mode
    (training, no-grad, eval) compile a graph, which ``spml bench`` leaves to its untimed warm-up steps."""
    if not hasattr(torch, "compile"):
        raise SpmlError(f"runtime.compile is true but torch {torch.__version__} has no torch.compile; set it to false")
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
    """The loss or the scores became non-finite (or the loss passed ``runtime.max_loss``)."""


def diverged(epoch: int, where: str, what: str) -> DivergedError:
    return DivergedError(f"training diverged at epoch {epoch}, {where}: {what}; lower train.lr (or raise "
                         "runtime.max_loss if such losses are expected); no metrics were written")


def _first_bad_step(loss: torch.Tensor, max_loss: float | None) -> torch.Tensor:
    """A device-side bool: the loss is non-finite or above ``max_loss`` (no host sync)."""
    bad = ~torch.isfinite(loss)
    return bad if max_loss is None else bad | (loss.abs() > max_loss)


def train_step(training: Training, batch: Batch, epoch: int, model: torch.nn.Module | None = None,
               meter: FalseNegativeMeter | None = None, hidden: HiddenLabels | None = None) -> StepOutput:
    """One training step, as the loop runs it and ``spml bench`` times it: the method's forward passes and
    loss, what it reported scored against the hidden labels (``meter``, ``hidden``), backward, the optimizer
    (and LR schedule) step, the method's post-step hook, the weight EMA. Returns the loss and logs only.

    ``model``: the module the step runs through, ``training.model`` unless given (``fit`` gives its DDP
    wrapper)."""
    model = training.model if model is None else model
    method, optimizer, scaler = training.method, training.optimizer, training.scaler
    with autocast(batch.image.device, training.amp):
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
    if training.scheduler is not None:
        training.scheduler.step()
    method.after_optimizer_step(batch, epoch)
    if training.ema is not None:
        training.ema.update(model)
    return out


def train_one_epoch(training: Training, loader: Iterable[dict[str, Any]], normalize: Normalizer, epoch: int,
                    model: torch.nn.Module | None = None,
                    on_step: Callable[[], object] | None = None) -> dict[str, float]:
    """One pass over ``loader`` (:func:`train_step` per batch); no host-device synchronisation inside the
    loop (logs stay on the device). ``model``: as in :func:`train_step`; ``on_step``: called after each step
    (the progress bar).

    The method gets each batch without its hidden labels (:meth:`Normalizer.batch`); what it reports in its
    :class:`StepOutput` is scored against them here, in this epoch's :class:`FalseNegativeMeter`, and the
    returned row holds those columns (fn_*, gap_*, mask coverage...) after the loss and the method's logs.

    Divergence is recorded on the device (the first bad step and its loss) and raised once, at the end of
    the epoch, as :class:`DivergedError`: a non-finite loss, or one above ``training.max_loss`` if that is set."""
    model = training.model if model is None else model
    method, max_loss = training.method, training.max_loss
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
        out = train_step(training, batch, epoch, model, meter, normalize.hidden(item))
        loss = out.loss.detach().float()
        newly_bad = _first_bad_step(loss, max_loss) & (first_bad == no_step)
        first_bad = torch.where(newly_bad, steps, first_bad)
        bad_loss = torch.where(newly_bad, loss, bad_loss)
        total_loss += loss
        for key, value in out.logs.items():
            log_sums[key] = log_sums.get(key, 0) + value.detach().float()
        steps += 1
        if on_step is not None:
            on_step()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # one collective per epoch
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    if (step := int(first_bad.item())) != no_step:
        limit = "" if max_loss is None else f" (runtime.max_loss {max_loss:g})"
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
    cfg, rt, dist = run.train, run.runtime, dist or DistContext()
    if rt is None:
        raise SpmlError("a run needs its runtime settings (params runtime); resolve it with resolve_run_config")
    device = setup_process(cfg, rt, dist)
    seed_everything(run.run_seed, rt.deterministic)
    method_cls = get_method_class(run.method)
    data = load_run_data(run.dataset, cfg, method_cls.needs_strong_view, method_cls.needs_instances,
                         rt.num_workers, dist)
    run = apply_timeline(run, len(data.train))  # the schedules, mapped to this run's epochs and steps
    cfg = run.train
    loaders = build_loaders(data, cfg, rt, run.run_seed, device, dist)
    normalize = build_normalizer(cfg, device, rt.channels_last)
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
            row.update(train_one_epoch(training, loaders.train, normalize, epoch, train_model,
                                       functools.partial(bar.advance, task)))
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
