"""LL-Cp, large-loss permanent correction (Kim et al. 2022, the intended fixed-k version of the BoostLU code):
from epoch 2, the ceil(B·C·Δ/100) largest unannotated losses of each batch are corrected to positive and
stay positive for the rest of training (method state keyed by the training row)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.methods import register_method
from pipeline.methods.large_loss import LargeLossMethod


@register_method("ll-cp")
class LargeLossPermanentCorrection(LargeLossMethod):
    scheme = "permanent"

    @dataclass
    class Params:
        delta_percent: float  # Δ: a fixed Δ percent of B·C per batch, from epoch 2
