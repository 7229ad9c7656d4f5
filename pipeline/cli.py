"""The ``spml`` command: one subcommand per DVC stage, plus the tools (pipeline/tools/: ``bench``, ``grid``,
``compare-regimes``, ``check-lock``, ``verify``).

One convention for every command: a list is given by repeating its option, one value each (``--method an
--method ignore``, ``--label a --label b``, ``--preset a --preset b``), and an option that replaces a params value
is named after its key (``--num-workers``: ``num_workers``, ``--host-allocator``: ``host_allocator``). An option
spelled the old way (``--methods an,ignore``, ``--host-malloc``, ``spml bench --loader``) is refused in one line
that names the new spelling.
"""

from __future__ import annotations

import itertools
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipeline.errors import SpmlError
from pipeline.io import terminate_cleanly
from pipeline.runtime.host import ALLOCATORS
from pipeline.tools.settings import params_key

err = Console(stderr=True)

# Spellings this command no longer reads, and what replaced each (lists are repeated options, names are params
# keys): refused in one line rather than failing on an unknown option or reading the value as something else.
RENAMED_OPTIONS = {
    "--methods": "--method, once per method (--method an --method ignore)",
    "--labels": "--label, once per folder (--label scratch --label pretrained)",
    "--workers": "--num-workers (params num_workers)",
    "--host-malloc": "--host-allocator auto|jemalloc|tcmalloc|glibc and --host-malloc-cache/--no-host-malloc-cache "
                     "(params host_allocator and host_malloc_cache; the old cache is --host-allocator glibc "
                     "--host-malloc-cache, system is --host-allocator glibc --no-host-malloc-cache)",
    "--model-kwargs": "--model-param KEY=VALUE, once per key (params models.<model>.KEY)",
    "--slurm-arg": "--sbatch, once per sbatch option as params grid's sbatch list writes it "
                   "(--sbatch --exclusive --sbatch --exclude=node07)",
    "--from": "--source PATH (params data.<dataset>.source)",
}
BENCH_MODES = {"--loader": "loader", "--parallel": "parallel", "--prepare": "prepare"}  # `spml bench --X` before


def _given(words: list[str], option: str) -> bool:
    return any(word == option or word.startswith(option + "=") for word in words)


def old_spelling(args: list[str]) -> str | None:
    """What is wrong with a command line written for an older ``spml`` (one line), or None."""
    words = list(itertools.takewhile(lambda word: word != "--", map(str, args)))
    renamed = [f"{old} is now {new}" for old, new in RENAMED_OPTIONS.items() if _given(words, old)]
    if words[:1] == ["bench"] and len(words) > 1 and words[1].startswith("-") and words[1] not in ("--help", "-h"):
        flag = next((flag for flag in BENCH_MODES if _given(words, flag)), None)
        mode = BENCH_MODES.get(flag, "step")
        was = f"spml bench {flag} ..." if flag else "spml bench ..."
        return "; ".join([f"`spml bench` takes a subcommand: `spml bench {mode} ...` (was `{was}`); "
                          "`spml bench --help` lists step, prepare, loader and parallel", *renamed])
    return "; ".join(renamed) or None


# Click's usage error and its "no arguments: show the help" kind, from the Click that Typer runs on (recent Typer
# vendors its own copy, whose classes are not the click package's)
USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")
NO_ARGS_IS_HELP = getattr(sys.modules[USAGE_ERROR.__module__], "NoArgsIsHelpError", ())


