"""Models registered by name. Every model maps images to class logits **and** a class activation map.

``forward(x)`` returns :class:`pipeline.contracts.ModelOutput` with ``logits`` (B, C) and ``cam``
(B, C, h, w): the per-class spatial evidence whose global average gives the logits for CAM-head models
(IGNORE masks the image with it). ``parameter_groups(lr, head_lr_mult)`` returns optimizer groups (trunk,
head).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from pipeline.config import parse_dataclass
from pipeline.contracts import ModelOutput
from pipeline.errors import SpmlError
from pipeline.registry import MODELS


def cam_head_output(cam: torch.Tensor, cam_boost: float) -> ModelOutput:
    """Logits as the CAM's spatial mean (the ResNet_1x1 head: GAP and a 1x1 conv commute). ``cam_boost`` != 1
    multiplies positive CAM values before pooling (BoostLU, Kim et al. 2023); the CAM itself stays raw."""
    pooled = cam if cam_boost == 1.0 else torch.where(cam > 0, cam * cam_boost, cam)
    return ModelOutput(pooled.mean(dim=(2, 3)), cam)


# the registry itself is pipeline.registry.MODELS (one module for methods, models and datasets)
register_model = MODELS.register


def model_names() -> list[str]:
    return MODELS.names()


def parse_model_params(name: str, values: dict[str, Any] | None) -> dict[str, Any]:
    """``params.yaml: models.<name>`` checked against the model's ``Params`` dataclass (types, ranges, missing
    keys; see :func:`pipeline.config.parse_dataclass`); a model without one takes its block as given."""
    cls = MODELS.get(name)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise SpmlError(f"params models.{name} must be a mapping, got {values!r}")
    params_cls = getattr(cls, "Params", None)
    if params_cls is None:
        return dict(values)
    return dataclasses.asdict(parse_dataclass(params_cls, values, f"models.{name}"))


def weight_files(name: str, kwargs: dict[str, Any]) -> list[Path]:
    """Files a model built with ``kwargs`` loads weights from (a run's resume key hashes them), if its class
    says (``weights_file(weights)``); pinned downloads (ResNet-50's SHA-256) need not be listed."""
    resolve = getattr(MODELS.get(name), "weights_file", None)
    path = resolve(kwargs["weights"]) if resolve is not None and "weights" in kwargs else None
    return [] if path is None else [path]


def build_model(name: str, num_classes: int, **kwargs: Any) -> torch.nn.Module:
    cls = MODELS.get(name)
    try:
        return cls(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise SpmlError(f"bad params for model {name!r}: {exc}") from None
