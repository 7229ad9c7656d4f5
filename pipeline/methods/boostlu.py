"""BoostLU (Kim et al. 2023) combined with a large-loss scheme (LL-R by default).

BoostLU scales the positive values of the class activation map by α before global average pooling,
at training *and* evaluation time: z = GAP(where(CAM > 0, α·CAM, CAM)). It is computed here from the
model's CAM, so any CAM-head model works unchanged (its logits must be the spatial mean of its CAM,
checked once, loosely enough for bf16/fp16 autocast); with α = 1 it is the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import SpmlError
from pipeline.methods import register_method
from pipeline.methods.large_loss import LargeLossMethod, Scheme
from pipeline.methods.losses import boostlu_logits


@register_method("boostlu")
class BoostLU(LargeLossMethod):
    @dataclass
    class Params:
        alpha: float  # α: positive CAM values are multiplied by α before pooling
        delta_percent: float  # Δ of the large-loss scheme (BoostLU code: R 0.5, Ct 0.2, Cp 0.1)
        scheme: Scheme  # reject = LL-R, temporary = LL-Ct, permanent = LL-Cp

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if self.params.alpha <= 0:
            raise SpmlError(f"method_params.boostlu.alpha must be > 0, got {self.params.alpha}")
        self._checked = False

    def logits(self, model, images):
        out = model(images)
        if not self._checked:
            if not torch.allclose(out.logits.float(), out.cam.float().mean(dim=(2, 3)), rtol=1e-2, atol=1e-2):
                raise SpmlError(f"method boostlu needs a CAM-head model whose logits are the spatial mean of its "
                                f"CAM; model {self.ctx.model!r} is not (use smallcnn or resnet50, cam_boost 1)")
            self._checked = True
        return boostlu_logits(out.cam, self.params.alpha)
