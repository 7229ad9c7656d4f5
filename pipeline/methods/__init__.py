"""Training methods as plug-ins: one module per method, one small interface, one registry.

A method is a subclass of :class:`Method` registered with :func:`register_method`. It declares its
hyperparameters as a dataclass (``Params``) whose defaults are overridden by
``params.yaml: method_params.<name>``; it runs its own forward passes in :meth:`Method.training_step`
(IGNORE needs three, AN one) and returns the loss. The training loop knows no method by name: it only
calls the hooks below.

Adding a method is one new module in this package plus one ``method_params`` entry, e.g.::

    @register_method("my-an")
    class MyAN(Method):
        @dataclass
        class Params:
            weight: float  # every value comes from params.yaml: method_params.my-an

        def training_step(self, model, batch, epoch):
            logits = model(batch.image).logits
            loss = self.params.weight * F.binary_cross_entropy_with_logits(logits, batch.positives)
            return StepOutput(loss)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pipeline.config import parse_dataclass
from pipeline.errors import SpmlError
from pipeline.methods.diagnostics import FalseNegativeMeter
from pipeline.registry import METHODS


@dataclass
class Batch:
    """One training batch, already on the device and normalised."""

    index: torch.Tensor  # (B,) long: row of each image in the training set (keys method state)
    image: torch.Tensor  # (B, 3, H, W) weak view (random horizontal flip only)
    observed: torch.Tensor  # (B, C) float in {0, 1} (or {-1, 0, 1} with observed negatives)
    full: torch.Tensor  # (B, C) float {0, 1}: hidden full labels, for `full` and diagnostics only
    strong: torch.Tensor | None = None  # (B, 3, H, W) strong view, when the method asks for it
    instances: torch.Tensor | None = None  # (B, H, W) uint8 instance map of the weak view (synthetic)
    instance_classes: torch.Tensor | None = None  # (B, K) long class of instance k+1, -1 padding

    @property
    def positives(self) -> torch.Tensor:
        """{0,1} float matrix of observed positives (observed negatives count as 0)."""
        return (self.observed > 0).to(self.image.dtype)


@dataclass
class StepOutput:
    loss: torch.Tensor
    # scalar tensors averaged over the epoch's steps and written to the history (no host sync per step)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""

    dataset: str
    model: str
    num_classes: int
    num_train: int  # rows of the training set; Batch.index < num_train
    epochs: int
    steps_per_epoch: int
    mean_positives: float  # true mean positives per training image (EPR/ROLE's k on synthetic data)
    observed_train: torch.Tensor  # (num_train, C) initial observed labels, on the device
    device: torch.device


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
    needs_instances: ClassVar[bool] = False
    # an ablation of another method (IGNORE's Table 3 rows: "ignore-gap" of "ignore") lives in that method's
    # module; its cells are dvc.yaml's `ablate` stage, which depends on that module (params `ablations`)
    ablation_of: ClassVar[str | None] = None

    @dataclass
    class Params:
        pass

    def __init__(self, params: dict[str, Any], ctx: MethodContext):
        self.params = parse_dataclass(self.Params, params, f"method_params.{self.name}")
        self.ctx = ctx
        # methods that reject or relabel unannotated entries update this meter; it is reset per epoch
        self.fn_meter = FalseNegativeMeter(ctx.device)

    # --- hooks the training loop calls -------------------------------------------------------------
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

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, train_loader, prepare_batch) -> None:
        """Called after each training epoch, before validation (e.g. APL's pseudo-labelling round)."""

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation."""
        return model(images).logits

    def epoch_diagnostics(self) -> dict[str, float]:
        """Per-epoch diagnostics for the history (false-negative identification, thresholds...)."""
        return self.fn_meter.summary() if self.fn_meter.active else {}

    def state_dict(self) -> dict[str, Any]:
        """Cross-iteration state saved with the checkpoint (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


# the registry itself is pipeline.registry.METHODS (one module for methods, models and datasets)
register_method = METHODS.register


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, params: dict[str, Any], ctx: MethodContext) -> Method:
    return METHODS.get(name)(params, ctx)