def _refuse(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


class SpmlGroup(TyperGroup):
    """The root command: refuses an old spelling in one line before anything parses it, and says a usage error
    (an unknown option, a value outside the choices, a missing argument) in one line too, as any other error."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        problem = old_spelling(args)
        if problem:
            raise _refuse(problem)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NO_ARGS_IS_HELP:
            raise  # a bare group: its help, as asked
        except USAGE_ERROR as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise _refuse(f"{exc.format_message().rstrip('.')}; `{where} --help` lists what it takes") from None


app = typer.Typer(cls=SpmlGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="spml-bench: single positive multi-label learning benchmark pipeline. Lists: repeat the "
                       "option (--method an --method ignore); options that replace a params value carry its key's "
                       "name.")

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
             source: Annotated[Path | None, typer.Option("--source", help="local archive or extracted folder")] = None,
             params: ParamsOption = Path("params.yaml")):
    """Download (or generate, or import from --source) a dataset into data/raw/DATASET."""
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
def config(dataset: DatasetArg,
           method: Annotated[str, typer.Argument(help="method name, e.g. ignore")],
           seed: Annotated[int, typer.Option(help="training seed")] = 0,
           preset: Annotated[list[str] | None, typer.Option(
               help="presets/NAME.yaml composed over params.yaml, as `dvc exp run -S +presets=NAME` does; repeat "
                    "the option for more, in order")] = None,
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


# ------------------------------------------------------------------------------------------------- tools
# Commands that are not pipeline stages (pipeline/tools/). Lists are given by repeating an option, one value each
# (--method an --method ignore), never as a comma string; an option named after a params key replaces that value.


def _one_per_option(values: list[str], option: str, example: str) -> list[str]:
    """A list option's values, each one name: a comma means the old comma-list spelling, said in one line."""
    for value in values:
        if "," in value:
            raise SpmlError(f"{option} {value!r}: give one value per {option}, repeating the option, e.g. {example}")
    return values


@app.command("compare-regimes")
def compare_regimes(dirs: Annotated[list[Path], typer.Argument(
                        help="two or more folders with a runs.csv each (`spml aggregate --out DIR`), "
                             "e.g. reports/all-methods-scratch reports/all-methods")],
                    label: Annotated[list[str] | None, typer.Option(
                        help="a regime's name, once per folder in the folders' order (repeat the option: "
                             "--label scratch --label pretrained; default: the folder names)")] = None,
                    out: Annotated[Path, typer.Option(help="output folder")] = Path("reports/regimes")):
    """Compare training regimes: regimes.md (test mAP, gap closed, AN/full, Kendall tau vs the paper per
    regime) and regimes.png (gap closed per method, one bar per regime)."""
    from pipeline.tools import compare_regimes as tool

    out_dir = _run(tool.compare_regimes, dirs, label, out)
    err.print(f"wrote {out_dir}/regimes.md and {out_dir}/regimes.png")


VERIFY_CELLS = 3  # spml verify: cells drawn when neither --cells nor --all is given


@app.command()
def verify(table: Annotated[Path, typer.Argument(help="a table folder with runs.csv, e.g. reports/all-methods")],
           cells: Annotated[int | None, typer.Option(
               help=f"how many cells to re-train, drawn by --sample-seed (default {VERIFY_CELLS})")] = None,
           all_cells: Annotated[bool, typer.Option("--all", help="re-train every cell of the table")] = False,
           preset: Annotated[list[str] | None, typer.Option(
               help="a preset the table was made with (presets/NAME.yaml), composed over params.yaml as "
                    "`dvc exp run -S +presets=NAME` does, e.g. all-methods; repeat the option for more, "
                    "in order")] = None,
           sample_seed: Annotated[int, typer.Option(help="seed of the draw of cells")] = 0):
    """Re-train cells of a committed table in a temporary copy and check every metric, bit for bit (CPU runs,
    at each run's recorded thread count and malloc). Exit 2 naming the cell, both values and the command when
    one differs."""
    from pipeline.tools import verify as tool

    def _verify():
        if all_cells and cells is not None:  # one of them would be ignored
            raise SpmlError(f"--cells {cells} and --all: pass one of them")
        count = None if all_cells else VERIFY_CELLS if cells is None else cells
        return tool.verify(table, count, preset, sample_seed,
                           report=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))

    checked = _run(_verify)
    err.print(f"{len(checked)} cell(s) of {table} reproduce bit for bit: {', '.join(checked)}")


@app.command("check-lock")
def check_lock(root: Annotated[Path, typer.Option(help="repository root")] = Path(".")):
    """Fail (exit 1) when dvc.lock does not match the committed code, params and commands.

    Missing data or outputs (a fresh clone without the DVC cache) are not staleness and pass.
    """
    from pipeline.tools import check_lock as tool

    problems = _run(tool.check, root)
    if problems:
        err.print(f"[red]dvc.lock is stale[/red] ({len(problems)} change(s) not reproduced); "
                  "run `dvc repro` and commit dvc.lock and reports/:", highlight=False, soft_wrap=True)
        for problem in problems:
            err.print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print("dvc.lock is fresh: every stage's command, params and source dependencies match.")


# --- spml bench: one subcommand per thing timed, each with only the options it reads ----------------------------

