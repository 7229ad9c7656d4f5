"""Helpers for tests that run git and the real `dvc` in temporary copies of the repository.

Everything is hermetic: commits use a fixed identity from environment variables (no global git config is
needed or read), DVC's global/system config and site cache point into the test's temp area, analytics are
off, and the venv's `dvc`/`spml` come first on PATH.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import copy_repo, tiny_params, write_params

_ISOLATED = Path(tempfile.gettempdir()) / f"spml-test-dvc-config-{os.getuid()}"


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
    """Run a tool in ``cwd`` with :func:`tool_env` (plus ``env``)."""
    result = subprocess.run(args, check=False, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True,
                            text=True)
    if check:
        assert result.returncode == 0, \
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
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


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_tree(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same file names with byte-identical contents."""
    names = tree_files(a)
    assert names, f"{a} is empty"
    assert names == tree_files(b), f"{a} and {b} hold different files"
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs between {a} and {b}"
