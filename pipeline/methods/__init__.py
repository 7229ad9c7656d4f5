"""Training methods as plug-ins: one module per method, one small interface, one registry.

A method is a subclass of :class:`Method` registered with :func:`register_method`. It declares its
hyperparameters as a dataclass (``Params``) whose defaults are overridden by
``params.yaml: method_params.<name>``; it runs its own forward passes in :meth:`Method.training_step`
(IGNORE needs three, AN one) and returns the loss. The training loop knows no method by name: it only
calls the hooks below.

A method never sees the hidden full labels (nor the synthetic instance maps): a :class:`Batch` holds the
images and the observed labels only, and :class:`MethodContext` the observed training labels. What a
method did to the unannotated entries it *reports* in its :class:`StepOutput` (``flagged``,
``split_means``, ``fn_share``, ``kept_region``); the training loop scores that against the hidden labels
(:mod:`pipeline.methods.diagnostics`) and writes the false-negative columns of the history. The one
method trained on the full labels (``full``, the upper bound) says so with ``label_source = "full"``:
the loop then hands it the full labels *as* ``Batch.observed``.

Adding a method is one new module in this package plus one ``method_params`` entry, e.g.::

    @register_method("my-an")
    class MyAN(Method):
        @dataclass
        class Params:
            weight: float = 1.0

        def training_step(self, model, batch, epoch):
            logits = model(batch.image).logits
            loss = self.params.weight * F.binary_cross_entropy_with_logits(logits, batch.positives)
            return StepOutput(loss)

A method that rejects entries reports them, e.g. ``StepOutput(loss, flagged=reject)`` with ``reject`` a
(B, C) bool matrix, and gets fn_precision, fn_recall... in its history.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from pipeline.config import parse_dataclass
from pipeline.errors import SpmlError, unknown_name

# what a method trains on (Method.label_source): the observed labels, or the full ones (the upper bound only)
LABEL_SOURCES = ("observed", "full")


@dataclass
class Batch:
    """One training batch as a method sees it, already on the device and normalised.

    No hidden ground truth here, by design: the full labels and instance maps of the batch stay with the
    training loop (:class:`pipeline.methods.diagnostics.HiddenLabels`)."""

    index: torch.Tensor  # (B,) long: row of each image in the training set (keys method state)
    image: torch.Tensor  # (B, 3, H, W) weak view (random horizontal flip only)
    # (B, C) float in {0, 1} (or {-1, 0, 1} with observed negatives); the full labels for label_source "full"
    observed: torch.Tensor
    strong: torch.Tensor | None = None  # (B, 3, H, W) strong view, when the method asks for it

    @property
    def positives(self) -> torch.Tensor:
        """{0,1} float matrix of observed positives (observed negatives count as 0)."""
        return (self.observed > 0).to(self.image.dtype)


@dataclass
class StepOutput:
    """The loss of one step, and what the method did, for the history.

    Only ``loss`` is required. The optional report fields are scored by the training loop against the
    hidden labels (:func:`pipeline.methods.diagnostics.score_step`), so a method can be diagnosed without
    seeing them; each field's history columns are named below. All are detached, on the batch's device."""

    loss: torch.Tensor
    # scalar tensors averaged over the epoch's steps and written to the history (no host sync per step)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    # (B, C) bool: the unannotated entries the method does not take as negatives this step (rejected,
    # corrected, pseudo-labelled positive...) -> fn_flagged, fn_precision, fn_recall, fn_f1, fn_base_rate,
    # fn_tn_ratio
    flagged: torch.Tensor | None = None
    # name -> (B, C) per-entry values (IGNORE's logit gap); their mean at the observed positives, the true
    # negatives and the false negatives -> <name>_sp, <name>_tn, <name>_fn
    split_means: dict[str, torch.Tensor] = field(default_factory=dict)
    # name -> (B, C) bool entry set (APL's pseudo-negatives); the share of false negatives among its
    # unannotated entries -> <name>
    fn_share: dict[str, torch.Tensor] = field(default_factory=dict)
    # (B, H, W) in [0, 1]: the pixels of the weak view the method kept (IGNORE's CAM mask); against the
    # synthetic instance maps (where loaded, see Method.needs_instances) -> mask_pos_kept, mask_other_removed
    kept_region: torch.Tensor | None = None


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""

    dataset: str
    model: str
    num_classes: int
    num_train: int  # rows of the training set; Batch.index < num_train
    epochs: int
    steps_per_epoch: int
    # the dataset's mean label count over the training images: EPR/ROLE's published choice of k (a dataset
    # statistic, not any image's labels)
    mean_positives: float
    observed_train: torch.Tensor  # (num_train, C) initial labels as Batch.observed has them, on the device
    device: torch.device


class Method:
    """Base class; subclasses override what they need."""

    name: ClassVar[str] = ""
    needs_strong_view: ClassVar[bool] = False
    # the loop loads the synthetic instance maps to score the method's StepOutput.kept_region (the method
    # never sees them)
    needs_instances: ClassVar[bool] = False
    # the labels the loop hands the method as Batch.observed (and MethodContext.observed_train): "observed",
    # or "full" for the full-label upper bound only
    label_source: ClassVar[Literal["observed", "full"]] = "observed"
    # a variant of another method (e.g. "ignore-gap" of "ignore") reads method_params.<params_base> first,
    # then its own block; None: only its own block
    params_base: ClassVar[str | None] = None

    @dataclass
    class Params:
        pass

    def __init__(self, params: dict[str, Any], ctx: MethodContext):
        self.params = parse_dataclass(self.Params, params, f"method_params.{self.name}")
        self.ctx = ctx

    # --- hooks the training loop calls -------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Extra model constructor arguments the method needs (e.g. plc-lac's projector on q2l)."""
        return {}

    def parameter_groups(self, lr: float) -> list[dict]:
        """Extra optimised tensors (e.g. ROLE's label table), as optimizer parameter groups."""
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (epochs count from 1)."""

    def training_step(self, model: torch.nn.Module, batch: Batch, epoch: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, batch: Batch, epoch: int) -> None:
        """Called after ``optimizer.step()`` (e.g. LL-Cp's permanent label flips)."""

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, batches: Iterable[Batch]) -> None:
        """Called after each training epoch, before validation (e.g. APL's pseudo-labelling round).

        ``batches``: one more pass over the training set, as the method sees it (iterate it or not)."""

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation."""
        return model(images).logits

    def epoch_diagnostics(self) -> dict[str, float]:
        """Per-epoch values for the history that need no hidden labels (thresholds, mask areas...); the
        false-negative scores of what the steps reported are the training loop's."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Cross-iteration state saved with the checkpoint (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    def decorator(cls: type[Method]) -> type[Method]:
        if cls.label_source not in LABEL_SOURCES:
            raise SpmlError(f"method {name}: label_source must be one of {', '.join(LABEL_SOURCES)}, "
                            f"got {cls.label_source!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("diagnostics", "losses"):
            importlib.import_module(f"{__name__}.{module.name}")


def method_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _discover()
    if name not in _REGISTRY:
        raise unknown_name("method", name, list(_REGISTRY))
    return _REGISTRY[name]


def build_method(name: str, params: dict[str, Any], ctx: MethodContext) -> Method:
    return get_method_class(name)(params, ctx)