bench_app = typer.Typer(no_args_is_help=True, help="Time the training step (step, prepare), the input pipeline "
                        "(loader) or whole trainings side by side (parallel); docs/bench-cpu.md, docs/bench-gpu.md. "
                        "On a GPU machine with only torch: pip install typer rich pyyaml; python -m pipeline.cli "
                        "bench ...")
app.add_typer(bench_app, name="bench")


HostAllocator = Enum("HostAllocator", {name: name for name in ALLOCATORS}, type=str)  # params runtime.host_allocator


class AugmentOn(str, Enum):  # params train.augment_on (pipeline.run_config.TrainConfig)
    loader = "loader"
    device = "device"


def _default(key: str, more: str = "") -> str:
    return f"(default: params {params_key(key)}{more})"


DEFAULT_METHODS = ("an", "ignore")
MethodsOption = Annotated[list[str] | None, typer.Option(
    "--method", help="a method to bench; repeat the option for more (--method an --method ignore, the default); "
                     "the ratio column is relative to an")]
ModelOption = Annotated[str | None, typer.Option(help=f"model name {_default('model')}")]
ImageSizeOption = Annotated[int | None, typer.Option(help=f"square input size {_default('image_size')}")]
BatchSizeOption = Annotated[int | None, typer.Option(help=f"training batch size {_default('batch_size')}")]
StepsOption = Annotated[int, typer.Option(help="timed steps per method")]
WarmupOption = Annotated[int, typer.Option(help="untimed steps per method first")]
DeviceOption = Annotated[str | None, typer.Option(help=f"auto, cpu or cuda {_default('device')}")]
NumClassesOption = Annotated[int, typer.Option(help="classes of the random bench data")]
BenchDatasetOption = Annotated[str, typer.Option(help="dataset whose params blocks apply")]
ThreadsOption = Annotated[int | None, typer.Option(
    help=f"torch intra-op threads {_default('threads', '; $SPML_THREADS wins, as in spml train')}")]
AmpOption = Annotated[bool | None, typer.Option(
    "--amp/--no-amp", help=f"autocast in params {params_key('amp_dtype')} {_default('amp')}")]
ChannelsLastOption = Annotated[bool | None, typer.Option(
    "--channels-last/--no-channels-last", help=f"NHWC model and batches {_default('channels_last')}")]
WeightsOption = Annotated[str | None, typer.Option(
    help="trunk weights, params models.<model>.weights: none, imagenet or PATH (default: none, random weights)")]
ModelParamOption = Annotated[list[str] | None, typer.Option(
    help="KEY=VALUE set in the model's params block models.<model> (VALUE read as YAML); repeat the option for "
         "more, e.g. --model-param output_stride=8 --model-param 'layers=[1,1,1,1]'")]
HostAllocatorOption = Annotated[HostAllocator | None, typer.Option(
    help="which malloc serves host memory: jemalloc or tcmalloc (preloaded: the spml command re-executes itself), "
         "glibc, or auto (the first installed of jemalloc, tcmalloc, glibc) "
         f"{_default('host_allocator', '; $SPML_ALLOCATOR wins, as in spml train')}")]
HostMallocCacheOption = Annotated[bool | None, typer.Option(
    "--host-malloc-cache/--no-host-malloc-cache",
    help=f"where glibc's malloc serves: keep freed memory for reuse {_default('host_malloc_cache')}")]
CompileOption = Annotated[bool | None, typer.Option(
    "--compile/--no-compile",
    help=f"torch.compile each model, in the untimed warm-up {_default('compile')}")]
NumWorkersOption = Annotated[int | None, typer.Option(help=f"loader worker processes {_default('num_workers')}")]
AugmentOnOption = Annotated[AugmentOn | None, typer.Option(
    help=f"where the training views are made, loader or device {_default('augment_on')}")]


def _model_params(items: list[str] | None) -> dict[str, Any] | None:
    """--model-param KEY=VALUE options as a mapping, each VALUE read as YAML (as params.yaml would hold it)."""
    if not items:
        return None
    import yaml

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpmlError(f"--model-param {item!r}: use KEY=VALUE, e.g. --model-param output_stride=8")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpmlError(f"--model-param {item!r}: the value is not YAML ({str(exc).splitlines()[0]})") from None
    return out


def _settings(**given: Any) -> dict[str, Any]:
    """The options that replace a params value, by params key (their names), the ones not given left out."""
    return {key: value.value if isinstance(value, Enum) else value for key, value in given.items() if value is not None}


