"""Training methods as plug-ins: one module per method, one small interface, one registry.

A method is a subclass of :class:`Method` registered with :func:`register_method`. It declares its
hyperparameters as a dataclass (``Params``) whose defaults are overridden by
``params.yaml: method_params.<name>``; it runs its own forward passes in :meth:`Method.training_step`
(IGNORE needs three, AN one) and returns the loss. The training loop knows no method by name: it only
calls the hooks below.

What a method is handed and returns are the records of :mod:`pipeline.contracts` (the ground floor data,
loop and methods share). A method never sees the hidden full labels (nor the synthetic instance maps): a
:class:`~pipeline.contracts.Batch` holds the images and the observed labels only, and
:class:`~pipeline.contracts.MethodContext` the observed training labels. What a method did to the unannotated
entries it *reports* in its :class:`~pipeline.contracts.StepOutput` (``flagged``, ``split_means``,
``fn_share``, ``kept_region``); the training loop scores that against the hidden labels
(:mod:`pipeline.hidden_scoring`, beside the loop: no module of this package may import it) and writes the
false-negative columns of the history. The one method trained on the full labels (``full``, the upper bound)
says so with ``label_source = "full"``: the loop then hands it the full labels *as* ``Batch.observed``.

Adding a method is one new module in this package plus one ``method_params`` entry, e.g.::

    from pipeline.contracts import StepOutput
    from pipeline.methods import Method, register_method

    @register_method("my-an")
    class MyAN(Method):
        @dataclass
        class Params:
            weight: float  # every value comes from params.yaml: method_params.my-an

        def training_step(self, model, batch, epoch):
            logits = model(batch.image).logits
            loss = self.params.weight * F.binary_cross_entropy_with_logits(logits, batch.positives)
            return StepOutput(loss)

A method that rejects entries reports them, e.g. ``StepOutput(loss, flagged=reject)`` with ``reject`` a
(B, C) bool matrix, and gets fn_precision, fn_recall... in its history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from pipeline.config import parse_dataclass
from pipeline.contracts import Batch, MethodContext, StepOutput
from pipeline.errors import SpmlError
from pipeline.registry import METHODS

# Batch, MethodContext and StepOutput live in pipeline.contracts; they stay importable from here because the
# docs for method authors named this package as their home before the contracts had one (such methods still run)
__all__ = ["LABEL_SOURCES", "Batch", "Method", "MethodContext", "StepOutput", "build_method",
           "expected_positives", "get_method_class", "method_names", "register_method"]

# what a method trains on (Method.label_source): the observed labels, or the full ones (the upper bound only)
LABEL_SOURCES = ("observed", "full")


def expected_positives(k: float | None, ctx, where: str) -> float:
    """k from params, or (None) the dataset's true mean positives per training image from `prepare`."""
    value = ctx.mean_positives if k is None else k
    if not 0 < value <= ctx.num_classes:
        raise SpmlError(f"{where}.expected_positives must be in (0, {ctx.num_classes}], got {value}; "
                        "set it in params.yaml or rerun `spml prepare` to record the dataset's mean")
    return float(value)


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
    # an ablation of another method (IGNORE's Table 3 rows: "ignore-gap" of "ignore") lives in that method's
    # module; its cells are dvc.yaml's `ablate` stage, which depends on that module (params `ablations`)
    ablation_of: ClassVar[str | None] = None
    # which Params are schedules, and in which unit (pipeline/timeline.py: epochs | per_epoch | step_decay |
    # progress): their values are set for the method's reference protocol, and the loop maps them to the run
    # by the one timeline rule before the method is built. A param defined per epoch or per step must be here.
    schedules: ClassVar[dict[str, str]] = {}

    @dataclass
    class Params:
        pass

    def __init__(self, params: dict[str, Any], ctx: MethodContext):
        self.params = parse_dataclass(self.Params, params, f"method_params.{self.name}")
        self.ctx = ctx

    # --- hooks the training loop calls -------------------------------------------------------------
    @classmethod
    def input_files(cls, dataset: str) -> list[Path]:
        """Files this method reads besides the dataset's tables (e.g. its CLIP scores): a resume checkpoint is
        taken up again only while they are unchanged (their SHA-256 is part of its fingerprint)."""
        return []

    @classmethod
    def stage1_params(cls, params: dict[str, Any], epochs: int) -> dict[str, Any] | None:
        """This method's params for stage 1 of a two-stage protocol (``train.two_stage``), or None if it has
        no stage 1. Stage 1 runs this same module, so a cell's code dependencies stay its own module."""
        return None

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


def register_method(name: str):
    """Register a Method subclass in the one registry (pipeline.registry.METHODS) under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if cls.label_source not in LABEL_SOURCES:
            raise SpmlError(f"method {name}: label_source must be one of {', '.join(LABEL_SOURCES)}, "
                            f"got {cls.label_source!r}")
        return METHODS.register(name)(cls)

    return decorator


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, params: dict[str, Any], ctx: MethodContext) -> Method:
    return METHODS.get(name)(params, ctx)
