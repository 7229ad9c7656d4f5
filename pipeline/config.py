"""``params.yaml``: loading, scoping, presets and typed validation.

Scoped sections (``train``, ``models.<name>``, ``method_params.<method>``) hold a ``default`` block and
optional blocks keyed by a model name, a dataset name, or ``dataset/model``. They are merged in that
order, so the most specific wins::

    method_params:
      ignore:
        default: {cam_threshold: 0.5}
        resnet50: {cam_threshold: 0.4}     # any dataset, ResNet-50
        coco2014/q2l: {reg_weight: 0.1}    # COCO with Query2Label only

``preset: NAME`` deep-merges ``presets.NAME`` (same shape as the top level) over the file before
anything is read, e.g. ``dvc exp run -S preset=paper-resnet50``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.errors import SpmlError

DEFAULT_PARAMS = Path("params.yaml")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml and apply the active preset."""
    import yaml  # here, not at module level: methods and models import this module on machines without PyYAML

    path = Path(path)
    if not path.exists():
        raise SpmlError(f"params file {path} does not exist; run from the repository root or pass --params")
    if path.is_dir():
        raise SpmlError(f"params file {path} is a folder; pass the params.yaml file itself")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpmlError(f"params file {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                        "pass a readable YAML file") from None
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpmlError(f"params file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise SpmlError(f"params file {path} must hold a mapping at the top level")
    preset = params.get("preset") or "none"
    if preset != "none":
        presets = params.get("presets") or {}
        if preset not in presets:
            raise SpmlError(f"unknown preset {preset!r}; valid presets: none, {', '.join(sorted(presets))}")
        merged = deep_merge(params, presets[preset])
        # dvc.yaml's matrix reads the grid lists from params.yaml as written, not merged: a preset that
        # sets a different grid would train one grid and aggregate another.
        for key in GRID_KEYS:
            if merged.get(key) != params.get(key):
                raise SpmlError(f"preset {preset!r} sets {key}={merged.get(key)} but params.yaml has "
                                f"{key}={params.get(key)} (DVC's grid); run `spml exp {preset}`, which sets both")
        params = merged
    return params


GRID_KEYS = ("datasets", "methods", "seeds")


def preset_grid(params: dict[str, Any], preset: str) -> dict[str, list]:
    """The grid (datasets, methods, seeds) a preset runs: its own lists, else the top-level ones."""
    presets = params.get("presets") or {}
    if preset not in presets:
        raise SpmlError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(presets))}")
    return {key: presets[preset].get(key, params.get(key)) for key in GRID_KEYS}


def scoped(section: dict | None, dataset: str, model: str | None = None) -> dict[str, Any]:
    """Merge ``default``, ``<model>``, ``<dataset>`` and ``<dataset>/<model>`` blocks of a section."""
    section = section or {}
    keys = ["default"] + ([model] if model else []) + [dataset] + ([f"{dataset}/{model}"] if model else [])
    merged: dict[str, Any] = {}
    for key in keys:
        block = section.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise SpmlError(f"params block {key!r} must be a mapping, got {block!r}")
        merged = deep_merge(merged, block)
    return merged


def _check_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and (not args or all(_check_type(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    return isinstance(value, annotation)


def parse_dataclass(cls: type, values: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types with one line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SpmlError(f"unknown params {', '.join(f'{where}.{k}' for k in unknown)}; valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _check_type(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]))
            raise SpmlError(f"params {where}.{name} must be {expected}, got {value!r}")
    converted = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return cls(**converted)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed derived from the run's axes, e.g. derive_seed('voc2012', 'ignore', 0)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
