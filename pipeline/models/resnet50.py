"""ResNet-50 with a 1x1-conv class-map head (the IGNORE / BoostLU "ResNet_1x1" model).

Trunk: torchvision ResNet-50 up to layer4 (stride 32; 2048 x 14 x 14 at 448 px, post-ReLU). Head:
``Conv2d(2048, C, 1, bias=True)`` with PyTorch's default init. The CAM is the raw head output
A = W*F + b (signed, no ReLU); the logits are its global average (which equals GAP followed by a linear
layer, because the two commute). ``cam_boost`` != 1 multiplies positive CAM values before pooling
(BoostLU, Kim et al. 2023); the default 1.0 is the plain head IGNORE uses.

``layers`` and ``width_per_group`` exist so tests can build a tiny trunk; the defaults are ResNet-50.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from pipeline.contracts import ModelOutput
from pipeline.models import cam_head_output, register_model
from pipeline.models.weights import RESNET50_IMAGENET1K_V1_SHA256, load_trunk_weights, resolve_weights

RESNET50_LAYERS = (3, 4, 6, 3)


def build_resnet_trunk(layers=RESNET50_LAYERS, width_per_group: int = 64, norm_layer=None,
                       weights: str | None = "none", weights_sha256: str = RESNET50_IMAGENET1K_V1_SHA256,
                       what: str = "resnet50") -> ResNet:
    """A torchvision ResNet (Bottleneck) whose avgpool and fc are removed; load ImageNet weights on request."""
    trunk = ResNet(Bottleneck, list(layers), width_per_group=width_per_group, norm_layer=norm_layer)
    load_trunk_weights(trunk, resolve_weights(weights, weights_sha256), what)
    trunk.avgpool = nn.Identity()
    trunk.fc = nn.Identity()
    return trunk


def trunk_features(trunk: ResNet, x: torch.Tensor) -> torch.Tensor:
    """conv1 ... layer4: (B, 3, H, W) -> (B, 2048, H/32, W/32)."""
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    return trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))


@register_model("resnet50")
class ResNet50CAM(nn.Module):
    def __init__(self, num_classes: int, weights: str | None = "none",
                 weights_sha256: str = RESNET50_IMAGENET1K_V1_SHA256, cam_boost: float = 1.0,
                 layers: list[int] | tuple[int, ...] = RESNET50_LAYERS, width_per_group: int = 64):
        super().__init__()
        self.trunk = build_resnet_trunk(layers, width_per_group, None, weights, weights_sha256, "resnet50")
        self.head = nn.Conv2d(2048, num_classes, kernel_size=1, bias=True)
        self.cam_boost = cam_boost

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return cam_head_output(self.head(trunk_features(self.trunk, x)), self.cam_boost)

    def parameter_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        return [{"params": [p for p in self.trunk.parameters() if p.requires_grad], "lr": lr},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult}]
