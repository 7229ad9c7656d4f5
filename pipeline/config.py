"""``params.yaml``: loading, scoping, preset composition and typed validation.

Every value the pipeline reads lives in ``params.yaml``; the dataclasses that parse it carry no defaults
(tests/test_config.py checks that), so a missing key is an error naming it, never a silent second value.

Scoped sections (``train``, ``method_params.<method>`` and its ``original`` protocol) hold a ``default``
block and optional blocks keyed by a model name, a dataset name, or ``dataset/model``. They are merged in
that order, so the most specific wins::

    method_params:
      ignore:
        default: {cam_threshold: 0.5}
        resnet50: {cam_threshold: 0.4}     # any dataset, ResNet-50
        coco2014/q2l: {reg_weight: 0.1}    # COCO with Query2Label only

Presets are files in ``presets/`` that DVC's Hydra support composes over params.yaml before an experiment
(``dvc exp run -S +presets=NAME``), so DVC sees the grid a preset trains; :func:`compose_params` runs the
same composition for ``spml config --preset`` and the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
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
        params = yaml.load(text, Loader=strict_loader()) or {}
    except yaml.YAMLError as exc:
        raise SpmlError(f"params file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except DuplicateKey as exc:
        raise SpmlError(f"params file {path}: {exc}") from None
    if not isinstance(params, dict):
        raise SpmlError(f"params file {path} must hold a mapping at the top level")
    if "protocols" in params:  # the layout before each method's protocol moved into its own block
        raise SpmlError(f"params file {path}: `protocols` is gone; move protocols.original.<method> to "
                        "method_params.<method>.original (docs/protocols.md)")
    check_blocks(params, BLOCKS)
    return params


class DuplicateKey(Exception):
    """A key given twice in one YAML mapping (PyYAML would silently keep the last value)."""


@functools.cache
def strict_loader() -> type:
    """yaml.SafeLoader that refuses a key given twice in one mapping, naming the key and both lines.

    Keys merged in with ``<<: *anchor`` may be overridden (that is what merging is for); keys written out
    twice may not: which one wins is invisible in the file."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first != line:
                    raise DuplicateKey(f"key {key!r} is given twice in one block (lines {first} and {line}); "
                                       "YAML would keep the last silently: delete one")
            return super().construct_mapping(node, deep)

    return StrictLoader


# Blocks of params.yaml that must be mappings (or empty), as nested paths: "*" is any key. A list or a scalar
# where one of them belongs would otherwise reach the code as an AttributeError.
BLOCKS: dict[str, Any] = {
    "pretrain": {"*": None}, "data": {"*": None}, "split": None, "sample": None, "train": {"*": None},
    "runtime": None, "models": {"*": None}, "method_params": {"*": {"original": {"*": None}, "*": None}},
    "clip": {"*": {"*": None}},
}


def check_blocks(values: dict[str, Any], spec: dict[str, Any], where: str = "") -> None:
    """Refuse a block of ``spec`` that is neither a mapping nor empty, naming its path (``method_params.an``)."""
    for key, value in values.items():
        inner = spec.get(key, spec.get("*", ...)) if isinstance(key, str) else ...
        if inner is ... or value is None:
            continue
        path = f"{where}.{key}" if where else str(key)
        if not isinstance(value, dict):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise SpmlError(f"params {path} must be a block of keys (a mapping), got a {type(value).__name__}: "
                            f"{shown}; write it as `key: value` lines under {path}")
        if inner is not None:
            check_blocks(value, inner, path)


def compose_params(params_path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """params.yaml composed with Hydra ``overrides`` (e.g. ``["+presets=all-methods"]``) exactly as
    ``dvc exp run -S`` composes it (DVC's own function, with the repository's ``.dvc/config`` settings:
    config_dir ``.``, config_name ``params``), then loaded and checked like params.yaml."""
    import tempfile

    try:
        from dvc.utils.hydra import compose_and_dump
    except ImportError:
        raise SpmlError("composing presets needs dvc (pip install dvc); or pass a composed params file") from None
    path = Path(params_path).resolve()
    if not path.is_file():
        raise SpmlError(f"params file {params_path} does not exist; run from the repository root or pass --params")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(path.parent), None, path.stem, tmp, list(overrides or []))
        except Exception as exc:  # noqa: BLE001 - Hydra's errors (unknown preset, bad override) as one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpmlError(f"cannot compose {params_path} with {' '.join(overrides or [])}: {first}; "
                            f"presets: {', '.join(preset_names(path.parent))}") from None
        return load_params(out)


