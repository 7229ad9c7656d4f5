"""The ``spml`` command: one subcommand per DVC stage, plus tools (``bench``, ``compare-regimes``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import SpmlError
from pipeline.io import terminate_cleanly

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="spml-bench: single positive multi-label learning benchmark pipeline.")
err = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file (default: params.yaml)")]
DatasetArg = Annotated[str, typer.Argument(help="dataset name, e.g. synthetic")]


def _run(fn, *args, **kwargs):
    """Run a stage; user errors become one red line on stderr and exit code 2."""
    terminate_cleanly()
    try:
        return fn(*args, **kwargs)
    except SpmlError as exc:
        # escaped: a message quoting user values ("found [nan]") must not be read as rich markup and vanish
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (OSError, RuntimeError) as exc:
        from pipeline.io import disk_full_error, is_disk_full

        if not is_disk_full(exc):
            raise
        # a write outside the atomic helpers (they name their file themselves), e.g. a download's .part file
        message = disk_full_error(getattr(exc, "filename", None) or Path.cwd())
        err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def download(dataset: DatasetArg,
             source: Annotated[Path | None, typer.Option("--from", help="local archive or extracted folder")] = None,
             params: ParamsOption = Path("params.yaml")):
    """Download (or generate, or import from --from) a dataset into data/raw/DATASET."""
    from stages import download as stage

    out = _run(stage.run, dataset, source, params)
    err.print(f"wrote {out}")


@app.command()
def prepare(dataset: DatasetArg, params: ParamsOption = Path("params.yaml")):
    """Write the full label table data/prepared/DATASET.parquet (with the 80/20 train/val split)."""
    from stages import prepare as stage

    out = _run(stage.run, dataset, params)
    err.print(f"wrote {out}")


@app.command()
def sample(dataset: DatasetArg, params: ParamsOption = Path("params.yaml")):
    """Write single-positive observed labels data/sampled/DATASET.parquet (community procedure)."""
    from stages import sample as stage

    out = _run(stage.run, dataset, params)
    err.print(f"wrote {out}")


@app.command()
def pretrain(params: ParamsOption = Path("params.yaml")):
    """Pretrain the smallcnn trunk on the disjoint source task into data/pretrained/smallcnn/."""
    from stages import pretrain as stage

    out = _run(stage.run, params)
    err.print(f"wrote {out}")


@app.command("import-npy")
def import_npy(directory: Annotated[Path, typer.Argument(help="folder with formatted_{train,val}_{images,labels}.npy")],
               name: Annotated[str, typer.Option("--name", help="dataset name to register")],
               images: Annotated[Path | None, typer.Option("--images", help="image root (default DIR)")] = None,
               classes: Annotated[Path | None, typer.Option("--classes", help="class names, one a line")] = None):
    """Register a dataset given as the field's formatted .npy files (then prepare/sample/train it)."""
    from stages import import_npy as stage

    out = _run(stage.run, directory, name, images, classes)
    err.print(f"registered {name}; wrote {out}")


@app.command("export-npy")
def export_npy(dataset: DatasetArg,
               out_dir: Annotated[Path, typer.Argument(help="folder for formatted_{train,val}_*.npy")]):
    """Write formatted_{train,val}_{images,labels,labels_obs}.npy from the prepared and sampled tables."""
    from stages import export_npy as stage

    written = _run(stage.run, dataset, out_dir)
    err.print(f"wrote {len(written)} files to {out_dir}")


@app.command("clip-scores")
def clip_scores(dataset: DatasetArg,
                method: Annotated[str | None, typer.Argument(
                    help="CLIP-based method (vlpl, aevlp); default: every method of params vl_methods")] = None,
                params: ParamsOption = Path("params.yaml")):
    """Write the CLIP cosines of every training image for a CLIP-based method into data/clip/DATASET/METHOD/
    (open_clip; weights from params clip.METHOD, never downloaded)."""
    from stages import clip_scores as stage

    for out in _run(stage.run, dataset, method, params):
        err.print(f"wrote {out}")


