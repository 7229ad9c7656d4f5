"""DVC reruns exactly what a change touches, on a temporary copy of the real pipeline (tiny params).

After one `dvc repro`: changing EM's params block or em.py leaves only the em cells stale; changing the
training loop leaves every cell stale; a new method (one module and one params block) adds only its own
cells; `dvc exp run -S +presets=NAME` trains exactly the grid the preset names; and changing a CLIP-based
method's CLIP reruns only its clip-scores cell and its own train-vl cells.
"""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml

from tests.helpers import git_commit_all, sh, tiny_repo

pytestmark = pytest.mark.slow


def stale(repo) -> set[str]:
    return set(json.loads(sh(repo, "dvc", "status", "--json")))


def train_cells(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(("train@", "ablate@", "train-vl@"))}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = tiny_repo(tmp_path_factory.mktemp("granularity") / "repo", methods=("an", "em"), seeds=(0,), epochs=1)
    sh(repo, "dvc", "repro")
    git_commit_all(repo, "reproduced")
    assert stale(repo) == set()
    return repo


def edit(repo, rel, change):
    path = repo / rel
    original = path.read_text()
    path.write_text(change(original))
    return lambda: path.write_text(original)


def stale_after_params(repo, change) -> set[str]:
    """`dvc status`'s stale stages after ``change(params)`` edits params.yaml in place (undone afterwards)."""
    def edited(text):
        params = yaml.safe_load(text)
        change(params)
        return yaml.safe_dump(params, sort_keys=False)

    undo = edit(repo, "params.yaml", edited)
    try:
        return stale(repo)
    finally:
        undo()


def test_changing_a_methods_params_block_reruns_only_its_cells(reproduced):
    def change(params):
        params["method_params"]["em"]["default"]["alpha"] = 0.3
        params["method_params"]["ll-r"]["default"]["delta_percent"] = 0.7  # a method outside the grid

    assert train_cells(stale_after_params(reproduced, change)) == {"train@synthetic-em-0"}


def test_runtime_settings_leave_every_cell_up_to_date(reproduced):
    """params `runtime` (threads, workers, compile, device...) can change no metric beyond float noise: no cell
    tracks it, so a user who sets it for their machine keeps every committed result."""
    def change(params):
        params["runtime"].update(threads=1, num_workers=2, compile=True, device="cpu", channels_last=True,
                                 host_allocator="glibc", max_loss=1.0e7)

    assert stale_after_params(reproduced, change) == set()


def test_changing_one_methods_protocol_reruns_only_its_cells(reproduced):
    """A method's authors' protocol lives in its own block (method_params.<m>.original), which also sets the
    reference of its schedules under `unified`: changing it reruns that method's cells and no other."""
    def change(params):
        params["method_params"]["em"]["original"]["default"]["epochs"] = 12
        params["method_params"]["ll-r"]["original"]["default"]["lr"] = 1.0e-4  # a method outside the grid

    assert train_cells(stale_after_params(reproduced, change)) == {"train@synthetic-em-0"}


def test_editing_a_methods_module_reruns_only_its_cells(reproduced):
    undo = edit(reproduced, "pipeline/methods/em.py", lambda text: text + "\n# an edit\n")
    try:
        assert stale(reproduced) - {"aggregate"} == {"train@synthetic-em-0"}
    finally:
        undo()
    undo = edit(reproduced, "pipeline/methods/ignore.py", lambda text: text + "\n# an edit\n")
    try:
        assert stale(reproduced) == set()  # ignore is not in this grid
    finally:
        undo()


def test_editing_the_training_loop_reruns_every_cell(reproduced):
    undo = edit(reproduced, "pipeline/train.py", lambda text: text + "\n# an edit\n")
    try:
        assert train_cells(stale(reproduced)) == {"train@synthetic-an-0", "train@synthetic-em-0"}
    finally:
        undo()