def _bench_step(methods: list[str] | None, params: Path, dataset: str, model: str | None, steps: int, warmup: int,
                num_classes: int, prepare: str | None, weights: str | None, model_param: list[str] | None,
                settings: dict[str, Any]) -> None:
    from pipeline.tools import bench as tool

    def _bench():
        names = _one_per_option(list(methods or DEFAULT_METHODS), "--method", "--method an --method ignore")
        return tool.run_bench(names, params, dataset, model, steps, warmup, num_classes, 0, prepare,
                              weights=weights, model_kwargs=_model_params(model_param), **settings)

    results, header = _run(_bench)
    typer.echo(tool.format_results(results, header))


@bench_app.command("step")
def bench_step(method: MethodsOption = None, model: ModelOption = None, image_size: ImageSizeOption = None,
               batch_size: BatchSizeOption = None, steps: StepsOption = 20, warmup: WarmupOption = 3,
               device: DeviceOption = None, num_classes: NumClassesOption = 20,
               dataset: BenchDatasetOption = "synthetic", threads: ThreadsOption = None, amp: AmpOption = None,
               channels_last: ChannelsLastOption = None, weights: WeightsOption = None,
               model_param: ModelParamOption = None, host_allocator: HostAllocatorOption = None,
               host_malloc_cache: HostMallocCacheOption = None, compile_model: CompileOption = None,
               params: ParamsOption = Path("params.yaml")):
    """Median training-step time, images/s, ratio to AN and memory of each method on one model and batch of
    random images.

    Each method's config, model, optimizer and step are spml train's (pipeline/tools/bench.py says how)."""
    _bench_step(method, params, dataset, model, steps, warmup, num_classes, None, weights, model_param,
                _settings(image_size=image_size, batch_size=batch_size, device=device, threads=threads, amp=amp,
                          channels_last=channels_last, host_allocator=host_allocator,
                          host_malloc_cache=host_malloc_cache, compile=compile_model))


@bench_app.command("prepare")
def bench_prepare(dataset: Annotated[str, typer.Argument(help="coco2014 (the large instance files)")],
                  method: MethodsOption = None, model: ModelOption = None, batch_size: BatchSizeOption = None,
                  steps: StepsOption = 20, warmup: WarmupOption = 3, device: DeviceOption = None,
                  threads: ThreadsOption = None, amp: AmpOption = None, channels_last: ChannelsLastOption = None,
                  weights: WeightsOption = None, model_param: ModelParamOption = None,
                  host_allocator: HostAllocatorOption = None, host_malloc_cache: HostMallocCacheOption = None,
                  compile_model: CompileOption = None, params: ParamsOption = Path("params.yaml")):
    """Time `spml prepare DATASET` against the community's formatting on generated files of the dataset's size,
    then the training step (as `bench step`) on the first prepared training rows, with 64 px random images."""
    _bench_step(method, params, dataset, model, steps, warmup, 0, dataset, weights, model_param,
                _settings(batch_size=batch_size, device=device, threads=threads, amp=amp,
                          channels_last=channels_last, host_allocator=host_allocator,
                          host_malloc_cache=host_malloc_cache, compile=compile_model))


@bench_app.command("loader")
def bench_loader(method: Annotated[list[str] | None, typer.Option(
                     "--method", help="a method whose views are made (a strong view if one needs it); repeat the "
                                      "option for more (default: --method an --method ignore)")] = None,
                 image_size: ImageSizeOption = None, batch_size: BatchSizeOption = None,
                 steps: Annotated[int, typer.Option(help="timed batches")] = 20,
                 warmup: Annotated[int, typer.Option(help="untimed batches first (at least one per worker)")] = 3,
                 device: DeviceOption = None, num_classes: NumClassesOption = 20,
                 dataset: BenchDatasetOption = "synthetic", threads: ThreadsOption = None,
                 num_workers: NumWorkersOption = None, augment_on: AugmentOnOption = None,
                 channels_last: ChannelsLastOption = None,
                 image_format: Annotated[str, typer.Option(
                     "--format", help="how the images are stored for the loader: cached (the uint8 memory map "
                                      "spml train decodes a dataset into and reads)")] = "cached",
                 params: ParamsOption = Path("params.yaml")):
    """Images/s the training input pipeline delivers to the device: spml train's loader and workers, the views
    where augment_on says, normalisation on the device. Set it against `bench step`'s images/s."""
    from pipeline.tools import bench_loader as tool

    def _bench():
        names = _one_per_option(list(method or DEFAULT_METHODS), "--method", "--method an --method ignore")
        return tool.run_loader_bench(names, params, dataset, steps, warmup, num_classes, 0, image_format,
                                     **_settings(image_size=image_size, batch_size=batch_size, device=device,
                                                 threads=threads, num_workers=num_workers, augment_on=augment_on,
                                                 channels_last=channels_last))

    result, header = _run(_bench)
    typer.echo(tool.format_loader(result, header))


