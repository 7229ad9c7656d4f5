"""`spml bench` / `python -m pipeline.bench`: tiny smoke runs (no timing assertions)."""

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
from pipeline.runtime import host

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
    assert result.exit_code == 2 and "params models.smallcnn.width, models.smallcnn.weights are missing" in " ".join(
        result.output.split()) and "pass --params" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an,nope", "--params", REPO / "params.yaml"] + TINY)
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an", "--host-malloc", "jemalloc", "--params", REPO / "params.yaml"]
                                 + TINY)
    assert result.exit_code == 2 and "--host-malloc 'jemalloc': use cache or system" in result.output
    result = CliRunner().invoke(app, ["bench", "--methods", "an", "--prepare", "voc2012", "--params", REPO / "params.yaml"]
                                 + TINY)
    if not (REPO / "pipeline" / "bench_prepare.py").exists():
        assert result.exit_code == 2 and "bench_prepare" in result.output


def test_module_entry_point_runs_without_typer(tmp_path):
    code = ("import sys; sys.modules['typer'] = None; sys.modules['dvc'] = None; "
            "from pipeline.bench import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--methods", "an,an-cons", "--params", str(REPO / "params.yaml")]
                         + TINY, cwd=tmp_path, check=False,
                         capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "an-cons" in out.stdout and "x vs an" in out.stdout


def test_results_are_relative_to_an():
    rs = [bench.BenchResult("an", [10.0, 12.0, 11.0], 8), bench.BenchResult("ignore", [25.0, 24.0, 26.0], 8)]
    text = bench.format_results(rs)
    assert "2.27x" in text and "727.3 img/s" in text  # 25/11; 8 images in 11 ms


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_cached_host_memory_leaves_ignore_steps_without_page_faults(tmp_path):
    """The synthetic model at its real size (64 px, batch 32): with glibc's defaults IGNORE's step page-faults
    its activations in again (thousands of faults a step); with the cache, steady-state steps fault ~never."""
    code = "import sys; from pipeline.bench import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "--methods", "an,ignore", "--steps", "10", "--warmup", "4",
                          "--device", "cpu", "--threads", "1", "--host-malloc", "cache",
                          "--params", str(REPO / "params.yaml")], cwd=tmp_path, check=False,
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "host_malloc=cache" in out.stdout.splitlines()[0]
    faults = {ln.split()[0]: float(re.search(r"(\d+) page faults/step", ln).group(1))
              for ln in out.stdout.splitlines()[1:]}
    assert set(faults) == {"an", "ignore"} and faults["ignore"] < 200, out.stdout


def test_cache_host_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))
    assert host.cache_host_memory() is False
    monkeypatch.setattr(host.platform, "system", lambda: "Darwin")
    assert host.cache_host_memory() is False
