"""`spml bench step | loader | prepare | parallel`: tiny smoke runs (no timing assertions), the bench resolving what
`spml train` resolves, and every option of every subcommand reaching what it times."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import SpmlError
from pipeline.runtime import host
from pipeline.run_config import resolve_run_config
from pipeline.tools import bench, bench_loader, bench_parallel

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "4", "--image-size", "16", "--steps", "2", "--warmup", "1", "--num-classes", "5",
        "--device", "cpu", "--threads", "1"]


def test_cli_bench_prints_one_line_per_method_with_ratio(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "step", "--method", "an", "--method", "ignore", "--params",
                                      REPO / "params.yaml"] + TINY)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if not ln.startswith("#")]
    assert [ln.split()[0] for ln in lines] == ["an", "ignore"]
    assert re.search(r"\b1\.00x vs an", lines[0]) and re.search(r"\d+\.\d\dx vs an", lines[1])
    assert "ms/step" in lines[1] and "img/s" in lines[1] and "saved-for-backward" in lines[1]


def _one_line_error(args: list, *fragments: str) -> str:
    """Invoke ``spml ARGS``: exit 2 with one line, ``error: ...``, holding every fragment."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], color=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bench_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = ["--params", REPO / "params.yaml"]
    result = CliRunner().invoke(app, ["bench", "step", "--method", "an"] + TINY)  # no params.yaml here
    assert result.exit_code == 2 and "params file params.yaml does not exist" in " ".join(
        result.output.split()) and "pass --params" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    _one_line_error(["bench", "step", "--method", "an", "--method", "nope", *params, *TINY], "unknown method 'nope'")
    _one_line_error(["bench", "step", "--host-allocator", "nope", *params, *TINY], "'--host-allocator'", "'nope'")
    _one_line_error(["bench", "loader", "--augment-on", "gpu", *params, *TINY], "'--augment-on'", "'gpu'")
    _one_line_error(["bench", "loader", "--format", "png", *params, *TINY], "--format 'png': use cached")
    _one_line_error(["bench", "prepare", "voc2012", "--method", "an", *params, *TINY[:2], *TINY[4:8], *TINY[10:]],
                    "bench prepare supports coco2014 only")
    _one_line_error(["bench", "step", "--method", "an", "--image-size", "8", *params, *TINY[:2], *TINY[4:]],
                    "--image-size must be >= 16")
    _one_line_error(["bench", "step", "--model-param", "width", *params, *TINY], "--model-param 'width': use KEY=VALUE")
    _one_line_error(["bench", "parallel", "0", *params], "bench parallel 0: run at least 1 training")


@pytest.mark.parametrize("old, fragments", [
    (["bench", "--methods", "an"], ["`spml bench step ...`", "--methods is now --method"]),
    (["bench", "--loader", "--workers", "2"], ["`spml bench loader ...`", "--workers is now --num-workers"]),
    (["bench", "--parallel", "2"], ["`spml bench parallel ...`"]),
    (["bench", "--prepare", "coco2014"], ["`spml bench prepare ...`"]),
    (["bench", "step", "--host-malloc", "cache"], ["--host-malloc is now --host-allocator", "--host-malloc-cache"]),
    (["bench", "step", "--model-kwargs", "{}"], ["--model-kwargs is now --model-param KEY=VALUE"]),
    (["bench", "step", "--method", "an,ignore"], ["--method 'an,ignore': give one value per --method"]),
    (["bench", "loader", "--model", "resnet50"], ["No such option: --model", "bench loader --help"]),
    (["bench", "step", "--augment-on", "device"], ["No such option: --augment-on"]),
    (["bench", "parallel", "2", "--batch-size", "4"], ["No such option: --batch-size"]),
    (["bench", "prepare", "coco2014", "--image-size", "32"], ["No such option: --image-size"]),
])
def test_old_forms_and_options_a_subcommand_does_not_read_are_refused_in_one_line(old, fragments):
    _one_line_error(old, *fragments)


def _options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and p.name != "help"]


def _bench_commands() -> dict:
    import typer.main

    return dict(typer.main.get_command(app).commands["bench"].commands)