def test_a_new_method_is_one_module_and_one_params_block_and_only_its_cells_are_new(reproduced, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(reproduced, repo, symlinks=True)
    module = (repo / "pipeline/methods/an.py").read_text()
    module = module.replace('@register_method("an")', '@register_method("toy-an")')
    module = re.sub(r"class \w+\(Method\)", "class ToyAN(Method)", module)
    (repo / "pipeline/methods/toy-an.py").write_text(module)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["method_params"]["toy-an"] = {"default": {}}
    params["methods"] = ["an", "em", "toy-an"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert train_cells(stale(repo)) == {"train@synthetic-toy-an-0"}
    out = sh(repo, "dvc", "repro", env={"PYTHONPATH": str(repo)})  # the copy's code, with its new module
    assert "Running stage 'train@synthetic-toy-an-0'" in out
    assert "Running stage 'train@synthetic-an-0'" not in out and "Running stage 'train@synthetic-em-0'" not in out
    assert "toy-an" in (repo / "reports/results.md").read_text()
    # no `original` block: under protocol original it runs unified, and the run and the report say so
    params["protocol"] = "original"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = json.loads(sh(repo, "spml", "config", "synthetic", "toy-an", env={"PYTHONPATH": str(repo)}))
    assert config["protocol"] == "unified" and config["reference"]["epochs"] is None


def test_dvc_exp_run_with_a_preset_trains_exactly_the_presets_grid(reproduced, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(reproduced, repo, symlinks=True)
    (repo / "presets/tiny-grid.yaml").write_text(
        "# @package _global_\n# Source: this test.\nmethods: [an]\nablations: [an-cons]\nseeds: [0, 1]\n")
    git_commit_all(repo, "a preset")
    out = sh(repo, "dvc", "exp", "run", "-S", "+presets=tiny-grid")
    ran = set(re.findall(r"Running stage '((?:train|ablate)@[^']+)'", out))
    # an at seed 0 is unchanged since the last repro: it is in the grid, not rerun
    assert ran == {"train@synthetic-an-1", "ablate@synthetic-an-cons-0", "ablate@synthetic-an-cons-1"}
    runs = pd.read_csv(repo / "reports/runs.csv")
    trained = sorted(zip(runs["method"], runs["seed"]))
    assert trained == [("an", 0), ("an", 1), ("an-cons", 0), ("an-cons", 1)]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["methods"] == ["an"] and params["seeds"] == [0, 1]  # the composed grid DVC's matrix read


@pytest.fixture(scope="module")
def reproduced_vl(tmp_path_factory):
    """A tiny repository with the CLIP-based methods in the grid (tiny random CLIP), reproduced once."""
    repo = tiny_repo(tmp_path_factory.mktemp("granularity-vl") / "repo", methods=("an",), seeds=(0,), epochs=1)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["vl_methods"] = ["vlpl", "aevlp"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(repo, "vl grid")
    out = sh(repo, "dvc", "repro", env={"PYTHONPATH": str(repo)})
    assert {"clip-scores@synthetic-vlpl", "train-vl@synthetic-aevlp-0"} <= set(re.findall(r"Running stage '([^']+)'", out))
    git_commit_all(repo, "reproduced")
    assert stale(repo) == set()
    return repo


def test_changing_a_clip_model_reruns_only_that_methods_clip_scores_and_cells(reproduced_vl, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(reproduced_vl, repo, symlinks=True)
    # the CLIP code reruns every clip-scores cell and, through their outputs, only the CLIP-based cells
    undo = edit(repo, "pipeline/clip.py", lambda text: text + "\n# an edit\n")
    try:
        assert stale(repo) - {"aggregate"} == {"clip-scores@synthetic-vlpl", "clip-scores@synthetic-aevlp"}
    finally:
        undo()
    # the table reader is a dependency of the CLIP-based cells only
    undo = edit(repo, "pipeline/clip_scores.py", lambda text: text + "\n# an edit\n")
    try:
        assert train_cells(stale(repo)) == {"train-vl@synthetic-vlpl-0", "train-vl@synthetic-aevlp-0"}
    finally:
        undo()

    def change(text):
        params = yaml.safe_load(text)
        # other random CLIP weights for aevlp only (a copy: params.yaml's YAML anchor shares the block with vlpl)
        params["clip"]["aevlp"]["synthetic"] = {**params["clip"]["aevlp"]["synthetic"], "seed": 1}
        return yaml.safe_dump(params, sort_keys=False)

    edit(repo, "params.yaml", change)
    assert stale(repo) - {"aggregate"} == {"clip-scores@synthetic-aevlp", "train-vl@synthetic-aevlp-0"}
    out = sh(repo, "dvc", "repro", env={"PYTHONPATH": str(repo)})
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"clip-scores@synthetic-aevlp", "train-vl@synthetic-aevlp-0", "aggregate"}
    results = (repo / "reports/results.md").read_text()
    assert "| vlpl | " in results and "| aevlp | " in results and "† random CLIP weights" in results