class Decode(str, Enum):  # params train.decode (pipeline.run_config.TrainConfig)
    cpu = "cpu"
    device = "device"


@bench_app.command("input")
def bench_input(method: Annotated[list[str] | None, typer.Option(
                    "--method", help="a method whose views are made (a strong view if one needs it; the official "
                                     "loader makes IGNORE's standard views); repeat the option for more "
                                     "(default: --method ignore)")] = None,
                images: Annotated[int, typer.Option(
                    help="JPEGs to generate in COCO 2014's layout (or to read from --coco-root)")] = 64,
                worker_count: Annotated[list[int] | None, typer.Option(
                    "--worker-count", help="loader worker processes, timed interleaved; repeat the option for more "
                                           "(default: --worker-count 1 --worker-count 2)")] = None,
                rounds: Annotated[int, typer.Option(help="interleaved rounds; the medians are reported")] = 3,
                coco_root: Annotated[Path | None, typer.Option(
                    help="a COCO 2014 folder whose first --images training images are read instead of generated "
                         "ones")] = None,
                image_size: ImageSizeOption = None, batch_size: BatchSizeOption = None, device: DeviceOption = None,
                threads: ThreadsOption = None, augment_on: AugmentOnOption = None,
                decode: Annotated[Decode | None, typer.Option(
                    help=f"where the JPEGs are decoded, cpu or device (nvJPEG on CUDA) {_default('decode')}")] = None,
                channels_last: ChannelsLastOption = None,
                params: ParamsOption = Path("params.yaml")):
    """The paper-scale input path: real JPEG files (COCO-like) through our training loader and through one built
    like the official IGNORE code's, interleaved: images/s and CPU per image per worker, and the cores needed to
    feed 361 and 1000 img/s (docs/bench-cpu.md)."""
    from pipeline.tools import input_bench as tool

    def _bench():
        names = _one_per_option(list(method or ("ignore",)), "--method", "--method ignore")
        counts = tuple(worker_count or (1, 2))
        return tool.run_input_bench(names, params, "coco2014", images, counts, rounds, 0, coco_root,
                                    **_settings(image_size=image_size, batch_size=batch_size, device=device,
                                                threads=threads, augment_on=augment_on, decode=decode,
                                                channels_last=channels_last))

    typer.echo(tool.format_input_bench(_run(_bench)))


@bench_app.command("parallel")
def bench_parallel(count: Annotated[int, typer.Argument(help="how many trainings")],
                   threads: Annotated[int | None, typer.Option(
                       help="torch threads of each training side by side, as $SPML_THREADS (default: usable "
                            "CPUs / COUNT)")] = None,
                   method: Annotated[str, typer.Option(help="the method the trainings train")] = "an",
                   params: ParamsOption = Path("params.yaml")):
    """Wall time of COUNT tiny whole trainings (spml train) one after another, then side by side with automatic
    threads, then side by side with --threads each."""
    from pipeline.tools import bench_parallel as tool

    typer.echo(tool.format_parallel(_run(tool.run_parallel_bench, count, params, threads, method), count))


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
        sbatch: Annotated[list[str] | None, typer.Option(
            help="another sbatch option, written as in params grid's sbatch list (--NAME or --NAME=VALUE), added "
                 "to it; repeat the option for more, e.g. --sbatch --exclusive --sbatch --exclude=node07")] = None,
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
    from pipeline.tools import grid

    def _submit():
        extra = [grid.sbatch_option(item, "--sbatch") for item in sbatch or []]
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
    from pipeline.tools import grid

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
    from pipeline.tools import grid

    _run(grid.collect, root, say=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))


def main() -> None:  # pragma: no cover - console entry point
    from pipeline.runtime.host import preload_allocator

    preload_allocator()  # before torch is imported: re-executes train/bench with jemalloc preloaded, if installed
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
