"""One registry for methods, models and datasets; one module per method; params without code defaults.

The layout checks here are what makes dvc.yaml's per-cell dependencies sound: a train cell depends on its
method's module and the shared core only, so a method module may import nothing else of the package, and
every module a training run imports must be one of the cell's dependencies.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import SpmlError
from pipeline.registry import DATASETS, METHODS, MODELS, Registry
from tests.conftest import REPO

METHODS_DIR = REPO / "pipeline" / "methods"


def stage_deps(stage: str) -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]


def shared_core() -> set[str]:
    """The pipeline/methods modules every train cell depends on (dvc.yaml), by module name."""
    return {Path(d).stem for d in stage_deps("train") if d.startswith("pipeline/methods/") and "${" not in d}


# ------------------------------------------------------------------------------------------ registry
def test_a_name_registered_twice_is_an_error_naming_both_classes():
    registry = Registry("widget", "pipeline.methods", "name")

    @registry.register("w")
    class First:
        pass

    class Second:
        pass

    with pytest.raises(SpmlError, match=r"widget 'w' is registered twice: by .*First and by .*Second"):
        registry.register("w")(Second)
    registry.register("w")(First)  # the same class again (a module imported twice) is no clash
    assert registry.get("w") is First


def test_unknown_names_list_the_valid_ones():
    for registry, kind in ((METHODS, "method"), (MODELS, "model"), (DATASETS, "dataset")):
        with pytest.raises(SpmlError, match=f"unknown {kind} 'nope'; valid {kind}s: "):
            registry.get("nope")
    assert "em" in METHODS and "smallcnn" in MODELS and "voc2012" in DATASETS


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("pipeline", "stages")):
                offenders += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders


# --------------------------------------------------------------------------- one module per method
def test_every_method_lives_in_the_module_named_like_it():
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.ablation_of is None:
            assert cls.__module__ == f"pipeline.methods.{name}", name
        else:  # dvc.yaml's `ablate` stage depends on IGNORE's module, so only IGNORE may have ablations
            assert cls.ablation_of == "ignore" and cls.__module__ == "pipeline.methods.ignore", name
    modules = {p.stem for p in METHODS_DIR.glob("*.py")} - {"__init__"}
    strays = modules - set(METHODS.names()) - shared_core()
    assert not strays, f"modules that are neither a method nor listed as shared core in dvc.yaml: {strays}"


def project_imports(path: Path) -> set[str]:
    """The files of pipeline/ and stages/ a module imports by name (``from pipeline import paths`` included)."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module in ("pipeline", "stages") \
                else [node.module]
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages"):
                base = REPO / name.replace(".", "/")
                found = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
                files.add(os.path.relpath(found, REPO))
    return files


def test_a_method_module_imports_only_the_shared_core():
    """Another method's module never, and of the rest of the project only files its cell depends on in dvc.yaml
    (the CLIP scores' reader: train-vl's cells only) or that cannot change a number."""
    shared = shared_core() | {"__init__"}
    vl_methods = yaml.safe_load((REPO / "presets" / "all-methods.yaml").read_text())["vl_methods"]
    for path in sorted(METHODS_DIR.glob("*.py")):
        if path.stem in shared:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.methods."):
                assert node.module.split(".")[-1] in shared, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("pipeline.methods.") for a in node.names), path.name
        stage = "train-vl" if path.stem in vl_methods else "train"
        deps = [d for d in stage_deps(stage) if "${" not in d]
        assert not uncovered(project_imports(path), deps), f"{path.name} imports files its cells do not track"


def test_train_and_ablate_cells_differ_only_in_the_method_module():
    train, ablate = stage_deps("train"), stage_deps("ablate")
    assert train[:-1] == ablate[:-1]
    assert train[-1] == "pipeline/methods/${item.method}.py" and ablate[-1] == "pipeline/methods/ignore.py"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "method_params.${item.method}" in stages["train"]["params"]
    # an ablation reads its method's block: the same params, IGNORE's block in place of its own
    assert stages["ablate"]["params"] == [p.replace("${item.method}", "ignore") for p in stages["train"]["params"]]


