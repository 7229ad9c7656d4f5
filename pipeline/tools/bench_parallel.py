"""``spml bench parallel N``: N tiny whole trainings one after another, then side by side (docs/robustness.md).

Side by side, each training's torch threads must share the usable CPUs, or OpenMP's spinning threads
oversubscribe the cores (``runtime.host.torch_threads``); the bench shows the wall times of the three ways and
the threads each training used.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import deep_merge, load_params
from pipeline.errors import SpmlError
from pipeline.runtime.host import THREADS_ENV, usable_cpus
from pipeline.tools.settings import params_overlay

# The workload: whole tiny trainings, so process start-up, data loading and evaluation count as they do in a
# grid of cells. A bench setting, deep-merged over the given params.yaml.
PARALLEL_WORKLOAD: dict[str, Any] = deep_merge(
    {"data": {"synthetic": {"num_train": 160, "num_test": 40, "image_size": 32, "seed": 0}},
     "train": {"default": {"model": "smallcnn", "epochs": 2, "batch_size": 16, "image_size": 32}},
     "models": {"smallcnn": {"width": 8}}},
    params_overlay({"num_workers": 0, "threads": None}))


@dataclass
class ParallelResult:
    mode: str  # "one after another" or "side by side"
    wall_s: float
    threads: list[int]  # torch threads each training used (its metrics.json)


def run_parallel_bench(count: int, params_path: Path = Path("params.yaml"), threads: int | None = None,
                       method: str = "an") -> list[ParallelResult]:
    """Wall time of ``count`` tiny trainings one after another (automatic threads), then side by side with
    automatic threads, then side by side with ``threads`` each (default: usable CPUs // count) via $SPML_THREADS.

    Runs ``spml`` as subprocesses in a temporary workspace (tiny synthetic data from :data:`PARALLEL_WORKLOAD`).
    """
    import json
    import os
    import subprocess
    import tempfile

    if count < 1:
        raise SpmlError(f"bench parallel {count}: run at least 1 training")
    if threads is not None and threads < 1:
        raise SpmlError(f"--threads {threads}: use at least 1 thread")
    import yaml

    params = deep_merge(load_params(params_path), PARALLEL_WORKLOAD)
    share = threads if threads is not None else max(1, usable_cpus() // count)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "SPML_NO_PROGRESS": "1"}
    env.pop(THREADS_ENV, None)

    def spml(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env={**env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            _, stderr = proc.communicate()
            if proc.returncode:
                raise SpmlError(f"spml {' '.join(proc.args[3:])} failed: {stderr.strip().splitlines()[-1:]}")

    results = []
    with tempfile.TemporaryDirectory(prefix="spml-bench-parallel-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in ("download", "prepare", "sample"):  # untimed, through the command as dvc.yaml runs them
            wait([spml(stage, "synthetic", cwd=work)])
        wait([spml("train", "synthetic", method, "--out", "runs/warm", "--no-resume", cwd=work)])  # builds the cache
        modes = [("one after another", False, None), ("side by side", True, None),
                 ("side by side", True, {THREADS_ENV: str(share)})]
        for index, (mode, together, extra_env) in enumerate(modes):
            outs = [f"runs/{index}-{k}" for k in range(count)]
            started = time.perf_counter()
            if together:
                wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                           extra_env=extra_env) for k, out in enumerate(outs)])
            else:
                for k, out in enumerate(outs):
                    wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                               extra_env=extra_env)])
            wall = time.perf_counter() - started
            used = [json.loads((work / out / "metrics.json").read_text())["threads"] for out in outs]
            label = f"{mode}, {THREADS_ENV}={extra_env[THREADS_ENV]}" if extra_env else f"{mode}, auto"
            results.append(ParallelResult(label, wall, used))
    return results


def format_parallel(results: list[ParallelResult], count: int) -> str:
    epochs = PARALLEL_WORKLOAD["train"]["default"]["epochs"]
    lines = [f"# {count} tiny trainings (spml train, {epochs} epochs); usable CPUs {usable_cpus()}"]
    for r in results:
        lines.append(f"{r.mode:<36} wall {r.wall_s:7.2f} s   threads per training {r.threads}")
    return "\n".join(lines)

