"""One timeline rule for every schedule: a method's epoch and step quantities follow training progress.

A method's published schedules (IGNORE's warm-up epochs and per-step EMA decay, LL's Δ per epoch, APL's W and
quota epochs, Xie et al.'s per-step weight EMA and patience...) were set for its authors' protocol: their
epoch count E_ref and, on their dataset, S_ref steps per epoch. A run of E epochs of S steps (the embedded
benchmark's 6 short epochs, or a unified protocol on a real dataset) keeps each schedule at the same *fraction
of training*:

    epochs      a count or index of epochs          x_run = round(x_ref * E / E_ref)      (halves up)
    per_epoch   an amount added every epoch         x_run = x_ref * E_ref / E
    step_decay  an EMA decay applied every step     λ_run = λ_ref ** (E_ref S_ref / (E S))
    progress    already a function of epoch / E     unchanged

so a warm-up of 3 of IGNORE's 25 epochs is 1 of 6, LL's rejection reaches the share at the last epoch it
reaches on its 10, and an EMA's horizon spans the same share of all steps. Under the method's own protocol on
its own dataset E = E_ref and S = S_ref, and the rule is the identity: the paper's values run as published.

The reference: ``method_params.<method>.original`` (its epochs, batch size and drop_last), on the run's dataset,
or for an embedded set on the real dataset it stands for (params ``timeline.<dataset>``: VOC for ``synthetic``,
CUB for ``synthetic-dense``, with that dataset's training-image count). A method without an ``original`` block
has no reference, and its values run as written.

Each method declares which of its params are schedules and in which unit (``Method.schedules``); the loop's own
(``weight_ema``, the patience of ``early_stop: patience``) are :func:`pipeline.run_config.train_schedules`. The
rule is applied once, by :func:`pipeline.run_config.apply_timeline`, and tests/test_timeline.py checks that every
declared param passes through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import SpmlError

Unit = Literal["epochs", "per_epoch", "step_decay", "progress"]
UNITS: tuple[str, ...] = ("epochs", "per_epoch", "step_decay", "progress")


@dataclass(frozen=True)
class Reference:
    """The protocol a method's schedules were published for (from params, before the run's data is read)."""

    source: str  # where it comes from, for config.json: "method_params.ignore.original on voc2012" or "none: ..."
    epochs: int | None  # None: no reference, the schedules run as written
    batch_size: int | None
    drop_last: bool
    train_images: int | None  # the reference dataset's training images; None: the run's own training set


@dataclass(frozen=True)
class Timeline:
    """The run's and its reference's length; :meth:`map` applies the rule to one value."""

    epochs: int
    steps_per_epoch: int
    reference_epochs: int
    reference_steps_per_epoch: int
    source: str

    @property
    def epoch_scale(self) -> float:
        """Run epochs per reference epoch (E / E_ref)."""
        return self.epochs / self.reference_epochs

    @property
    def step_scale(self) -> float:
        """Run steps per reference step over the whole training (E S / (E_ref S_ref))."""
        return (self.epochs * self.steps_per_epoch) / (self.reference_epochs * self.reference_steps_per_epoch)

    @property
    def identity(self) -> bool:
        return self.epochs == self.reference_epochs and self.steps_per_epoch == self.reference_steps_per_epoch

    def map(self, value: Any, unit: str, where: str) -> Any:
        if unit not in UNITS:
            raise SpmlError(f"{where}: unknown schedule unit {unit!r}; use one of {', '.join(UNITS)}")
        if value is None or unit == "progress" or self.identity:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpmlError(f"{where} is a schedule in {unit}; it must be a number, got {value!r}")
        if unit == "epochs":
            scaled = math.floor(value * self.epoch_scale + 0.5)
            return scaled if isinstance(value, int) else float(scaled)
        if unit == "per_epoch":
            return value / self.epoch_scale
        if not 0 < value < 1:
            raise SpmlError(f"{where} is an EMA decay per step; it must be in (0, 1), got {value!r}")
        return value ** (1.0 / self.step_scale)

    def apply(self, values: dict[str, Any], schedules: dict[str, str], where: str) -> dict[str, Any]:
        """``values`` with every key of ``schedules`` mapped by the rule (keys absent from ``values`` are
        left for the params parser to name)."""
        out = dict(values)
        for key, unit in schedules.items():
            if key in out:
                out[key] = self.map(out[key], unit, f"{where}.{key}")
        return out

    def describe(self) -> dict[str, Any]:
        return {"reference": self.source, "reference_epochs": self.reference_epochs,
                "reference_steps_per_epoch": self.reference_steps_per_epoch, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch}


def steps_per_epoch(images: int, batch_size: int, drop_last: bool) -> int:
    return images // batch_size if drop_last else -(-images // batch_size)


def timeline_for(reference: Reference, epochs: int, steps: int, train_images: int) -> Timeline:
    """The run's timeline: E epochs of ``steps`` steps, against ``reference`` (the run itself when it has none)."""
    if reference.epochs is None or reference.batch_size is None:
        return Timeline(epochs, steps, epochs, steps, reference.source)
    images = reference.train_images if reference.train_images is not None else train_images
    return Timeline(epochs, steps, reference.epochs, steps_per_epoch(images, reference.batch_size, reference.drop_last),
                    reference.source)