def _another_value(command, option) -> list[str]:
    """Arguments that give ``option`` a valid value other than its default (its type from the command's
    signature, which does not depend on how a Typer version describes its parameters)."""
    import enum
    import typing

    name = option.opts[0]
    if option.secondary_opts:  # --x/--no-x: the side that differs from the default (None: both differ)
        return [option.secondary_opts[0] if option.default is True else name]
    special = {"--method": "full", "--model-param": "width=4", "--format": "jpeg", "--params": "other.yaml",
               "--worker-count": "3"}
    if name in special:
        return [name, special[name]]
    kind = typing.get_type_hints(command.callback)[option.name]
    kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)  # X | None: X
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        default = getattr(option.default, "value", option.default)
        return [name, next(member.value for member in kind if member.value != default)]
    if kind is int:
        return [name, str((option.default or 0) + 7)]
    return [name, "x"]


def test_every_bench_subcommand_reads_every_option_it_has(monkeypatch):
    """No option of `spml bench step | prepare | loader | input | parallel` is silently ignored: each one, given a value
    other than its default, changes what the subcommand asks its bench to run (the bench itself recorded here)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise SpmlError("recorded")

    from pipeline.tools import input_bench

    for module, name in ((bench, "run_bench"), (bench_loader, "run_loader_bench"),
                         (bench_parallel, "run_parallel_bench"), (input_bench, "run_input_bench")):
        monkeypatch.setattr(module, name, record)
    required = {"prepare": ["coco2014"], "parallel": ["2"]}
    commands = _bench_commands()
    assert set(commands) == {"step", "prepare", "loader", "input", "parallel"}
    for sub, command in commands.items():
        def called(extra: list[str], sub=sub) -> tuple:
            calls.clear()
            result = CliRunner().invoke(app, ["bench", sub, *required.get(sub, []), *extra])
            assert result.exit_code == 2 and "recorded" in result.output and len(calls) == 1, (sub, extra, result.output)
            return calls[0]

        baseline = called([])
        for option in _options(command):
            assert called(_another_value(command, option)) != baseline, f"spml bench {sub} ignores {option.opts[0]}"


def test_every_list_option_is_a_repeated_option_named_for_one_item():
    """One convention for lists across the CLI: an option given once per value (never a comma string), named for
    one value, and its help says to repeat it."""
    import typer.main

    def commands(group, path=()):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, (*path, name))
            else:
                yield " ".join((*path, name)), command

    seen = []
    for where, command in commands(typer.main.get_command(app)):
        for option in _options(command):
            text = (option.help or "").lower()
            assert not re.search(r"\bcomma\b", text), f"spml {where} {option.opts[0]} takes a comma list"
            if option.multiple:
                seen.append(f"{where} {option.opts[0]}")
                assert not option.opts[0].endswith("s") and "repeat the option" in text, (where, option.opts)
    assert {"bench step --method", "compare-regimes --label", "config --preset", "verify --preset",
            "grid submit --sbatch", "bench step --model-param"} <= set(seen), seen


# What the GPU machine lacks (docs/bench-gpu.md); typer, rich and pyyaml are installed there for `spml bench`.
ABSENT_ON_GPU_MACHINE = ("dvc", "pycocotools", "pyarrow", "pandas", "sklearn")


def spml_without(absent: tuple[str, ...], *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` in a fresh process in which importing any of ``absent`` fails."""
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({absent!r})); sys.argv = ['spml', *sys.argv[1:]]; "
            "runpy.run_module('pipeline.cli', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, check=False, capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(REPO), "PATH": "", "SPML_NO_PROGRESS": "1"})


