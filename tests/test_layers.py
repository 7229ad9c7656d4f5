"""The import layering, declared once in pyproject.toml (``[tool.importlinter]``) and checked by import-linter.

The repository's code must keep every contract; a temporary copy with one wrong-way import per contract must
break each of them, so a contract that could never fail (a misspelt module, a layer that matches nothing) is
caught here too.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO


def contract_names() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return [contract["name"] for contract in config["contracts"]]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (its own pyproject.toml), without a cache in the tree."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        exe = shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test dependencies (pip install -e '.[test]')"
    env = dict(os.environ, PYTHONPATH=str(root))  # the packages under root, not an installed copy
    return subprocess.run([str(exe), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          check=False, timeout=300)


def verdicts(output: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from lint-imports' report (it wraps long names over lines)."""
    flat = " ".join(output.split())
    return {name: found.group(1) for name in contract_names()
            if (found := re.search(re.escape(name) + r" (KEPT|BROKEN)", flat))}


def test_the_repository_keeps_every_import_contract():
    result = lint_imports(REPO)
    names = contract_names()
    assert len(names) >= 5 and len(set(names)) == len(names)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert verdicts(result.stdout) == dict.fromkeys(names, "KEPT")


# one wrong-way import per contract: (file, the module it then imports, the contract that must break)
WRONG_WAY = [
    ("pipeline/contracts.py", "pipeline.errors", "pipeline.contracts imports nothing of the project"),
    ("pipeline/methods/an.py", "pipeline.hidden_scoring",
     "Methods import neither the data pipeline nor the hidden-label scorer (they never see the full labels)"),
    ("pipeline/models/small_cnn.py", "pipeline.train",
     "Methods, models and data import neither the loop, the stages, the CLI nor the tools"),
    ("pipeline/data.py", "pipeline.methods",
     "Layers: CLI > stages and tools > loop > its scorer | run config > methods | models > data > contracts"),
    ("pipeline/metrics.py", "tests.helpers",
     "The library never imports stages, tests or scripts (only the CLI dispatches to the stages)"),
    ("pipeline/tools/bench_parallel.py", "stages.prepare",  # a tool runs a stage through the command only
     "The library never imports stages, tests or scripts (only the CLI dispatches to the stages)"),
]


def test_a_wrong_way_import_breaks_its_contract(tmp_path):
    assert {name for *_, name in WRONG_WAY} == set(contract_names()), "every contract needs a wrong-way case"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for path, module, _ in WRONG_WAY:
        with (tmp_path / path).open("a") as f:
            f.write(f"\nimport {module}  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert verdicts(result.stdout) == dict.fromkeys(contract_names(), "BROKEN"), result.stdout[-4000:]
    flat = " ".join(result.stdout.split())
    for path, module, _ in WRONG_WAY:  # each report names the import that broke it (an outside package by its top)
        importer = path.removesuffix(".py").replace("/", ".")
        imported = module.split(".")[0] if module.startswith("tests") else module
        assert f"{importer} -> {imported}" in flat, (importer, imported, result.stdout[-4000:])


def test_the_contracts_module_imports_only_the_standard_library_and_torch():
    """import-linter sees only the project's packages; this covers the rest of 'imports nothing of the project'."""
    imported = set()
    for node in ast.walk(ast.parse((REPO / "pipeline" / "contracts.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__", "torch", "numpy"}, imported


def test_method_authors_may_still_import_the_records_from_pipeline_methods():
    """docs/methods.md named pipeline.methods as their home before pipeline.contracts existed."""
    import pipeline.contracts as contracts
    import pipeline.methods as methods

    for name in ("Batch", "MethodContext", "StepOutput"):
        assert getattr(methods, name) is getattr(contracts, name) and name in methods.__all__
    assert not hasattr(methods, "HiddenLabels")