@app.command()
def train(dataset: DatasetArg,
          method: Annotated[str, typer.Argument(help="method name, e.g. an, full, ignore")],
          seed: Annotated[int, typer.Option(help="training seed")] = 0,
          params: ParamsOption = Path("params.yaml"),
          out: Annotated[Path | None, typer.Option(help="output dir (default runs/DATASET/METHOD/SEED)")] = None,
          resume: Annotated[bool, typer.Option("--resume/--no-resume",
                                               help="continue an interrupted run from its last epoch checkpoint")] = True,
          weights: Annotated[str | None, typer.Option(
              help="trunk weights, overriding models.<model>.weights: resnet50, q2l, efficientnet_lite0: none, "
                   "imagenet or a .pth path (SHA-256 checked); smallcnn: none, pretrained or a trunk.pt")] = None):
    """Train one method on one dataset with one seed; writes metrics, history, config and checkpoint.

    Multi-GPU: torchrun --nproc_per_node N -m pipeline.cli train DATASET METHOD (rank 0 writes)."""
    from stages import train as stage

    metrics = _run(stage.run, dataset, method, seed, params, out, resume, weights)
    from pipeline.runtime.distributed import env_rank

    if metrics is None or env_rank() != 0:  # under torchrun, rank 0 reports
        return
    err.print(f"{dataset}/{method}/{seed}: val mAP {metrics['val_map']:.2f}, test mAP {metrics['test_map']:.2f} "
              f"(best epoch {metrics['best_epoch']})")


@app.command()
def aggregate(params: ParamsOption = Path("params.yaml"),
              out: Annotated[Path, typer.Option(help="reports directory")] = Path("reports")):
    """Collect the runs of the params grid into reports/ (runs.csv, results.md, summary.json)."""
    from stages import aggregate as stage

    out_dir = _run(stage.run, params, out)
    err.print(f"wrote {out_dir}/results.md")


@app.command("compare-regimes")
def compare_regimes(dirs: Annotated[list[Path], typer.Argument(
                        help="two or more folders with a runs.csv each (`spml aggregate --out DIR`), "
                             "e.g. reports/all-methods-scratch reports/all-methods")],
                    labels: Annotated[str | None, typer.Option(
                        help="comma-separated regime names, one per folder (default: the folder names)")] = None,
                    out: Annotated[Path, typer.Option(help="output folder")] = Path("reports/regimes")):
    """Compare training regimes: regimes.md (test mAP, gap closed, AN/full, Kendall tau vs the paper per
    regime) and regimes.png (gap closed per method, one bar per regime)."""
    from pipeline import report

    names = labels.split(",") if labels is not None else None
    out_dir = _run(report.compare_regimes, dirs, names, out)
    err.print(f"wrote {out_dir}/regimes.md and {out_dir}/regimes.png")


@app.command()
def stats(dataset: DatasetArg):
    """Print a prepared dataset's label statistics (training split): positives per image, the label-count
    distribution, the share of false negatives among the unannotated entries, the class frequencies."""
    from pipeline import paths
    from pipeline.label_stats import label_statistics
    from pipeline.tables import read_label_table

    def read():
        path = paths.label_table(dataset)
        if not path.exists():
            from pipeline.errors import SpmlError

            raise SpmlError(f"{path} does not exist; run `spml prepare {dataset}` first")
        return label_statistics(read_label_table(path))

    for line in _run(read):
        typer.echo(line)


@app.command()
def verify(table: Annotated[Path, typer.Argument(help="a table folder with runs.csv, e.g. reports/all-methods")],
           cells: Annotated[int | None, typer.Option(help="how many cells to re-train, drawn by --sample-seed")] = 3,
           all_cells: Annotated[bool, typer.Option("--all", help="re-train every cell of the table")] = False,
           preset: Annotated[str | None, typer.Option(
               help="the preset the table was made with (presets/NAME.yaml), e.g. all-methods")] = None,
           sample_seed: Annotated[int, typer.Option(help="seed of the draw of cells")] = 0):
    """Re-train cells of a committed table in a temporary copy and check every metric, bit for bit (CPU runs,
    at each run's recorded thread count and malloc). Exit 2 naming the cell, both values and the command when
    one differs."""
    from pipeline import verify as check

    checked = _run(check.verify, table, None if all_cells else cells, preset, sample_seed,
                   report=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))
    err.print(f"{len(checked)} cell(s) of {table} reproduce bit for bit: {', '.join(checked)}")


