"""LL-Ct, large-loss temporary correction (Kim et al. 2022): the largest unannotated losses of each batch
are trained as positives for that step only."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.methods import register_method
from pipeline.methods.large_loss import LargeLossMethod


@register_method("ll-ct")
class LargeLossTemporaryCorrection(LargeLossMethod):
    scheme = "temporary"

    @dataclass
    class Params:
        delta_percent: float  # Δ: the corrected share grows by Δ percent of B·C per epoch
