"""A tiny git copy of this repository: its own params at tiny sizes, run with git and the real ``dvc``.

What ``scripts/grid_timing.py`` times and what the tests that run DVC end to end build on (``tests/helpers.py``
and ``tests/conftest.py`` take these from here). Everything is hermetic: commits use a fixed identity from
environment variables (no global git config is needed or read), DVC's global/system config point into a
temporary folder, analytics are off, and this interpreter's ``dvc``/``spml`` come first on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]  # the checkout this module runs from

TINY_OVERRIDES = {
    "data": {"synthetic": {"num_train": 120, "num_test": 40, "image_size": 32, "seed": 3}},
    "train": {"default": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "image_size": 32}},
    "models": {"smallcnn": {"width": 8, "weights": "none"}},  # tiny_repo switches pretraining on
    "pretrain": {"smallcnn": {"num_images": 40, "image_size": 32, "epochs": 1, "batch_size": 16}},
}

_ISOLATED = Path(tempfile.gettempdir()) / f"spml-test-dvc-config-{os.getuid()}"


def tiny_params() -> dict:
    """The repository's params.yaml with tiny data and training sizes."""
    from pipeline.config import deep_merge

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_merge(params, TINY_OVERRIDES)


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


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


def tool_env() -> dict:
    """Environment for git/dvc/spml subprocesses: fixed git identity, isolated configs, no progress bars."""
    _ISOLATED.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPML_NO_PROGRESS="1", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="spml-test", GIT_AUTHOR_EMAIL="spml-test@example.invalid",
               GIT_COMMITTER_NAME="spml-test", GIT_COMMITTER_EMAIL="spml-test@example.invalid",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
               DVC_GLOBAL_CONFIG_DIR=str(_ISOLATED / "global"),
               DVC_SYSTEM_CONFIG_DIR=str(_ISOLATED / "system"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run(cwd: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a tool in ``cwd`` with :func:`tool_env` (plus ``env``); ``check``: fail with its output unless it
    exits 0."""
    result = subprocess.run(args, check=False, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True,
                            text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    """Run a command that must succeed; return stdout + stderr."""
    result = run(cwd, *args, env=env)
    return result.stdout + result.stderr


def git_commit_all(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "commit.gpgsign=false", "commit", "-qm", message)


def tiny_repo(dest: Path, methods=("an", "full"), seeds=(0,), epochs: int | None = None) -> Path:
    """A git repository at ``dest``: a copy of this one with tiny params, no dvc.lock, one commit."""
    repo = copy_repo(dest)
    params = tiny_params()
    params.update(datasets=["synthetic"], methods=list(methods), seeds=list(seeds))
    params["models"]["smallcnn"]["weights"] = "pretrained"  # the default: train cells start from `pretrain`
    if epochs is not None:
        params["train"]["default"]["epochs"] = epochs
    write_params(repo, params)
    (repo / "dvc.lock").unlink(missing_ok=True)
    sh(repo, "git", "init", "-q")
    git_commit_all(repo, "tiny")
    return repo
