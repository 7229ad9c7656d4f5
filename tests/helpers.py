"""Helpers for tests that run git and the real `dvc` in temporary copies of the repository.

The tiny repository and the hermetic tool runner live in :mod:`pipeline.tools.tiny_repo` (scripts/grid_timing.py
uses them too); they are re-exported here for the tests.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from pipeline.tools.tiny_repo import git_commit_all, run, sh, tiny_repo, tool_env

__all__ = ["assert_same_tree", "git_commit_all", "run", "sh", "tiny_repo", "tool_env", "tree_files"]


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_tree(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same file names with byte-identical contents."""
    names = tree_files(a)
    assert names, f"{a} is empty"
    assert names == tree_files(b), f"{a} and {b} hold different files"
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs between {a} and {b}"