@app.command()
def config(dataset: DatasetArg,
           method: Annotated[str, typer.Argument(help="method name, e.g. ignore")],
           seed: Annotated[int, typer.Option(help="training seed")] = 0,
           preset: Annotated[list[str] | None, typer.Option(
               help="presets/NAME.yaml composed over params.yaml, as `dvc exp run -S +presets=NAME` does "
                    "(repeatable)")] = None,
           all_unread: Annotated[bool, typer.Option(
               "--all-unread", help="warn about every params key no cell of the grid reads, the repository's own "
                                    "defaults included (default: only the keys the presets change)")] = False,
           params: ParamsOption = Path("params.yaml")):
    """Print the fully resolved run configuration as JSON (what `spml train` records in config.json).

    With the dataset prepared, the schedules are shown mapped to the run (the timeline rule); before, as set.
    Keys that no cell of the grid reads (a more specific block always overrides them) are named on stderr."""
    import json

    from pipeline import paths
    from pipeline.config import compose_params, load_params
    from pipeline.run_config import apply_timeline, resolve_run_config, training_rows
    from pipeline.unread import committed_params, warn_unread, without_preset_keys

    def resolve():
        loaded = compose_params(params, [f"+presets={name}" for name in preset]) if preset else load_params(params)
        run = resolve_run_config(loaded, dataset, method, seed)
        base = None if all_unread else committed_params(params) if not preset else \
            without_preset_keys(load_params(params), Path(params).parent, preset)
        warn_unread(loaded, lambda line: typer.echo(line, err=True), base)
        return apply_timeline(run, training_rows(dataset)) if paths.label_table(dataset).exists() else run

    run = _run(resolve)
    typer.echo(json.dumps(run.to_dict(), indent=2))


@app.command("check-lock")
def check_lock(root: Annotated[Path, typer.Option(help="repository root")] = Path(".")):
    """Fail (exit 1) when dvc.lock does not match the committed code, params and commands.

    Missing data or outputs (a fresh clone without the DVC cache) are not staleness and pass.
    """
    from pipeline import freshness

    problems = _run(freshness.check, root)
    if problems:
        err.print(f"[red]dvc.lock is stale[/red] ({len(problems)} change(s) not reproduced); "
                  "run `dvc repro` and commit dvc.lock and reports/:", highlight=False, soft_wrap=True)
        for problem in problems:
            err.print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print("dvc.lock is fresh: every stage's command, params and source dependencies match.")


