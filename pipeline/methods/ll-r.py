"""LL-R, large-loss rejection (Kim et al. 2022): the largest unannotated losses of each batch are set to 0."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.methods import register_method
from pipeline.methods.large_loss import LargeLossMethod


@register_method("ll-r")
class LargeLossRejection(LargeLossMethod):
    scheme = "reject"

    @dataclass
    class Params:
        delta_percent: float  # Δ: the rejected share grows by Δ percent of B·C per epoch
