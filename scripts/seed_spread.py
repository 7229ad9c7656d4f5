"""Seed spread of a mean, split into training and test-sample parts (pipeline/tools/seed_spread.py).

    PYTHONPATH=. python scripts/seed_spread.py runs/synthetic/an/0 /tmp/an/1 /tmp/an/2 ...   # after dvc repro
    PYTHONPATH=. python scripts/seed_spread.py --runs-table reports/all-methods/runs.csv     # seeds each mean needs

Each argument is a run folder (`spml train ... --out DIR`) of one dataset and method, one per seed. Every
checkpoint (best.pt) is scored on the test split of the prepared data in this workspace, with params.yaml's
runtime settings; the script checks that each recomputed test mAP equals the folder's metrics.json, then
prints the decomposition and what a larger test split or more seeds would buy. With ``--runs-table`` it sizes
every mean of a committed table instead: the seeds its own seed sd asks for, and the CPU time they cost at the
runs' median train_seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params
from pipeline.methods import get_method_class
from pipeline.metrics import mean_average_precision
from pipeline.run_config import apply_timeline, resolve_run_config
from pipeline.runtime.distributed import DistContext
from pipeline.tools.seed_spread import decompose
from pipeline.train import (build_loaders, build_normalizer, build_training, load_checkpoint, load_run_data,
                            method_context, predict, setup_process)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2 (as every spml command)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def score_test_split(run_dir: Path, params: dict) -> tuple[str, str, np.ndarray, np.ndarray, float]:
    """(dataset, method, scores, full labels, recorded test mAP) of one run folder's best.pt."""
    missing = [name for name in ("config.json", "metrics.json", "best.pt") if not (run_dir / name).is_file()]
    if missing:
        fail(f"{run_dir} is not a run folder (no {', '.join(missing)}); give folders that "
                 "`spml train ... --out DIR` wrote")
    config = json.loads((run_dir / "config.json").read_text())
    dataset, method, seed = config["dataset"], config["method"], int(config["seed"])
    run = resolve_run_config(params, dataset, method, seed)
    dist = DistContext()
    device = setup_process(run.train, run.runtime, dist)
    cls = get_method_class(method)
    data = load_run_data(dataset, run.train, cls.needs_strong_view, cls.needs_instances, run.runtime.num_workers,
                         dist)
    run = apply_timeline(run, len(data.train))
    loaders = build_loaders(data, run.train, run.runtime, run.run_seed, device, dist)
    normalize = build_normalizer(run.train, device, run.runtime.channels_last)
    training = build_training(run, method_context(run, data, len(loaders.train), device), dist)
    best = load_checkpoint(run_dir / "best.pt")
    training.model.load_state_dict(best["model"])
    training.method.load_state_dict(best["method"])
    scores, targets = predict(training.model, training.method, loaders.test, normalize, training.amp)
    recorded = json.loads((run_dir / "metrics.json").read_text())["test_map"]
    return dataset, method, scores, targets, recorded


def size_table(table: Path, target_se: float) -> None:
    """Per (dataset, method) of a runs.csv: seeds for s.e. <= target_se from its seed sd, and their cost."""
    import pandas as pd

    try:
        runs = pd.read_csv(table)
    except (OSError, ValueError) as exc:
        fail(f"--runs-table {table} cannot be read ({exc}); give a runs.csv that `spml aggregate` wrote")
    absent = {"dataset", "method", "test_map", "train_seconds"} - set(runs.columns)
    if absent:
        fail(f"--runs-table {table} has no column {', '.join(sorted(absent))}; give a runs.csv that "
                 "`spml aggregate` wrote")
    rows = runs.groupby(["dataset", "method"]).agg(seeds=("test_map", "count"), sd=("test_map", "std"),
                                                   seconds=("train_seconds", "median"))
    rows["se"] = rows.sd / np.sqrt(rows.seeds)
    rows["needed"] = [max(n, math.ceil((sd / target_se) ** 2)) for n, sd in zip(rows.seeds, rows.sd)]
    rows["more"] = rows.needed - rows.seeds
    over = rows[rows.se > target_se]
    print(over.round({"sd": 2, "se": 2, "seconds": 0}).to_string())
    hours = float((rows.more * rows.seconds).sum()) / 3600
    print(f"{len(over)} of {len(rows)} means have s.e. > {target_se}; {int(rows.more.sum())} more runs, "
          f"{hours:.1f} CPU hours at the runs' median train_seconds (their thread count)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders of one dataset and method, one per seed")
    parser.add_argument("--runs-table", type=Path, help="a committed runs.csv to size (instead of run folders)")
    parser.add_argument("--rounds", type=int, default=100, help="random half splits of the test split")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--target-se", type=float, default=0.3, help="standard error to size the seeds for")
    args = parser.parse_args()
    if args.rounds < 1 or args.target_se <= 0:
        parser.error("--rounds must be at least 1 and --target-se above 0")
    if args.runs_table is not None:
        if args.runs:
            parser.error("give run folders or --runs-table, not both")
        size_table(args.runs_table, args.target_se)
        return
    if len(args.runs) < 2:
        parser.error("give at least two run folders (seeds)")
    params = load_params(args.params)
    scored = [score_test_split(run_dir, params) for run_dir in args.runs]
    if len({(d, m) for d, m, *_ in scored}) != 1:
        parser.error("the run folders must be of one dataset and one method")
    targets = scored[0][3]
    for run_dir, (_, _, scores, full, recorded) in zip(args.runs, scored):
        again = mean_average_precision(full, scores).map
        if not np.array_equal(full, targets) or abs(again - recorded) > 1e-9:
            fail(f"{run_dir}: rescored test mAP {again:.6f} is not its metrics.json's {recorded:.6f} "
                     "(another workspace's data or params?); run this where the folders were trained")
    spread = decompose([s for _, _, s, _, _ in scored], targets, args.rounds)
    dataset, method = scored[0][:2]
    maps = [round(r, 2) for *_, r in scored]
    print(f"{dataset} / {method}: {spread.seeds} seeds, test mAP {maps}, test split N = {spread.images} images, "
          f"{args.rounds} random half splits")
    print(f"seed sd on N images {spread.sd_whole:.2f}, on N/2 {spread.sd_half:.2f} -> training part "
          f"{spread.sd_train:.2f}, test-sample part {spread.sd_sample:.2f} (mAP points)")
    for factor in (1, 2, 4, math.inf):
        size = "infinite" if math.isinf(factor) else f"{factor} x N"
        print(f"  test split {size:>8}: seed sd {spread.sd_at(factor):.2f}, seeds for s.e. <= {args.target_se}: "
              f"{spread.seeds_for(args.target_se, factor)}")


if __name__ == "__main__":
    main()
