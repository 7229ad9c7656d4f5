"""Where the settings a tool's option replaces live in params.yaml, and the one place a tool reads or sets them.

An option is named after its params key (``--num-workers``: ``runtime.num_workers``, ``--image-size``:
``train.image_size``), so a user can map each to its key. Two blocks hold them: ``runtime`` (how this machine
runs a cell, :class:`pipeline.run_config.RuntimeConfig`; no cell tracks it) and ``train`` (scoped by dataset and
model). :func:`setting`, :func:`replace_settings` and :func:`params_overlay` are the only tool code that says
which block a key is in. Imports nothing heavy: the CLI's help texts are built from it before torch is imported
(so :data:`RUNTIME_KEYS` is spelled out here; a test holds it to ``RuntimeConfig``'s fields).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.run_config import RunConfig

RUNTIME_KEYS = frozenset({"device", "num_workers", "threads", "host_allocator", "host_malloc_cache", "deterministic",
                          "channels_last", "cudnn_benchmark", "compile", "max_loss"})


def params_key(key: str) -> str:
    """The params key a setting is read from, as messages and help texts name it, e.g. ``runtime.threads``."""
    return f"{'runtime' if key in RUNTIME_KEYS else 'train'}.{key}"


def option_name(key: str) -> str:
    """The command-line option that replaces params ``key``: ``num_workers`` -> ``--num-workers``."""
    return "--" + key.replace("_", "-")


def setting(run: RunConfig, key: str) -> Any:
    """A run's resolved value of a setting (:func:`params_key` says where params.yaml holds it)."""
    return getattr(run.runtime if key in RUNTIME_KEYS else run.train, key)


def replace_settings(run: RunConfig, settings: dict[str, Any]) -> None:
    """Replace settings of a resolved run, each in the block its key belongs to."""
    run.train = dataclasses.replace(run.train, **{k: v for k, v in settings.items() if k not in RUNTIME_KEYS})
    run.runtime = dataclasses.replace(run.runtime, **{k: v for k, v in settings.items() if k in RUNTIME_KEYS})


def params_overlay(settings: dict[str, Any]) -> dict[str, Any]:
    """A params.yaml overlay that sets ``settings`` (by key) for every cell, to deep-merge over a params file."""
    overlay: dict[str, Any] = {}
    for key, value in settings.items():
        if key in RUNTIME_KEYS:
            overlay.setdefault("runtime", {})[key] = value
        else:
            overlay.setdefault("train", {}).setdefault("default", {})[key] = value
    return overlay
