"""The ground floor: the records that data, models, methods and the training loop hand each other.

This module imports nothing of the project (only the standard library and torch), so any layer may import it
and it can never pull a layer in behind it; ``pyproject.toml``'s import-linter contracts check that, and the
rest of the layering (``tests/test_layers.py``).

Who makes and who reads each record:

* :class:`ModelOutput`: a model's ``forward``; read by the methods (logits, CAM, label embeddings).
* :class:`Batch`: made by the loop's input pipeline (``pipeline.data.Normalizer.batch``); read by a method.
* :class:`HiddenLabels`: made by the same pipeline (``Normalizer.hidden``); read only by the loop's scorer
  (``pipeline.hidden_scoring``), never handed to a method.
* :class:`StepOutput`: returned by a method's training step; the loop scores its report fields against the
  :class:`HiddenLabels` and logs the rest.
* :class:`MethodContext`: what the loop tells a method about the run when it builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class _LogitsCam(NamedTuple):
    logits: torch.Tensor
    cam: torch.Tensor


class ModelOutput(_LogitsCam):
    """``(logits, cam)``, plus an optional ``embeddings`` attribute.

    Still a 2-tuple (``logits, cam = model(x)`` keeps working). ``embeddings`` (B, C, d) holds
    label-wise embeddings for models that have them (Query2Label's decoder outputs, or their
    L2-normalised projection when the model was built with a projector); None otherwise.
    """

    def __new__(cls, logits: torch.Tensor, cam: torch.Tensor, embeddings: torch.Tensor | None = None):
        self = super().__new__(cls, logits, cam)
        self.embeddings = embeddings
        return self


@dataclass
class Batch:
    """One training batch as a method sees it, already on the device and normalised.

    No hidden ground truth here, by design: the full labels and instance maps of the batch stay with the
    training loop (:class:`HiddenLabels`)."""

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
class HiddenLabels:
    """The ground truth of one batch that a method must not see: only the training loop and the bench hold it."""

    full: torch.Tensor  # (B, C) float {0, 1}: the hidden full labels
    instances: torch.Tensor | None = None  # (B, H, W) uint8 instance map of the weak view (synthetic data)
    instance_classes: torch.Tensor | None = None  # (B, K) long class of instance k+1, -1 padding


@dataclass
class StepOutput:
    """The loss of one step, and what the method did, for the history.

    Only ``loss`` is required. The optional report fields are scored by the training loop against the
    hidden labels (``pipeline.hidden_scoring.score_step``), so a method can be diagnosed without seeing
    them; each field's history columns are named below. All are detached, on the batch's device."""

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