@app.command()
def bench(methods: Annotated[str, typer.Option(help="comma-separated methods; the ratio column is relative to an")] = "an,ignore",
          model: Annotated[str | None, typer.Option(help="model name (default: params train.model)")] = None,
          image_size: Annotated[int | None, typer.Option(
              help="square input size (default: params train.image_size)")] = None,
          batch_size: Annotated[int | None, typer.Option(
              help="training batch size (default: params train.batch_size)")] = None,
          steps: Annotated[int, typer.Option(help="timed steps per method")] = 20,
          warmup: Annotated[int, typer.Option(help="untimed steps per method first")] = 3,
          device: Annotated[str | None, typer.Option(help="auto, cpu, cuda (default: params runtime.device)")] = None,
          num_classes: Annotated[int, typer.Option(help="classes of the random bench data")] = 20,
          dataset: Annotated[str, typer.Option(help="dataset whose params blocks apply")] = "synthetic",
          prepare: Annotated[str | None, typer.Option(
              help="DATASET: bench on pipeline.bench_prepare.run(DATASET) data instead of random data")] = None,
          threads: Annotated[int | None, typer.Option(
              help="torch intra-op threads (default: params runtime.threads; $SPML_THREADS wins, as in spml train)")] = None,
          amp: Annotated[bool | None, typer.Option(
              "--amp/--no-amp", help="autocast in params train.amp_dtype (default: params train.amp)")] = None,
          channels_last: Annotated[bool | None, typer.Option(
              "--channels-last/--no-channels-last", help="NHWC model and batches (default: params runtime.channels_last)")] = None,
          weights: Annotated[str | None, typer.Option(help="trunk weights: none, imagenet, PATH (default: random)")] = None,
          model_kwargs: Annotated[str | None, typer.Option(help='extra model args as JSON, e.g. \'{"layers": [1,1,1,1]}\'')] = None,
          host_malloc: Annotated[str | None, typer.Option(
              help="jemalloc or tcmalloc: that library preloaded (the spml command re-executes itself); cache: "
                   "glibc malloc keeping freed memory; system: glibc's default. Default: params "
                   "runtime.host_allocator and runtime.host_malloc_cache ($SPML_ALLOCATOR wins, as in spml train)")] = None,
          compile_model: Annotated[bool | None, typer.Option(
              "--compile/--no-compile", help="torch.compile each model; compiling happens in the untimed warm-up "
                                              "(default: params runtime.compile)")] = None,
          loader: Annotated[bool, typer.Option(
              "--loader", help="instead, time the training input pipeline (loader, views, normalisation on the "
                               "device): images/s delivered")] = False,
          workers: Annotated[int | None, typer.Option(
              help="--loader: loader worker processes (default: params runtime.num_workers)")] = None,
          augment_on: Annotated[str | None, typer.Option(
              help="--loader: where the views are made, loader or device (default: params train.augment_on)")] = None,
          decode: Annotated[str | None, typer.Option(
              help="--loader --dataset coco2014: where the JPEGs are decoded, cpu or device (default: params "
                   "train.decode)")] = None,
          images: Annotated[int, typer.Option(
              help="--loader --dataset coco2014: JPEGs to generate in COCO 2014's layout (or to read from "
                   "--coco-root) and time the loaders on")] = 64,
          worker_counts: Annotated[str, typer.Option(
              help="--loader --dataset coco2014: comma-separated loader worker counts, interleaved")] = "1,2",
          rounds: Annotated[int, typer.Option(
              help="--loader --dataset coco2014: interleaved rounds; the medians are reported")] = 3,
          coco_root: Annotated[Path | None, typer.Option(
              help="--loader --dataset coco2014: a COCO 2014 folder to read the first --images training "
                   "images of, instead of generating them")] = None,
          parallel: Annotated[int | None, typer.Option(
              help="N: instead, time N tiny whole trainings one after another and side by side (threads each: "
                   "--threads, default usable CPUs / N)")] = None,
          params: ParamsOption = Path("params.yaml")):
    """Median training-step time, images/s, ratio to AN and memory of METHODS on one model and batch.

    Each method's config, model, optimizer and step are spml train's (pipeline/bench.py says how). On a GPU
    machine with only torch: pip install typer rich pyyaml; python -m pipeline.cli bench ... (docs/bench-gpu.md)."""
    from pipeline import bench as bench_mod

    if parallel is not None:
        typer.echo(bench_mod.format_parallel(_run(bench_mod.run_parallel_bench, parallel, params, threads), parallel))
        return

    names = [m.strip() for m in methods.split(",") if m.strip()]

    def _bench():
        import json

        try:
            extra = json.loads(model_kwargs) if model_kwargs else None
        except ValueError as exc:
            raise SpmlError(f"--model-kwargs is not valid JSON ({exc})") from None
        if extra is not None and not isinstance(extra, dict):
            raise SpmlError(f"--model-kwargs must be a JSON object such as '{{\"width\": 8}}', got {model_kwargs}")
        if host_malloc not in (None, "jemalloc", "tcmalloc", "cache", "system"):
            raise SpmlError(f"--host-malloc {host_malloc!r}: use jemalloc, tcmalloc, cache or system")
        if augment_on not in (None, "loader", "device"):
            raise SpmlError(f"--augment-on {augment_on!r}: use loader or device")
        if decode is not None or coco_root is not None:
            raise SpmlError("--decode and --coco-root set the real-format input bench; add --loader --dataset coco2014")
        if not loader and (workers is not None or augment_on is not None):
            # the step bench times ready batches: no loader, no views; saying nothing would hide that
            raise SpmlError("--workers and --augment-on set the input-pipeline bench; add --loader (the step bench "
                            "times ready batches)")
        given = {"image_size": image_size, "batch_size": batch_size, "device": device, "threads": threads, "amp": amp,
                 "channels_last": channels_last, "compile": compile_model, "num_workers": workers, "augment_on": augment_on}
        if host_malloc is not None:
            given["host_allocator"] = "glibc" if host_malloc in ("cache", "system") else host_malloc
            given["host_malloc_cache"] = host_malloc != "system"
        given = {key: value for key, value in given.items() if value is not None}
        if loader:
            return bench_mod.run_loader_bench(names, params, dataset, steps, warmup, num_classes, 0, **given)
        return bench_mod.run_bench(names, params, dataset, model, steps, warmup, num_classes, 0, prepare,
                                   weights=weights, model_kwargs=extra, **given)

    if loader and dataset == "coco2014":  # the real-format input bench (pipeline/tools/input_bench.py)
        from pipeline.tools import input_bench

        def _input_bench():
            if workers is not None:
                raise SpmlError("--loader --dataset coco2014 takes --worker-counts (e.g. 1,2), not --workers")
            if decode not in (None, "cpu", "device"):
                raise SpmlError(f"--decode {decode!r}: use cpu or device")
            if augment_on not in (None, "loader", "device"):
                raise SpmlError(f"--augment-on {augment_on!r}: use loader or device")
            try:
                counts = tuple(int(c) for c in worker_counts.split(",") if c.strip())
            except ValueError:
                raise SpmlError(f"--worker-counts {worker_counts!r}: give comma-separated integers, e.g. 1,2") from None
            given = {"image_size": image_size, "batch_size": batch_size, "device": device, "threads": threads,
                     "augment_on": augment_on, "decode": decode}
            return input_bench.run_input_bench(names, params, dataset, images, counts, rounds, 0, coco_root,
                                               **{key: value for key, value in given.items() if value is not None})

        typer.echo(input_bench.format_input_bench(_run(_input_bench)))
        return
    results, header = _run(_bench)
    typer.echo(bench_mod.format_loader(results, header) if loader else bench_mod.format_results(results, header))