def test_cli_bench_runs_without_dvc_pycocotools_pyarrow_pandas_sklearn(tmp_path):
    out = spml_without(ABSENT_ON_GPU_MACHINE, "bench", "step", "--method", "an", "--method", "an-cons", "--params",
                       str(REPO / "params.yaml"), *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "an-cons" in out.stdout and "x vs an" in out.stdout


def test_bench_batches_hold_no_hidden_labels_and_full_trains_on_them(monkeypatch):
    """As in the training loop: a method's batch has no full labels, except `full`'s, as its observed ones."""
    import torch

    from pipeline.methods import get_method_class

    data = bench.random_data(8, 5, 16, seed=0)
    from pipeline.data import Normalizer

    pairs = bench._batches(data, 4, Normalizer(torch.device("cpu")), False, 0, "observed")
    for (batch, hidden), rows in zip(pairs, (slice(0, 4), slice(4, 8)), strict=True):
        assert not hasattr(batch, "full") and torch.equal(batch.observed, data.observed[rows])
        assert torch.equal(hidden.full, data.full[rows])
    assert not torch.equal(data.full, data.observed)
    full_cls, seen = get_method_class("full"), []
    step = full_cls.training_step
    monkeypatch.setattr(full_cls, "training_step", lambda self, model, batch, epoch: (
        seen.append(batch), step(self, model, batch, epoch))[1])
    bench.run_bench(["full"], REPO / "params.yaml", steps=2, warmup=0, num_classes=5, num_batches=2, device="cpu",
                    threads=1, batch_size=4, image_size=16)
    assert len(seen) >= 2
    for batch in seen:
        assert torch.equal(batch.observed, data.full[batch.index])


def test_bench_resolves_each_method_as_train_does():
    """An ablation (ignore-gap: its own block, IGNORE's values through params.yaml's anchor) and a dataset block
    reach the bench exactly as they reach `spml train` (before the timeline maps their schedules: the bench times
    steps, which no schedule value changes)."""
    params = load_params(REPO / "params.yaml")
    runs = bench.bench_configs(params, "synthetic", ["ignore", "ignore-gap", "an"], 0)
    for run in runs:
        train = resolve_run_config(params, "synthetic", run.method, 0)
        assert run.method_params == train.method_params and run.train == train.train
        assert run.model_kwargs == {**train.model_kwargs, "weights": "none"}  # random trunk: no download
    assert runs[1].method_params["gap_decay"] == params["method_params"]["ignore"]["default"]["gap_decay"]
    assert runs[1].method_params["cam_threshold"] == params["method_params"]["ignore"]["default"]["cam_threshold"]
    # an option replaces the params value; --model rescopes every block by the new model
    run = bench.bench_configs(params, "synthetic", ["ignore"], 0, "q2l", {"batch_size": 4})[0]
    train = resolve_run_config(params, "synthetic", "ignore", 0, "q2l")
    assert run.train.model == "q2l" and run.train.batch_size == 4 and run.method_params["spbc_weight"] == 0.5
    assert run.method_params == train.method_params


def test_bench_refuses_methods_whose_protocols_disagree_on_the_batch():
    params = load_params(REPO / "params.yaml")
    params["protocol"] = "original"
    with pytest.raises(SpmlError, match=r"train.batch_size \(an 8, ll-r 16\) under protocol original; pass --batch-size"):
        bench.bench_configs(params, "synthetic", ["an", "ll-r"], 0)  # an: the first point of Cole's search
    runs = bench.bench_configs(params, "synthetic", ["an", "ll-r"], 0, overrides={"batch_size": 8})
    assert {run.train.batch_size for run in runs} == {8} and runs[0].search is None and runs[0].train.lr == 1e-2


def test_bench_steps_the_schedule_and_ema_the_loop_would(tmp_path):
    """The timed step is the loop's: a OneCycle schedule and a weight EMA step with it (and the schedule,
    sized for the bench's steps, does not run out)."""
    from tests.conftest import tiny_params, write_params

    params = tiny_params()
    params["train"]["default"].update(scheduler="onecycle", weight_ema=0.9)
    write_params(tmp_path, params)
    results, header = bench.run_bench(["an", "ignore"], tmp_path / "params.yaml", steps=3, warmup=2, num_classes=5,
                                      device="cpu", threads=1, batch_size=4, image_size=16)
    assert [r.method for r in results] == ["an", "ignore"] and all(len(r.times_ms) == 3 for r in results)
    assert header["batch"] == 4 and header["image_size"] == 16


def test_results_are_relative_to_an():
    rs = [bench.BenchResult("an", [10.0, 12.0, 11.0], 8), bench.BenchResult("ignore", [25.0, 24.0, 26.0], 8)]
    text = bench.format_results(rs)
    assert "2.27x" in text and "727.3 img/s" in text  # 25/11; 8 images in 11 ms
    rs[1].page_faults = [0, 0, 0, 9000]  # a steady step faults nothing; one refill in four
    assert re.search(r"ignore .* 0 page faults/step \(mean +2250\)", bench.format_results(rs))


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_cached_host_memory_leaves_ignore_steps_without_page_faults(tmp_path):
    """The synthetic model at its real size (64 px, batch 32): with glibc's defaults IGNORE's step page-faults
    its activations in again (thousands of faults a step); with the cache, steady-state steps fault ~never."""
    out = spml_without((), "bench", "step", "--method", "an", "--method", "ignore", "--steps", "10", "--warmup", "4",
                       "--device", "cpu", "--threads", "1", "--host-allocator", "glibc", "--host-malloc-cache",
                       "--params", str(REPO / "params.yaml"), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "host_malloc=cache" in out.stdout.splitlines()[0]
    faults = {ln.split()[0]: float(re.search(r"(\d+) page faults/step", ln).group(1))
              for ln in out.stdout.splitlines()[1:]}
    assert set(faults) == {"an", "ignore"} and faults["ignore"] < 200, out.stdout


JEMALLOC = host.find_allocator("jemalloc")


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_the_spml_command_preloads_jemalloc_and_ignore_steps_fault_no_pages(tmp_path):
    """The command re-executes itself once with jemalloc preloaded (params runtime.host_allocator: auto), says so
    on stderr and in the header, and IGNORE's steady-state steps fault ~no pages; --host-allocator glibc keeps
    glibc (no re-exec)."""
    out = spml_without((), "bench", "step", "--method", "an", "--method", "ignore", "--steps", "10", "--warmup", "4",
                       "--device", "cpu", "--threads", "1", "--params", str(REPO / "params.yaml"), cwd=tmp_path,
                       timeout=300)
    assert out.returncode == 0, out.stderr
    assert "host_malloc=jemalloc" in out.stdout.splitlines()[0]
    assert f"host memory: jemalloc ({JEMALLOC[1]})" in out.stderr and out.stderr.count("host memory:") == 1
    faults = {ln.split()[0]: float(re.search(r"(\d+) page faults/step", ln).group(1))
              for ln in out.stdout.splitlines()[1:]}
    assert set(faults) == {"an", "ignore"} and faults["ignore"] < 200, out.stdout
    out = spml_without((), "bench", "step", "--method", "an", *TINY, "--host-allocator", "glibc", "--params",
                       str(REPO / "params.yaml"), cwd=tmp_path)
    assert out.returncode == 0 and "host_malloc=cache" in out.stdout.splitlines()[0], out.stderr
    assert "host memory: glibc malloc, cache" in out.stderr


def test_cli_bench_loader_prints_images_per_second_for_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for place in ("loader", "device"):
        result = CliRunner().invoke(app, ["bench", "loader", "--augment-on", place, "--num-workers", "0",
                                          "--params", REPO / "params.yaml"] + TINY)
        assert result.exit_code == 0, result.output
        header, line = result.output.splitlines()[-2:]
        assert f"augment_on={place}" in header and "views=weak+strong" in header and "workers=0" in header
        assert re.search(r"^loader +augment_on=\w+ +\d+\.\d\d ms/batch +\d+\.\d img/s delivered$", line), line


def test_cache_host_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))
    assert host.cache_host_memory() is False
    monkeypatch.setattr(host.platform, "system", lambda: "Darwin")
    assert host.cache_host_memory() is False


def test_the_tools_know_which_block_each_setting_is_in():
    """pipeline/tools/settings.py spells the runtime keys out (it must not import torch): they are the runtime
    block's, and an option's key maps to the block that holds it."""
    import dataclasses

    from pipeline.run_config import RuntimeConfig
    from pipeline.tools import settings

    assert settings.RUNTIME_KEYS == {field.name for field in dataclasses.fields(RuntimeConfig)}
    assert settings.params_key("num_workers") == "runtime.num_workers"
    assert settings.params_key("image_size") == "train.image_size"
    assert settings.params_overlay({"threads": 1, "epochs": 2}) == {"runtime": {"threads": 1},
                                                                     "train": {"default": {"epochs": 2}}}
    run = bench.bench_configs(load_params(REPO / "params.yaml"), "synthetic", ["an"], 0,
                              overrides={"num_workers": 3, "batch_size": 4})[0]
    assert (run.runtime.num_workers, run.train.batch_size) == (3, 4)
    assert settings.setting(run, "num_workers") == 3 and settings.setting(run, "batch_size") == 4
