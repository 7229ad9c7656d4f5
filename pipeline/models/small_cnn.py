"""A small CAM network for the synthetic data: conv trunk, 1x1-conv class maps, global average pooling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from torch import nn

from pipeline import paths
from pipeline.config import Range
from pipeline.contracts import ModelOutput
from pipeline.errors import SpmlError
from pipeline.models import cam_head_output, register_model


def load_pretrained_trunk(path: Path, width: int) -> dict[str, torch.Tensor]:
    """The trunk state dict in a `pretrain` output, checked against this model's width (one-line errors)."""
    if not path.is_file():
        raise SpmlError(f"pretrained smallcnn trunk {path} does not exist; run `spml pretrain` (or `dvc repro`), "
                        "or set models.smallcnn.weights: none")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        trunk, saved_width = saved["trunk"], saved["width"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise SpmlError(f"pretrained smallcnn trunk {path} is not a `pretrain` output ({type(exc).__name__}); "
                        "rerun `spml pretrain`") from None
    if saved_width != width:
        raise SpmlError(f"pretrained smallcnn trunk {path} has width {saved_width}, models.smallcnn.width is "
                        f"{width}; rerun `spml pretrain` (it reads the same width)")
    return trunk


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register_model("smallcnn")
class SmallCNN(nn.Module):
    """Stride-8 trunk (64 px in, 8x8 maps out) and a 1x1-conv head with bias.

    The CAM is the raw 1x1-conv output A = W*F + b, and logits are its spatial mean, exactly the
    ResNet_1x1 head of the IGNORE code at a size that trains on a CPU in seconds per epoch.
    """

    @dataclass
    class Params:
        """``params.yaml: models.smallcnn`` (``cam_boost`` is set by a method, BoostLU, not by params)."""

        width: Annotated[int, Range(ge=1)]  # channels of the first block (the trunk widens to 6 * width)
        # none: random init (training from scratch) | pretrained: the `pretrain` stage's trunk (a disjoint
        # source task, pipeline/pretrain.py) | a path to such a trunk.pt
        weights: str

    def __init__(self, num_classes: int, width: int, weights: str, cam_boost: float = 1.0):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            _block(3, w, 2), _block(w, w, 1),
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 6 * w, 1),
        )
        self.head = nn.Conv2d(6 * w, num_classes, kernel_size=1, bias=True)
        # BoostLU (Kim et al. 2023): positive CAM values x alpha before pooling; 1.0 = plain CAM head
        self.cam_boost = cam_boost
        path = self.weights_file(weights)
        if path is not None:
            self.trunk.load_state_dict(load_pretrained_trunk(path, width))

    @staticmethod
    def weights_file(weights: str) -> Path | None:
        """The trunk file that ``weights`` names (None: random init); a run's resume key hashes it."""
        if weights == "none":
            return None
        if weights == "pretrained":
            return paths.pretrained_dir("smallcnn") / paths.TRUNK_FILE
        return Path(weights)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return cam_head_output(self.head(self.trunk(x)), self.cam_boost)

    def parameter_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        return [{"params": list(self.trunk.parameters()), "lr": lr},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult}]
