"""Params that no cell of the grid reads: a value set where a more specific block always overrides it.

Scoped sections merge ``default``, ``<model>``, ``<dataset>``, ``<dataset>/<model>`` and, under ``protocol:
original``, the method's ``original`` block on top (:mod:`pipeline.run_config`). A key in a block that applies to
some cell, but that a later layer sets again for every such cell, never takes effect: a preset that sets
``train.default.lr`` under ``protocol: original``, where every method's own protocol sets ``lr``, changes nothing,
silently. :func:`unread_params` finds those keys and what overrides each; ``spml config`` and ``spml train`` (so
``dvc repro``) print one warning line per key.

Blocks that apply to no cell of this grid (``train.coco2014`` in a synthetic grid, ``method_params.ignore.q2l``
under smallcnn) are not reported: they are settings for other grids, not dead ones. Nor, by default, are the
repository's own values: ``train.default.lr`` is the unified recipe's, overridden under ``protocol: original`` by
design. What is reported is what was *changed* (a preset, ``-S``, an edit) relative to a base: the committed
params.yaml for ``spml train`` (so ``dvc exp run``, which composes its params into the workspace file), the
uncomposed file for ``spml config --preset``. ``spml config --all-unread`` lists every unread key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SpmlError

# the train values the timeline rule reads from the reference protocol (run_config.schedule_reference)
REFERENCE_KEYS = ("epochs", "batch_size", "drop_last")


@dataclass(frozen=True)
class Unread:
    key: str  # dotted params path, e.g. "train.default.lr"
    overridden_by: tuple[str, ...]  # the blocks that set it again, e.g. ("method_params.an.original.default", ...)
    reason: str = ""  # instead of the overriders, when something else makes it unread

    def message(self) -> str:
        if self.reason:
            return f"warning: params {self.key} is read by no cell of this grid: {self.reason}"
        shown = ", ".join(self.overridden_by[:4]) + (f" and {len(self.overridden_by) - 4} more"
                                                      if len(self.overridden_by) > 4 else "")
        return (f"warning: params {self.key} is read by no cell of this grid: {shown} "
                f"{'sets' if len(self.overridden_by) == 1 else 'set'} it for every cell; delete it or set it there")


def _scopes(dataset: str, model: str) -> list[str]:
    return ["default", model, dataset, f"{dataset}/{model}"]


def _grid(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    datasets = params.get("datasets") or []
    methods = [m for key in ("methods", "ablations", "vl_methods") for m in (params.get(key) or [])]
    if not isinstance(datasets, list) or not all(isinstance(m, str) for m in methods + datasets):
        raise SpmlError("params datasets, methods, ablations and vl_methods must be lists of names")
    return datasets, methods


def lookup(params: dict[str, Any], key: str) -> Any:
    """The value at a dotted params path whose parts may hold dots or slashes themselves (``coco2014/q2l``);
    one sentinel object where there is none."""
    node: Any = params
    parts = key.split(".")
    while parts:
        if not isinstance(node, dict):
            return _MISSING
        for n in range(len(parts), 0, -1):  # the longest prefix that is a key ("ll-r", "cub/resnet50"...)
            name = ".".join(parts[:n])
            if name in node:
                node, parts = node[name], parts[n:]
                break
        else:
            return _MISSING
    return node


_MISSING = object()


def _owners(methods: list[str], ablations: bool) -> dict[str, str]:
    """Whose block each method reads. A method with a module of its own reads its own block, known without
    importing anything; an ablation (no module of its own) needs the registry's scan of every method module,
    which a training cell must not do (it would import other methods' code), so only ``ablations=True`` asks."""
    import importlib.util

    from pipeline.run_config import block_owner

    owners = {}
    for method in methods:
        try:
            own = importlib.util.find_spec(f"pipeline.methods.{method}") is not None
        except (ImportError, ValueError):
            own = False
        if own:
            owners[method] = method
        elif ablations:
            owners[method] = block_owner(method)
    return owners


def unread_params(params: dict[str, Any], base: dict[str, Any] | None = None,
                  ablations: bool = True) -> list[Unread]:
    """Every key of ``train``, ``method_params.<m>`` and ``method_params.<m>.original`` that a block applying to a
    cell of the grid sets, but that no cell reads because a more specific layer sets it for each of them. With
    ``base``, only the keys whose value differs from (or is absent in) ``base``: what a preset or an edit set."""
    from pipeline.config import scoped

    datasets, methods = _grid(params)
    owners = _owners(methods, ablations)  # without `ablations`, an ablation's cells are left out: they read their
    # method's blocks, which that method's own cells read in every grid that trains it
    train = params.get("train") or {}
    protocol = params.get("protocol")
    timeline = params.get("timeline") or {}
    read: set[str] = set()
    overriders: dict[str, set[str]] = {}
    applies: set[str] = set()  # keys of blocks that some cell merges (for the reference: its keys only)

    def layers(section: dict, prefix: str, scopes: list[str]) -> list[tuple[str, dict]]:
        return [(f"{prefix}.{s}", section[s]) for s in scopes if isinstance(section.get(s), dict)]

    def walk(stack: list[tuple[str, dict]], keys: set[str] | None = None) -> None:
        """A cell merges ``stack`` in order: each key is read from its last layer, overridden in the others."""
        for i, (where, block) in enumerate(stack):
            for key in block if keys is None else set(block) & keys:
                applies.add(f"{where}.{key}")
                later = [w for w, b in stack[i + 1:] if key in b]
                if later:
                    overriders.setdefault(f"{where}.{key}", set()).add(later[-1])
                else:
                    read.add(f"{where}.{key}")

    for dataset in datasets:
        model = scoped(train, dataset).get("model")
        if not isinstance(model, str):
            continue  # resolve_run_config names the problem
        for method, owner in owners.items():
            block = (params.get("method_params") or {}).get(owner) or {}
            original = block.get("original") if isinstance(block.get("original"), dict) else None
            stack = layers(train, "train", _scopes(dataset, model))
            if protocol == "original" and original is not None:
                stack += layers(original, f"method_params.{owner}.original", _scopes(dataset, model))
                search = scoped(original, dataset, model).get("search")
                if isinstance(search, list):  # every point sets its axes' keys: a search overrides them all
                    stack.append((f"method_params.{owner}.original (its search)",
                                  {k: None for axis in search if isinstance(axis, dict) for k in axis}))
            walk(stack)
            walk(layers(block, f"method_params.{owner}", _scopes(dataset, model)))
            if original is not None:  # the timeline's reference reads these on the dataset the run stands for
                stand_in = timeline.get(dataset)
                ref = stand_in.get("reference", dataset) if isinstance(stand_in, dict) else dataset
                ref_model = scoped(train, ref).get("model", model)
                walk(layers(train, "train", _scopes(ref, ref_model))
                     + layers(original, f"method_params.{owner}.original", _scopes(ref, ref_model)),
                     set(REFERENCE_KEYS))
    found = [Unread(key, tuple(sorted(overriders[key]))) for key in sorted(overriders)
             if key not in read and key in applies
             and (base is None or lookup(base, key) is _MISSING or lookup(base, key) != lookup(params, key))]
    # a block under an ablation's own name: the ablation reads its method's block, so nothing reads this one
    for method, owner in owners.items():
        if owner != method and method in (params.get("method_params") or {}) \
                and (base is None or method not in (base.get("method_params") or {})):
            found.append(Unread(f"method_params.{method}", (), f"the ablation {method} reads method_params.{owner}; "
                                                               "delete this block and set the values there"))
    return found


def committed_params(params_path) -> dict[str, Any] | None:
    """params.yaml as committed (``git show HEAD:<file>``), the base the changes are measured against; None outside
    a git repository or for a file git does not track (``spml train`` then warns about nothing, ``spml config``
    about every unread key)."""
    import subprocess

    import yaml

    path = Path(params_path).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        shown = subprocess.run(["git", "show", f"HEAD:{path.relative_to(Path(top).resolve()).as_posix()}"],
                               cwd=top, capture_output=True, text=True, check=True).stdout
        loaded = yaml.safe_load(shown)
    except (OSError, ValueError, subprocess.CalledProcessError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def without_preset_keys(base: dict[str, Any], root: Path, names: list[str]) -> dict[str, Any]:
    """``base`` with every leaf key that presets/NAME.yaml (and the presets it composes) set removed, so a preset
    key that no cell reads is reported even when its value equals params.yaml's."""
    import copy

    import yaml

    out = copy.deepcopy(base)

    def drop(node: dict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                drop(node[key], value)
            else:
                node.pop(key, None)

    def visit(name: str, seen: set[str]) -> None:
        if name in seen:
            return
        seen.add(name)
        path = Path(root) / "presets" / f"{name}.yaml"
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
        if not isinstance(loaded, dict):
            return
        for included in loaded.pop("defaults", None) or []:
            if isinstance(included, str) and included != "_self_":
                visit(included, seen)
        drop(out, loaded)

    seen: set[str] = set()
    for name in names:
        visit(name, seen)
    return out


def warn_unread(params: dict[str, Any], echo, base: dict[str, Any] | None = None,
                ablations: bool = True) -> list[Unread]:
    """Print one warning line per unread key (changed relative to ``base``) with ``echo``."""
    found = unread_params(params, base, ablations)
    for item in found:
        echo(item.message())
    return found