def preset_names(root: str | Path = ".") -> list[str]:
    """The presets in ``<root>/presets/`` (``dvc exp run -S +presets=NAME``)."""
    return sorted(p.stem for p in (Path(root) / "presets").glob("*.yaml"))


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


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric param, declared where the param is: ``lr: Annotated[float, Range(gt=0)]``.

    :func:`parse_dataclass` checks them (and refuses NaN and infinity for every float, bounded or not).
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def problem(self, value: float) -> str | None:
        """None if ``value`` is inside the bounds, else what it must be (``'> 0'``, ``'in [0, 1]'``)."""
        if (self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge) \
                or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le):
            return self.describe()
        return None

    def describe(self) -> str:
        low = f"> {self.gt}" if self.gt is not None else f">= {self.ge}" if self.ge is not None else None
        high = f"< {self.lt}" if self.lt is not None else f"<= {self.le}" if self.le is not None else None
        return " and ".join(part for part in (low, high) if part)


def _unwrap(annotation: Any) -> tuple[Any, list[Range]]:
    """``Annotated[T, Range(...)]`` -> (T, [Range(...)]); anything else -> (annotation, [])."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, [e for e in extras if isinstance(e, Range)]
    return annotation, []


def _check_type(value: Any, annotation: Any) -> bool:
    annotation, _ = _unwrap(annotation)
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


def _accepts_float(annotation: Any) -> bool:
    annotation, _ = _unwrap(annotation)
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_float(arg) for arg in typing.get_args(annotation))
    return False


def _float_from_text(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string (it wants ``1.0e-3``); take such text as the float it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _describe(annotation: Any) -> str:
    annotation, bounds = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        text = f"one of {', '.join(map(str, typing.get_args(annotation)))}"
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    elif annotation is type(None):
        text = "null"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return f"{text} {' and '.join(b.describe() for b in bounds)}" if bounds else text


def _check_value(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted (int -> float, float text -> float) and checked against type and bounds."""
    if _accepts_float(annotation) and not _check_type(value, annotation):
        value = _float_from_text(value)
    if not _check_type(value, annotation):
        raise SpmlError(f"params {name} must be {_describe(annotation)}, got {value!r}")
    if isinstance(value, float) or (_accepts_float(annotation) and isinstance(value, int)
                                    and not isinstance(value, bool)):
        value = float(value)
        if not math.isfinite(value):
            raise SpmlError(f"params {name} must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        raise SpmlError(f"params {name} must hold finite numbers, got {value!r}")
    base, bounds = _unwrap(annotation)
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # Optional[Annotated[...]]: its own bounds
        for arg in typing.get_args(base):
            if value is not None and _check_type(value, arg):
                bounds = bounds + _unwrap(arg)[1]
                break
    if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
        for bound in bounds:
            problem = bound.problem(value)
            if problem:
                raise SpmlError(f"params {name} must be {problem}, got {value!r}")
    return value


def parse_dataclass(cls: type, values: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``values`` with one-line errors: unknown keys, missing keys (every field
    without a default must be given), wrong types, out-of-range values (``Annotated[..., Range(...)]``)."""
    if not isinstance(values, dict):
        raise SpmlError(f"params {where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SpmlError(f"unknown params {', '.join(f'{where}.{k}' for k in unknown)}; valid: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        names = ", ".join(f"{where}.{k}" for k in missing)
        raise SpmlError(f"params {names} {'is' if len(missing) == 1 else 'are'} missing; "
                        f"add {'it' if len(missing) == 1 else 'them'} to params.yaml")
    hints = typing.get_type_hints(cls, include_extras=True)
    converted = {name: _check_value(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**converted)


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of a resolved run config (``RunConfig.to_dict()``) as JSON: recorded in a run's metrics.json,
    recomputed by ``aggregate`` from params.yaml to prove the run belongs to its cell."""
    import json

    text = json.dumps(json.loads(json.dumps(config, default=str)), sort_keys=True)  # tuples and lists alike
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 31-bit seed derived from the run's axes, e.g. derive_seed('voc2012', 'ignore', 0)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