def test_train_vl_cells_are_train_cells_plus_their_clip_scores():
    """The CLIP-based methods' cells (stage train-vl) depend on everything a train cell does, plus their own
    (dataset, method) CLIP scores and clip block; nothing else in the pipeline depends on CLIP."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    train, vl = stage_deps("train"), stage_deps("train-vl")
    assert vl[:len(train)] == train
    assert vl[len(train):] == ["pipeline/clip_scores.py", "data/clip/${item.dataset}/${item.method}"]
    assert stages["train-vl"]["params"] == [*stages["train"]["params"], "clip.${item.method}"]
    assert stages["train-vl"]["matrix"]["method"] == "${vl_methods}"
    assert stages["clip-scores"]["matrix"] == {"dataset": "${datasets}", "method": "${vl_methods}"}
    assert stages["clip-scores"]["outs"] == ["data/clip/${item.dataset}/${item.method}"]
    assert stages["clip-scores"]["params"] == ["clip.${item.method}"]
    for name, stage in stages.items():
        if name not in ("clip-scores", "train-vl"):
            assert not any("clip" in str(d) for d in stage.get("deps", [])), name
            assert not any("clip" in str(d) for d in stage.get("params", [])), name
    assert "vl_methods" in stages["aggregate"]["params"]


def imported_by(workspace: Path, call: str) -> set[str]:
    """The project modules a fresh interpreter imports while running ``call`` in ``workspace``."""
    script = (f"import json, sys\n{call}\n"
              "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) "
              "if getattr(m, '__file__', None))))")
    env = dict(os.environ, PYTHONPATH=str(REPO), SPML_NO_PROGRESS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=workspace, env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    return {os.path.relpath(f, REPO) for f in json.loads(out.splitlines()[-1])
            if f.startswith((str(REPO / "pipeline") + os.sep, str(REPO / "stages") + os.sep))}


# modules that cannot change a number: errors, paths, progress bars, atomic writes, the version string
HARMLESS = {"pipeline/__init__.py", "pipeline/errors.py", "pipeline/paths.py", "pipeline/progress.py",
            "pipeline/io.py", "pipeline/runtime/__init__.py", "stages/__init__.py"}


def uncovered(imported: set[str], deps: list[str], also_harmless: tuple[str, ...] = ()) -> list[str]:
    return sorted(f for f in imported if f not in HARMLESS and not f.startswith(also_harmless)
                  and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


def test_clip_scores_and_a_vl_training_run_import_only_their_cells_dependencies(tiny_workspace):
    """`spml clip-scores` and a vlpl/aevlp training run, for real (tiny CLIP), in fresh interpreters: every
    project module each imports is a dependency of its cell; training never imports open_clip."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for method in ("vlpl", "aevlp"):
        imported = imported_by(tiny_workspace, f"from stages import clip_scores\n"
                                               f"clip_scores.run('synthetic', '{method}')")
        # the thread count (SPML_THREADS) comes from runtime; it changes no number DVC should track
        assert not uncovered(imported, stages["clip-scores"]["deps"],
                             ("pipeline/datasets/", "pipeline/download.py", "pipeline/runtime/host.py"))
        assert not any(f.startswith("pipeline/methods/") for f in imported), "clip-scores imported a method"
        call = (f"from stages import train\ntrain.run('synthetic', '{method}', 0)\n"
                "assert 'open_clip' not in sys.modules, 'training imported open_clip'")
        imported = imported_by(tiny_workspace, call)
        deps = [d.replace("${item.method}", method) for d in stage_deps("train-vl") if not d.startswith("data/")]
        assert not uncovered(imported, deps, ("pipeline/datasets/", "pipeline/download.py", "pipeline/unread.py")), \
            method
        assert f"pipeline/methods/{method}.py" in imported and "pipeline/clip.py" not in imported
        others = {f"pipeline/methods/{m}.py" for m in METHODS.names()} - {f"pipeline/methods/{method}.py"}
        assert not imported & others, f"training {method} imported another method's module"


def test_a_training_run_imports_only_its_cells_dependencies(tiny_workspace):
    """Train em for real (tiny) in a fresh interpreter and list every module of the project it imported:
    each one that can change a number must be a dependency of the cell in dvc.yaml."""
    imported = imported_by(tiny_workspace, "from stages import train\ntrain.run('synthetic', 'em', 0)")
    deps = [d.replace("${item.method}", "em") for d in stage_deps("train") if not d.startswith("data/")]
    # the dataset sources are `prepare`'s business: a cell reads the prepared tables, which are its deps;
    # pipeline/unread.py only prints warnings about params no cell reads (it changes no number)
    missing = uncovered(imported, deps, ("pipeline/datasets/", "pipeline/download.py", "pipeline/unread.py"))
    assert not missing, f"imported by a training run but not a dependency of its cell: {missing}"
    assert "pipeline/methods/em.py" in imported
    others = {f"pipeline/methods/{m}.py" for m in METHODS.names()} - {"pipeline/methods/em.py"}
    assert not imported & others, "training em imported another method's module"


def test_pretraining_imports_only_the_pretrain_stages_dependencies(tiny_workspace):
    imported = imported_by(tiny_workspace, "from stages import pretrain\npretrain.run()")
    deps = stage_deps("pretrain")
    # the other model modules are imported by the registry's scan for `smallcnn` and build nothing here
    models = tuple(f"pipeline/models/{p.name}" for p in (REPO / "pipeline/models").glob("*.py")
                   if p.name not in ("__init__.py", "small_cnn.py"))
    # pipeline/contracts.py holds record types only (the models' ModelOutput, the Batch Normalizer.batch builds)
    # and imports nothing of the project: no number of pretraining comes from it
    types_only = ("pipeline/contracts.py",)
    missing = uncovered(imported, deps, ("pipeline/datasets/__init__.py", "pipeline/download.py", *models,
                                         *types_only))
    assert not missing, f"imported by pretraining but not a dependency of the pretrain stage: {missing}"


# --------------------------------------------------------------------------- one source of truth
def parsed_dataclasses():
    from pipeline.datasets.imported import ImportedNpy
    from pipeline.pretrain import PretrainParams
    from pipeline.run_config import TrainConfig
    from stages.prepare import SplitParams
    from stages.sample import SampleParams

    classes = [TrainConfig, PretrainParams, SplitParams, SampleParams, ImportedNpy.Params]
    classes += [DATASETS.get(name).Params for name in DATASETS.names()]  # data.<name>: no `.get(key, default)`
    classes += [METHODS.get(name).Params for name in METHODS.names()]
    classes += [MODELS.get(name).Params for name in MODELS.names() if hasattr(MODELS.get(name), "Params")]
    return classes


def test_parsed_dataclasses_carry_no_defaults():
    """params.yaml holds every value; a dataclass default would be a second, possibly divergent, one."""
    with_defaults = [f"{cls.__qualname__}.{f.name}" for cls in parsed_dataclasses() for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_defaults


def test_every_method_has_a_complete_params_block():
    """Each method's default block names every field of its Params (nothing is left to code)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in METHODS.names():
        fields = {f.name for f in dataclasses.fields(METHODS.get(name).Params)}
        owner = METHODS.get(name).ablation_of or name  # an ablation reads its method's block
        block = (params["method_params"].get(owner) or {}).get("default") or {}
        assert set(block) == fields, name
