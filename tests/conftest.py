"""Shared fixtures: a tiny synthetic workspace (params + generated, prepared and sampled data).

``tiny_workspace`` gives each test its own directory (cwd) holding a tiny ``params.yaml`` and the
``data/`` of a tiny synthetic dataset, built once per session and copied, so stage functions and the
CLI can run with their default relative paths.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

# quiet progress bars in tests; `make test` exports SPML_NO_PROGRESS empty when the caller has none, so an
# empty value counts as unset
if not os.environ.get("SPML_NO_PROGRESS"):
    os.environ["SPML_NO_PROGRESS"] = "1"

# the tiny sizes, params writer and repository copy are the tools' (scripts/grid_timing.py builds on them too)
from pipeline.tools.tiny_repo import REPO, TINY_OVERRIDES, copy_repo, tiny_params, write_params  # noqa: E402

__all__ = ["REPO", "TINY_OVERRIDES", "copy_repo", "make_method", "method_defaults", "tiny_params", "write_params"]


def method_defaults(name: str) -> dict:
    """params.yaml's ``method_params.<name>.default`` block (an ablation's: its method's): a method's parameters
    carry no code defaults."""
    from pipeline.run_config import block_owner

    block = yaml.safe_load((REPO / "params.yaml").read_text())["method_params"][block_owner(name)]
    return dict((block or {}).get("default") or {})


def make_method(name: str, overrides: dict, ctx):
    """``build_method`` with params.yaml's default block for ``name`` under ``overrides``."""
    from pipeline.methods import build_method

    return build_method(name, {**method_defaults(name), **overrides}, ctx)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A directory with params.yaml and data/ for the tiny synthetic dataset (download, prepare, sample)."""
    from stages import download, prepare, sample

    root = tmp_path_factory.mktemp("tiny-data")
    write_params(root, tiny_params())
    cwd = Path.cwd()
    os.chdir(root)
    try:
        download.run("synthetic")
        prepare.run("synthetic")
        sample.run("synthetic")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def tiny_workspace(tiny_data_dir, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the tiny workspace as the current directory."""
    shutil.copytree(tiny_data_dir, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """An empty working directory (cwd) holding only the tiny params.yaml."""
    work = tmp_path / "work"
    work.mkdir()
    write_params(work, tiny_params())
    monkeypatch.chdir(work)
    return work
