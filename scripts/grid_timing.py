"""Wall time of a tiny grid, serial `dvc repro` vs `spml grid` with N local workers (docs/cluster.md).

    PYTHONPATH=. python scripts/grid_timing.py --jobs 2            # the measurement in docs/cluster.md
    PYTHONPATH=. python scripts/grid_timing.py --jobs 2 --epochs 6 --seed 0 --seed 1 --seed 2

Each flow runs in a fresh temporary copy of this repository with the tests' tiny params
(pipeline/tools/tiny_repo.py),
the grid `methods x seeds` on synthetic, and SPML_THREADS=1 for every training (the serial run also once with
the default threads). The grid flow is `spml grid submit --executor local --jobs N --wait` then
`spml grid collect`, against a local-directory DVC remote; it checks that reports/ equal the serial run's
(runs.csv but train_seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tools.tiny_repo import git_commit_all, sh, tiny_repo


def _timed(repo: Path, *args: str, env: dict) -> float:
    start = time.perf_counter()
    sh(repo, *args, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    # lists as spml takes them: the option repeated, one value each
    parser.add_argument("--method", action="append", help="a method of the grid (repeat it; default: an, full)")
    parser.add_argument("--seed", action="append", type=int, help="a seed of the grid (repeat it; default: 0, 1)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    methods, seeds = tuple(args.method or ("an", "full")), tuple(args.seed or (0, 1))
    root = args.out or Path(tempfile.mkdtemp(prefix="spml-grid-timing-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{len(methods) * len(seeds)} cells ({', '.join(methods)} x seeds {', '.join(map(str, seeds))}, "
          f"{args.epochs} epoch(s)); "
          f"{os.cpu_count()} CPUs; load average before {os.getloadavg()[0]:.2f}; work in {root}", flush=True)
    rows = []

    def make(name: str) -> Path:
        return tiny_repo(root / name, methods=methods, seeds=seeds, epochs=args.epochs)

    one = {"SPML_THREADS": "1"}
    serial = make("serial")
    rows.append(("serial `dvc repro`, SPML_THREADS=1", _timed(serial, "dvc", "repro",
                                                             env={"PYTHONPATH": str(serial), **one})))
    auto = make("serial-auto")
    rows.append(("serial `dvc repro`, default threads", _timed(auto, "dvc", "repro", env={"PYTHONPATH": str(auto)})))

    grid = make("grid")
    sh(grid, "dvc", "remote", "add", "-d", "store", str(root / "remote"))
    git_commit_all(grid, "remote")
    env = {"PYTHONPATH": str(grid), **one}
    submit = _timed(grid, "spml", "grid", "submit", "--executor", "local", "--jobs", str(args.jobs), "--wait", env=env)
    collect = _timed(grid, "spml", "grid", "collect", env=env)
    rows.append((f"`spml grid submit --executor local --jobs {args.jobs} --wait`, SPML_THREADS=1", submit))
    rows.append(("`spml grid collect`", collect))
    rows.append((f"grid total ({args.jobs} local workers)", submit + collect))

    import pandas as pd

    same = all((serial / "reports" / f).read_bytes() == (grid / "reports" / f).read_bytes()
               for f in ("results.md", "summary.json", "diagnostics.md"))
    a, b = (pd.read_csv(r / "reports/runs.csv").drop(columns=["train_seconds"]) for r in (serial, grid))
    same = same and a.equals(b)
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.1f} s")
    print(f"reports identical to the serial run (runs.csv but train_seconds): {'yes' if same else 'NO'}; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
