"""Shared fixtures: a tiny synthetic workspace (params + generated, prepared and sampled data).

``tiny_workspace`` gives each test its own directory (cwd) holding a tiny ``params.yaml`` and the
``data/`` of a tiny synthetic dataset, built once per session and copied, so stage functions and the
CLI can run with their default relative paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

# quiet progress bars in tests; `make test` exports SPML_NO_PROGRESS empty when the caller has none, so an
# empty value counts as unset
if not os.environ.get("SPML_NO_PROGRESS"):
    os.environ["SPML_NO_PROGRESS"] = "1"

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "data": {"synthetic": {"num_train": 120, "num_test": 40, "image_size": 32, "seed": 3}},
    "train": {"default": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "image_size": 32}},
    "models": {"smallcnn": {"width": 8, "weights": "none"}},  # tests/helpers.tiny_repo switches pretraining on
    "pretrain": {"smallcnn": {"num_images": 40, "image_size": 32, "epochs": 1, "batch_size": 16}},
}


def tiny_params() -> dict:
    """The repository's params.yaml with tiny data and training sizes."""
    from pipeline.config import deep_merge

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_merge(params, TINY_OVERRIDES)


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path



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


def copy_repo(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files (a clean-clone stand-in)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
