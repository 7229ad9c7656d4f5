"""``spml verify``: re-train cells of a committed table and check every metric against it.

A table under ``reports/`` is only as good as the claim that its numbers come from the code and command its
README gives. ``spml verify DIR`` takes DIR/runs.csv (written by ``spml aggregate``: one row per run, the metrics
at full precision, and the thread count, malloc and torch version each run used), samples N of its cells (all
with ``--all``), and re-trains each one with ``spml train`` in a temporary copy of this repository: the same
params (with ``--preset``, the preset(s) the table was made with, composed as ``dvc exp run -S +presets=NAME``
does), ``SPML_THREADS`` and ``SPML_ALLOCATOR`` as recorded. CPU training is deterministic for a given thread count,
so every metric must come out equal, bit for bit; a mismatch is an error naming the cell, both values and the
command that reproduces it. Nothing in this workspace is written.

What the cells read is built in the copy by the stages themselves, from the composed params, as ``dvc repro``
would: the synthetic sets generated, the label tables prepared and sampled, a CLIP-based method's scores computed.
Why not this workspace's ``data/``: it may be stale (made by older code, or with other params than the preset's),
and a stale table would report a cell as not reproducing for a reason that is not the table's. Two things come
from the workspace: a real dataset's raw folder, linked (it cannot be fetched again offline, and no stage writes
into it), and the pretrained trunk when DVC finds stage ``pretrain`` up to date and the preset leaves its params
alone. Why reuse that one: it was built at a thread count nobody recorded, so on another machine a rebuilt trunk
could differ in the last bits, and every cell with it.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import paths
from pipeline.errors import SpmlError
from pipeline.report import read_runs_csv

# the metrics compared (runs.csv columns written from metrics.json); train_seconds is the only one that may differ
COMPARED = ("val_map", "test_map", "best_epoch", "epochs", "test_classes_without_positives", "model", "protocol")
# what a copy needs from this workspace: the code, params, presets and pipeline files, and the machine-local
# registry of `spml import-npy` datasets (never data/prepared, data/sampled or runs/)
COPIED = ("pipeline", "stages", "presets", "params.yaml", "dvc.yaml", "pyproject.toml", "data/imported.json")


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    seed: int
    threads: int | None
    allocator: str | None
    torch: str | None

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method}/{self.seed}"

    def command(self, presets: list[str]) -> str:
        env = " ".join(filter(None, [f"SPML_THREADS={self.threads}" if self.threads else "",
                                     f"SPML_ALLOCATOR={self.allocator}" if self.allocator else ""]))
        composed = " ".join(f"+presets={name}" for name in presets)
        params = f" --params <params.yaml composed with {composed}>" if presets else ""
        return f"{env + ' ' if env else ''}spml train {self.dataset} {self.method} --seed {self.seed}{params}"


def table_cells(runs: pd.DataFrame, where: Path) -> list[Cell]:
    missing = [c for c in ("seed", *COMPARED) if c not in runs.columns]
    if missing:
        raise SpmlError(f"{where} lacks the column(s) {', '.join(missing)}; regenerate it with `spml aggregate`")
    if "threads" not in runs.columns:
        raise SpmlError(f"{where} records no thread count per run (column `threads`): a CPU run can only be checked "
                        "bit for bit at its own thread count; regenerate the table with this version's `spml aggregate`")

    def text(value: Any) -> str | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    def count(value: Any) -> int | None:
        return None if text(value) is None else int(float(value))

    return [Cell(str(r.dataset), str(r.method), int(r.seed), count(r.threads), text(r.get("allocator")),
                 text(r.get("torch"))) for _, r in runs.iterrows()]


def choose(cells: list[Cell], count: int | None, seed: int) -> list[Cell]:
    """``count`` cells drawn without replacement by a seeded draw (all when None or at least the table's)."""
    if count is None or count >= len(cells):
        return list(cells)
    if count < 1:
        raise SpmlError(f"--cells must be at least 1, got {count}")
    return sorted(random.Random(seed).sample(cells, count), key=lambda c: (c.dataset, c.method, c.seed))


def same(recorded: Any, value: Any) -> bool:
    """Equal as the table holds them: numbers exactly (runs.csv keeps every digit), names as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(recorded) == float(value)
        except (TypeError, ValueError):
            return False
    return str(recorded) == str(value)


def generated(dataset: str) -> bool:
    """A dataset whose ``download`` renders it from its params (the synthetic sets): its raw folder is derived
    data, regenerated in the copy; any other dataset's raw folder is the user's, linked."""
    from pipeline.datasets import get_dataset
    from pipeline.datasets.synthetic import Synthetic

    return isinstance(get_dataset(dataset), Synthetic)


def make_copy(root: Path, work: Path, datasets: set[str]) -> None:
    """The code and params of ``root``, and a link to each real dataset's raw folder that ``root`` has."""
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    for dataset in sorted(datasets):
        raw = root / paths.raw_dir(dataset)
        if raw.is_dir() and not generated(dataset):
            link = work / paths.raw_dir(dataset)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(raw.resolve(), target_is_directory=True)


def stale_trunk(root: Path, params: dict[str, Any]) -> str | None:
    """Why ``root``'s pretrained trunk may not be what stage ``pretrain`` builds from this code and ``params``,
    or None when it is: DVC finds the stage up to date in ``root`` (code, params and output as dvc.lock
    records them) and the params the stage reads (dvc.yaml's list) are the same in ``params`` as in
    ``root``'s params.yaml."""
    import json

    import yaml

    from pipeline.config import load_params
    from pipeline.unread import lookup

    if not (root / paths.DATA / "pretrained").is_dir():
        return "this workspace has none"
    if not (root / "dvc.yaml").is_file():
        return "this workspace has no dvc.yaml to tell whether it is up to date"
    stage = (yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}).get("pretrain") or {}
    workspace = load_params(root / "params.yaml")
    changed = [key for key in stage.get("params") or [] if lookup(params, key) != lookup(workspace, key)]
    if changed:
        return f"the preset changes {', '.join(changed)}"
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "pretrain", "--json"], cwd=root,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"`dvc status pretrain` could not tell: {last_line(done)}"
    if json.loads(done.stdout or "{}"):
        return "`dvc status pretrain` finds it changed"
    return None


