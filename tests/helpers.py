"""Helpers for tests that run git and the real `dvc` in temporary copies of the repository.

The tiny repository and the hermetic tool runner live in :mod:`pipeline.tools.tiny_repo` (scripts/grid_timing.py
uses them too); they are re-exported here for the tests.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from pipeline.tools.tiny_repo import git_commit_all, run, sh, tiny_repo, tool_env

__all__ = ["assert_one_line_error", "assert_same_tree", "git_commit_all", "run", "set_params", "sh", "tiny_repo",
           "tool_env", "tree_files"]


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_tree(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same file names with byte-identical contents."""
    names = tree_files(a)
    assert names, f"{a} is empty"
    assert names == tree_files(b), f"{a} and {b} hold different files"
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs between {a} and {b}"


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line holding every fragment; returns the output as one line."""
    text = " ".join(result.output.split())  # rich may wrap a long line; the message is one line
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    assert result.output.count("error:") == 1, result.output
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return text


def set_params(workspace: Path, **values) -> dict:
    """Write tiny params with ``values`` set in the block each key belongs to (``runtime`` or ``train``)."""
    from pipeline.config import deep_merge
    from pipeline.tools.settings import params_overlay
    from pipeline.tools.tiny_repo import tiny_params, write_params

    params = deep_merge(tiny_params(), params_overlay(values))
    write_params(workspace, params)
    return params
