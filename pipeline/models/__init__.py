"""Models registered by name. Every model maps images to class logits **and** a class activation map.

``forward(x)`` returns :class:`ModelOutput` with ``logits`` (B, C) and ``cam`` (B, C, h, w): the
per-class spatial evidence whose global average gives the logits for CAM-head models (IGNORE masks the
image with it). ``parameter_groups(lr, head_lr_mult)`` returns optimizer groups (trunk, head).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, NamedTuple

import torch

from pipeline.errors import SpmlError, unknown_name


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    cam: torch.Tensor


_REGISTRY: dict[str, Any] = {}


def register_model(name: str):
    def decorator(cls):
        cls.model_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def model_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **kwargs: Any) -> torch.nn.Module:
    _discover()
    if name not in _REGISTRY:
        raise unknown_name("model", name, list(_REGISTRY))
    try:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise SpmlError(f"bad params for model {name!r}: {exc}") from None