grid_app = typer.Typer(no_args_is_help=True, help="Scale out the grid: one job per (dataset, method, seed) cell on "
                       "Slurm (or local processes), results shared through the DVC remote's run-cache "
                       "(docs/cluster.md).")
app.add_typer(grid_app, name="grid")
RootOption = Annotated[Path, typer.Option("--root", help="repository root (the submitting workspace)")]


@grid_app.command("submit")
def grid_submit(
        executor: Annotated[str, typer.Option(help="slurm (one job array) or local (processes on this machine)")] = "slurm",
        jobs: Annotated[int | None, typer.Option(
            help="at most N cells at once (Slurm: the array's %N; default all; local: default 1)")] = None,
        partition: Annotated[str | None, typer.Option(help="Slurm partition")] = None,
        gpus_per_job: Annotated[int | None, typer.Option(
            help="GPUs per cell (Slurm --gpus-per-node; local: slot k gets GPUs k*G...k*G+G-1)")] = None,
        cpus_per_job: Annotated[int | None, typer.Option(help="Slurm --cpus-per-task")] = None,
        mem_gb: Annotated[float | None, typer.Option(help="Slurm --mem in GB")] = None,
        time: Annotated[str | None, typer.Option(
            help="time limit per cell: MINUTES, H:MM:SS or D-HH:MM:SS (default: params grid)")] = None,
        account: Annotated[str | None, typer.Option(help="Slurm --account")] = None,
        qos: Annotated[str | None, typer.Option(help="Slurm --qos")] = None,
        constraint: Annotated[str | None, typer.Option(help="Slurm --constraint")] = None,
        slurm_arg: Annotated[list[str] | None, typer.Option(
            help="any other sbatch option as KEY=VALUE, or KEY= for a flag without a value, e.g. "
                 "--slurm-arg exclude=node07 --slurm-arg exclusive= (repeatable; added to params grid's sbatch)")] = None,
        upstream: Annotated[str, typer.Option(
            help="pull: jobs pull the prepared tables and trunk this command pushed; rebuild: jobs rebuild them")] = "pull",
        workdir: Annotated[Path | None, typer.Option(
            help="where jobs clone the repository (default .spml/grid/STAMP/clones), e.g. node-local scratch")] = None,
        keep_clones: Annotated[bool, typer.Option("--keep-clones", help="keep each job's clone after success")] = False,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="say what would be submitted and each job array's resolved sbatch lines (runs the "
                              "upstream stages to know); submit nothing")] = False,
        wait: Annotated[bool, typer.Option("--wait", help="block until every submitted cell is done or failed")] = False,
        root: RootOption = Path(".")):
    """Submit one job per grid cell whose result the DVC remote's run-cache does not hold yet.

    First runs the upstream stages (data, pretrained trunk) here and pushes them.
    Each job clones this commit, trains its cell (`dvc repro --single-item`), pushes its outputs, then its
    run-cache entry. Slurm resources per cell come from params `grid:` (defaults, per-dataset and
    per-method overrides); the options here override them for every cell."""
    from pipeline import grid

    def _submit():
        extra = []
        for item in slurm_arg or []:
            name, sep, value = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
                raise SpmlError(f"--slurm-arg {item!r}: use KEY=VALUE, e.g. --slurm-arg exclude=node07, or KEY= "
                                "for a flag without a value, e.g. --slurm-arg exclusive=")
            extra.append((name, value if value else True))
        cli = {"partition": partition, "gpus_per_job": gpus_per_job, "cpus_per_job": cpus_per_job,
               "mem_gb": mem_gb, "time": grid.parse_time(time) if time else None, "account": account, "qos": qos,
               "constraint": constraint, "sbatch": tuple(extra)}
        return grid.submit(root, executor, jobs, cli, upstream, workdir, dry_run, keep_clones,
                           say=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))

    result = _run(_submit)
    total = len(result.submitted) + len(result.done_before) + len(result.active)
    typer.echo(f"{total} cells: {len(result.done_before)} already on the remote, {len(result.active)} still queued "
               f"or running, {len(result.submitted)} {'to submit' if dry_run else 'submitted'}"
               + ("" if dry_run or not result.submitted else f" ({executor}, submission {result.stamp})"))
    for name in result.submitted:
        typer.echo(f"  {'would submit' if dry_run else 'submitted'} {name}")
    if dry_run and result.shapes:
        typer.echo(f"{len(result.shapes)} job array(s), one per resource shape:")
        for names, lines in result.shapes:
            typer.echo(f"  {', '.join(names)}:")
            for line in lines:
                typer.echo(f"      {line}")
    for name, where in result.active.items():
        typer.echo(f"  still active {name} (submission {where})")
    if wait and result.submitted and not dry_run:
        states = grid.wait(root.resolve(), result.submitted, say=typer.echo)
        failed = [s for s in states if s.state != "done"]
        if failed:
            typer.echo(f"{len(failed)} cell(s) failed; `spml grid submit` resubmits them")
            raise typer.Exit(1)


