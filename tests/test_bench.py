"""`spml bench`: tiny smoke runs (no timing assertions), and the bench resolving what `spml train` resolves."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import bench
from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import SpmlError
from pipeline.runtime import host
from pipeline.run_config import resolve_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "4", "--image-size", "16", "--steps", "2", "--warmup", "1", "--num-classes", "5",
        "--device", "cpu", "--threads", "1"]


def test_cli_bench_prints_one_line_per_method_with_ratio(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--methods", "an,ignore", "--params", REPO / "params.yaml"] + TINY)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if not ln.startswith("#")]
    assert [ln.split()[0] for ln in lines] == ["an", "ignore"]
    assert re.search(r"\b1\.00x vs an", lines[0]) and re.search(r"\d+\.\d\dx vs an", lines[1])
    assert "ms/step" in lines[1] and "img/s" in lines[1] and "saved-for-backward" in lines[1]


def test_bench_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--methods", "an"] + TINY)  # no params.yaml here
    assert result.exit_code == 2 and "params file params.yaml does not exist" in " ".join(
        result.output.split()) and "pass --params" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an,nope", "--params", REPO / "params.yaml"] + TINY)
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an", "--host-malloc", "nope", "--params", REPO / "params.yaml"]
                                 + TINY)
    assert result.exit_code == 2 and "--host-malloc 'nope': use jemalloc, tcmalloc, cache or system" in result.output
    result = CliRunner().invoke(app, ["bench", "--loader", "--augment-on", "gpu", "--params", REPO / "params.yaml"]
                                 + TINY)
    assert result.exit_code == 2 and "--augment-on 'gpu': use loader or device" in result.output
    result = CliRunner().invoke(app, ["bench", "--workers", "2", "--params", REPO / "params.yaml"] + TINY)
    assert result.exit_code == 2 and "--workers and --augment-on set the input-pipeline bench; add --loader" in \
        result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an", "--prepare", "voc2012", "--params", REPO / "params.yaml"]
                                 + TINY)
    assert result.exit_code == 2 and "--prepare supports coco2014 only" in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an", "--image-size", "8", "--params", REPO / "params.yaml"]
                                 + TINY[:2] + TINY[4:])
    assert result.exit_code == 2 and "--image-size must be >= 16" in result.output


# What the GPU machine lacks (docs/bench-gpu.md); typer, rich and pyyaml are installed there for `spml bench`.
ABSENT_ON_GPU_MACHINE = ("dvc", "pycocotools", "pyarrow", "pandas", "sklearn")


def spml_without(absent: tuple[str, ...], *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` in a fresh process in which importing any of ``absent`` fails."""
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({absent!r})); sys.argv = ['spml', *sys.argv[1:]]; "
            "runpy.run_module('pipeline.cli', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, check=False, capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(REPO), "PATH": "", "SPML_NO_PROGRESS": "1"})


def test_cli_bench_runs_without_dvc_pycocotools_pyarrow_pandas_sklearn(tmp_path):
    out = spml_without(ABSENT_ON_GPU_MACHINE, "bench", "--methods", "an,an-cons", "--params",
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
    out = spml_without((), "bench", "--methods", "an,ignore", "--steps", "10", "--warmup", "4", "--device", "cpu",
                       "--threads", "1", "--host-malloc", "cache", "--params", str(REPO / "params.yaml"),
                       cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "host_malloc=cache" in out.stdout.splitlines()[0]
    faults = {ln.split()[0]: float(re.search(r"(\d+) page faults/step", ln).group(1))
              for ln in out.stdout.splitlines()[1:]}
    assert set(faults) == {"an", "ignore"} and faults["ignore"] < 200, out.stdout


JEMALLOC = host.find_allocator("jemalloc")


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_the_spml_command_preloads_jemalloc_and_ignore_steps_fault_no_pages(tmp_path):
    """The command re-executes itself once with jemalloc preloaded (params train.host_allocator: auto), says so
    on stderr and in the header, and IGNORE's steady-state steps fault ~no pages; --host-malloc cache keeps
    glibc (no re-exec)."""
    out = spml_without((), "bench", "--methods", "an,ignore", "--steps", "10", "--warmup", "4", "--device", "cpu",
                       "--threads", "1", "--params", str(REPO / "params.yaml"), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "host_malloc=jemalloc" in out.stdout.splitlines()[0]
    assert f"host memory: jemalloc ({JEMALLOC[1]})" in out.stderr and out.stderr.count("host memory:") == 1
    faults = {ln.split()[0]: float(re.search(r"(\d+) page faults/step", ln).group(1))
              for ln in out.stdout.splitlines()[1:]}
    assert set(faults) == {"an", "ignore"} and faults["ignore"] < 200, out.stdout
    out = spml_without((), "bench", "--methods", "an", *TINY, "--host-malloc", "cache", "--params",
                       str(REPO / "params.yaml"), cwd=tmp_path)
    assert out.returncode == 0 and "host_malloc=cache" in out.stdout.splitlines()[0], out.stderr
    assert "host memory: glibc malloc, cache" in out.stderr


def test_cli_bench_loader_prints_images_per_second_for_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for place in ("loader", "device"):
        result = CliRunner().invoke(app, ["bench", "--loader", "--augment-on", place, "--workers", "0",
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