def last_line(done: subprocess.CompletedProcess) -> str:
    """A failed command's last line of stderr, without its own ``error:`` (the message gets ours)."""
    return (done.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")


def spml(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # this interpreter's spml, with the copy's own code first on the path (then this process's path, so a copy
    # without code runs the caller's, not whatever checkout is installed)
    path = os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=work, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": path, "SPML_NO_PROGRESS": "1", **(env or {})})


def build_upstream(work: Path, cells: list[Cell], params: Path, vl_methods: list[str]) -> None:
    """Build what the cells read with the stages themselves (as `dvc repro` would, without DVC): a dataset's
    raw folder unless linked, its label tables, the trunk unless taken from the workspace, and the CLIP scores
    of a CLIP-based method (params ``vl_methods``, the list dvc.yaml's clip-scores stage iterates)."""
    steps = []
    for dataset in sorted({c.dataset for c in cells}):
        if not (work / paths.raw_dir(dataset)).exists():
            steps.append(("download", dataset))
        steps += [("prepare", dataset), ("sample", dataset)]
    if not (work / paths.DATA / "pretrained").exists():
        steps.append(("pretrain",))
    steps += sorted({("clip-scores", c.dataset, c.method) for c in cells if c.method in vl_methods})
    for step in steps:
        done = spml(work, *step, "--params", str(params))
        if done.returncode != 0:
            raise SpmlError(f"building the copy's data failed at `spml {' '.join(step)}`: {last_line(done)}")


def check_cell(work: Path, params: Path, cell: Cell, row: pd.Series, presets: list[str]) -> list[str]:
    """Re-train one cell; the mismatches as 'cell: metric recorded X, re-trained Y' lines."""
    import json

    env = {k: v for k, v in (("SPML_THREADS", str(cell.threads) if cell.threads else None),
                             ("SPML_ALLOCATOR", cell.allocator)) if v}
    out = work / "verify-runs" / cell.dataset / cell.method / str(cell.seed)
    done = spml(work, "train", cell.dataset, cell.method, "--seed", str(cell.seed), "--params", str(params),
                "--out", str(out), "--no-resume", env=env)
    if done.returncode != 0:
        return [f"{cell.name}: re-training failed ({last_line(done)}); command: {cell.command(presets)}"]
    metrics = json.loads((out / "metrics.json").read_text())
    return [f"{cell.name}: {key} recorded {row[key]}, re-trained {metrics.get(key)}; command: {cell.command(presets)}"
            for key in COMPARED if not same(row[key], metrics.get(key))]


def verify(table: Path, count: int | None, presets: list[str] | None = None, sample_seed: int = 0,
           root: Path = Path("."), report: Callable[[str], None] = print) -> list[str]:
    """Re-train ``count`` cells of ``table`` (a folder with runs.csv, or the file; all when None) and return the
    cells checked; ``presets`` are composed over params.yaml in order. Raises SpmlError naming every mismatch."""
    import torch

    from pipeline.config import compose_params, load_params

    table = Path(table)
    where = table / "runs.csv" if table.is_dir() else table
    runs = read_runs_csv(table)
    cells = choose(table_cells(runs, where), count, sample_seed)
    versions = {c.torch for c in cells if c.torch} - {torch.__version__}
    if versions:
        raise SpmlError(f"{where} was made with torch {', '.join(sorted(versions))} and this machine has "
                        f"{torch.__version__}: CPU results are bit-identical only on the same torch; "
                        "verify with that version")
    root = Path(root).resolve()
    presets = list(presets or [])
    params = (compose_params(root / "params.yaml", [f"+presets={name}" for name in presets]) if presets
              else load_params(root / "params.yaml"))
    with tempfile.TemporaryDirectory(prefix="spml-verify-") as tmp:
        work = Path(tmp)
        make_copy(root, work, {c.dataset for c in cells})
        import yaml

        params_file = work / "verify-params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        why = stale_trunk(root, params)
        if why is None:
            shutil.copytree(root / paths.DATA / "pretrained", work / paths.DATA / "pretrained")
        report("pretrained trunk: " + ("this workspace's (`dvc status pretrain`: up to date)" if why is None
                                       else f"built in the copy ({why})"))
        build_upstream(work, cells, params_file, list(params.get("vl_methods") or []))
        problems = []
        for cell in cells:
            row = runs[(runs.dataset == cell.dataset) & (runs.method == cell.method)
                       & (runs.seed.astype(int) == cell.seed)].iloc[0]
            found = check_cell(work, params_file, cell, row, presets)
            report(f"{cell.name}: " + ("MISMATCH" if found else f"identical (test mAP {row.test_map})"))
            problems += found
    if problems:
        raise SpmlError(f"{len(problems)} metric(s) of {where} do not reproduce: " + "; ".join(problems))
    return [c.name for c in cells]