@grid_app.command("status")
def grid_status(root: RootOption = Path(".")):
    """Per-cell state at the current commit: done (on the remote), queued, running, failed (with the log's last
    line), stale (only jobs or results of an older version of the cell), not submitted.

    Computes each cell's run-cache key as `submit` and `collect` do (restoring the upstream stages first)."""
    from pipeline import grid

    states = _run(grid.status, root)
    width = max(len(s.cell) for s in states)
    for state in states:
        where = f" [{state.submission}]" if state.submission else ""
        typer.echo(f"{state.cell:<{width}}  {state.state:<13} {state.detail}{where}".rstrip())
    counts = [(sum(s.state == name for s in states), name) for name in grid.STATES]
    typer.echo(", ".join(f"{n} {name}" for n, name in counts if n))


@grid_app.command("collect")
def grid_collect(root: RootOption = Path(".")):
    """Restore every cell from the remote's run-cache and aggregate (`dvc repro --pull`).

    Refuses (exit 2) while any cell has no result on the remote."""
    from pipeline import grid

    _run(grid.collect, root, say=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))


def main() -> None:  # pragma: no cover - console entry point
    from pipeline.runtime.host import preload_allocator

    preload_allocator()  # before torch is imported: re-executes train/bench with jemalloc preloaded, if installed
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
