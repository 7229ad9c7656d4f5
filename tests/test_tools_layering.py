"""The tools' wing (pipeline/tools/): which way its imports point.

The library never imports a tool or a stage; a tool runs stages through the ``spml`` command, never by
importing ``stages`` (not even in the code it hands a child process); scripts never import the tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Top-level module paths a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_only_the_cli_imports_stages_and_tools_never_do():
    cli = REPO / "pipeline" / "cli.py"
    for path in _files("pipeline"):
        if path == cli:
            continue
        stages = [name for name in _imports(path) if name.split(".")[0] == "stages"]
        assert not stages, f"{path.relative_to(REPO)} imports {stages}: run the stage through `spml` instead"
        # code handed to a child interpreter is a string: it must not import stages either
        assert not re.search(r"^\s*(from|import) stages\b", path.read_text(), re.MULTILINE), path


def test_the_library_does_not_import_a_tool():
    tools = REPO / "pipeline" / "tools"
    for path in _files("pipeline"):
        if tools in path.parents or path.name == "cli.py":
            continue
        found = [name for name in _imports(path) if name.startswith("pipeline.tools")]
        assert not found, f"{path.relative_to(REPO)} imports {found}; the library sits below the tools"
    for path in _files("stages"):
        assert not [n for n in _imports(path) if n.startswith("pipeline.tools")], path


def test_scripts_do_not_import_the_tests():
    for path in sorted((REPO / "scripts").glob("*.py")):
        found = [name for name in _imports(path) if name.split(".")[0] == "tests"]
        assert not found, f"{path.relative_to(REPO)} imports {found}; shared helpers live in pipeline/tools/"


def test_the_grid_job_module_a_node_unpickles_imports_nothing_of_the_project():
    """A cluster node imports pipeline.tools.grid_job (and the packages above it) to run a pickled job."""
    for path in (REPO / "pipeline" / "__init__.py", REPO / "pipeline" / "tools" / "__init__.py",
                 REPO / "pipeline" / "tools" / "grid_job.py"):
        found = [name for name in _imports(path) if name.split(".")[0] in ("pipeline", "stages")]
        assert not found, f"{path.relative_to(REPO)} imports {found}"
