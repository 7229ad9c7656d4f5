"""Issue 16: hostile inputs. Each test is named after the issue's point it reproduces (p02, p05, ...).

A refused input must give exactly one line on stderr (``error: ...``), exit code 2 and write nothing;
nothing stale may be reused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Range, parse_dataclass
from pipeline.data import cached_images
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir, atomic_file, write_text
from pipeline.runtime import host
from pipeline.tables import read_label_table, write_label_table
from pipeline.run_config import TrainConfig, resolve_run_config
from tests.conftest import tiny_params, write_params

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> str:
    """Exit 2, exactly one non-empty output line starting with ``error:``, holding every fragment."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def set_param(params: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return params


DELETE = object()


def _images(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


# ----------------------------------------------------------------------------------- 2. the image cache


def test_p02_replaced_image_with_the_same_name_rebuilds_the_cache(tmp_path):
    root, cache_dir = tmp_path / "raw", tmp_path / "cache"
    names = _images(root, 4)
    first = cached_images(root, names, 16, cache_dir, "labels-v1")
    old_pixels = np.load(first)[2].copy()
    # regenerate one image under the same name (new pixels; its mtime moves on as a rewrite's does)
    stat = (root / "img2.png").stat()
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(root / "img2.png")
    os.utime(root / "img2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = cached_images(root, names, 16, cache_dir, "labels-v1")
    assert second != first
    served = np.load(second)[2]
    assert not np.array_equal(served, old_pixels) and (served == 7).all()  # the new pixels are served
    assert not first.exists()  # the stale cache of the same images is gone
    # the label table's source hash is part of the key too
    assert cached_images(root, names, 16, cache_dir, "labels-v2") != second


def test_p02_training_uses_regenerated_images(tiny_workspace):
    params = yaml.safe_load(Path("params.yaml").read_text())
    run = resolve_run_config(params, "synthetic", "an", 0)
    from pipeline.train import load_run_data

    before = load_run_data("synthetic", run.train, False, False, 0).train.images
    before_sum = int(before[0].sum())
    table = read_label_table("data/prepared/synthetic.parquet")
    first = Path(table.meta["image_root"]) / table.path[table.rows("train")[0]]
    stat = first.stat()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = load_run_data("synthetic", run.train, False, False, 0).train.images
    assert after.path != before.path
    assert int(after[0].sum()) == 0 and before_sum > 0
    assert not before.path.exists()  # the stale cache is deleted, so it cannot be served again


# ------------------------------------------------------------------------------- 5. out-of-range values

OUT_OF_RANGE = [  # (dotted param, value, stage args, fragment of the message)
    ("train.default.lr", 0, ("train", "synthetic", "an"), "params train.lr must be > 0, got 0"),
    ("train.default.lr", -0.1, ("train", "synthetic", "an"), "params train.lr must be > 0"),
    ("train.default.lr", float("nan"), ("train", "synthetic", "an"), "params train.lr must be a finite number"),
    ("train.default.lr", float("inf"), ("train", "synthetic", "an"), "params train.lr must be a finite number"),
    ("train.default.weight_decay", float("nan"), ("train", "synthetic", "an"), "train.weight_decay must be a finite"),
    ("train.default.batch_size", 0, ("train", "synthetic", "an"), "params train.batch_size must be >= 1, got 0"),
    ("train.default.eval_batch_size", 0, ("train", "synthetic", "an"), "params train.eval_batch_size must be >= 1"),
    ("runtime.num_workers", -1, ("train", "synthetic", "an"), "params runtime.num_workers must be >= 0"),
    ("train.default.epochs", 0, ("train", "synthetic", "an"), "params train.epochs must be >= 1, got 0"),
    ("train.default.epochs", -3, ("train", "synthetic", "an"), "params train.epochs must be >= 1"),
    ("train.default.image_size", 3, ("train", "synthetic", "an"), "params train.image_size must be >= 16, got 3"),
    ("train.default.strong_magnitude", 31, ("train", "synthetic", "an"), "train.strong_magnitude must be >= 0 and <= 30"),
    ("train.default.onecycle_pct_start", 1.0, ("train", "synthetic", "an"), "train.onecycle_pct_start must be > 0 and < 1"),
    ("runtime.threads", 0, ("train", "synthetic", "an"), "params runtime.threads must be >= 1, got 0"),
    ("models.smallcnn.width", 0, ("train", "synthetic", "an"), "params models.smallcnn.width must be >= 1, got 0"),
    ("data.synthetic.image_size", 2, ("download", "synthetic"), "params data.synthetic.image_size must be >= 16"),
    ("data.synthetic.num_train", 0, ("download", "synthetic"), "params data.synthetic.num_train must be >= 2"),
    ("data.synthetic.cooccurrence_prob", 1.5, ("download", "synthetic"), "data.synthetic.cooccurrence_prob must be"),
    ("data.synthetic.frequency_decay", float("nan"), ("download", "synthetic"), "frequency_decay must be a finite"),
    ("split.val_fraction", 0.0, ("prepare", "synthetic"), "params split.val_fraction must be > 0 and < 1, got 0.0"),
    ("split.val_fraction", float("nan"), ("prepare", "synthetic"), "params split.val_fraction must be a finite"),
    ("split.seed", -1, ("prepare", "synthetic"), "params split.seed must be >= 0"),
    ("sample.seed", 2**40, ("sample", "synthetic"), "params sample.seed must be >= 0 and <= 4294967295"),
    ("sample.num_negatives", -1, ("sample", "synthetic"), "params sample.num_negatives must be >= 0"),
]


@pytest.mark.parametrize("dotted, value, args, fragment", OUT_OF_RANGE)
def test_p05_out_of_range_values(tiny_workspace, dotted, value, args, fragment):
    params = yaml.safe_load(Path("params.yaml").read_text())
    write_params(tiny_workspace, set_param(params, dotted, value))
    before = {p: p.stat().st_mtime_ns for p in Path("data").rglob("*") if p.is_file()}
    assert_refused(invoke(*args), fragment)
    assert not Path("runs").exists()
    assert {p: p.stat().st_mtime_ns for p in Path("data").rglob("*") if p.is_file()} == before  # nothing written


@dataclass
class Knobs:
    rate: Annotated[float, Range(gt=0, le=1)]
    limit: Annotated[float, Range(ge=0)] | None
    free: float = 0.5  # a default keeps a key optional (method Params rely on it)


def test_p05_range_mechanism_checks_optional_and_every_float():
    assert parse_dataclass(Knobs, {"rate": 1, "limit": None}, "k") == Knobs(1.0, None, 0.5)
    for values, fragment in (({"rate": 1.5, "limit": None}, "params k.rate must be > 0 and <= 1, got 1.5"),
                             ({"rate": 0.5, "limit": -1}, "params k.limit must be >= 0, got -1.0"),
                             ({"rate": 0.5, "limit": None, "free": float("-inf")}, "params k.free must be a finite")):
        with pytest.raises(SpmlError, match=fragment.replace(".", r"\.")):
            parse_dataclass(Knobs, values, "k")


# ---------------------------------------------------------------------------- 6. no silent code defaults

MISSING = [  # (dotted param deleted, stage args, message)
    ("train.default.epochs", ("train", "synthetic", "an"), "error: params train.epochs is missing; add it to params.yaml"),
    ("train.default.model", ("train", "synthetic", "an"), "error: params train.model is missing; add it to params.yaml"),
    ("models.smallcnn.width", ("train", "synthetic", "an"), "params models.smallcnn.width is missing"),
    ("split.seed", ("prepare", "synthetic"), "error: params split.seed is missing; add it to params.yaml"),
    ("sample.num_positives", ("sample", "synthetic"), "error: params sample.num_positives is missing"),
    ("data.synthetic.num_train", ("download", "synthetic"), "error: params data.synthetic.num_train is missing"),
]


@pytest.mark.parametrize("dotted, args, message", MISSING)
def test_p06_missing_key_is_named(tiny_workspace, dotted, args, message):
    params = yaml.safe_load(Path("params.yaml").read_text())
    write_params(tiny_workspace, set_param(params, dotted, DELETE))
    raw = sorted(Path("data/raw/synthetic").rglob("*"))
    assert_refused(invoke(*args), message)
    assert sorted(Path("data/raw/synthetic").rglob("*")) == raw and not Path("runs").exists()


@pytest.mark.parametrize("args, names", [
    (("train", "synthetic", "an"), "params train.model is missing"),
    (("prepare", "synthetic"), "params split.val_fraction, split.seed are missing; add them to params.yaml"),
    (("sample", "synthetic"), "params sample.seed, sample.num_positives, sample.num_negatives are missing"),
    (("download", "synthetic"), "data.synthetic.num_train, data.synthetic.num_test, data.synthetic.image_size"),
])
def test_p06_empty_params_file_fails_cleanly(tiny_workspace, args, names):
    Path("params.yaml").write_text("")
    annotations = Path("data/raw/synthetic/annotations.json")
    mtime = annotations.stat().st_mtime_ns
    assert_refused(invoke(*args), names)
    assert annotations.stat().st_mtime_ns == mtime  # the existing data was not regenerated
    assert not Path("runs").exists()


def test_p06_every_value_comes_from_params_yaml():
    """TrainConfig has no code defaults, and the repository's params.yaml sets every field it needs."""
    import dataclasses

    from pipeline.datasets.synthetic import SyntheticParams
    from pipeline.models.efficientnet_lite0 import EfficientNetLite0CAM
    from pipeline.models.small_cnn import SmallCNN
    from pipeline.pretrain import PretrainParams
    from pipeline.sampling import SampleParams, SplitParams

    for cls in (TrainConfig, SyntheticParams, SplitParams, SampleParams, PretrainParams, SmallCNN.Params,
                EfficientNetLite0CAM.Params):
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls)), cls
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    run = resolve_run_config(params, "synthetic", "an", 0)
    assert run.train.epochs == params["train"]["default"]["epochs"]
    assert run.model_kwargs == {"width": 24, "weights": "pretrained"}


# --------------------------------------------------------------------------------- 7. impossible labels


@pytest.mark.parametrize("value, stage, fragment", [
    (2, ("train", "synthetic", "an"), "has labels values [2] (allowed: 0, 1)"),
    (-1, ("sample", "synthetic"), "has labels values [-1] (allowed: 0, 1)"),
    (0, ("sample", "synthetic"), "its 96 train rows have no positive label at all"),
])
def test_p07_impossible_labels_in_the_prepared_table(tiny_workspace, value, stage, fragment):
    table = read_label_table("data/prepared/synthetic.parquet")
    if value == 0:
        table.labels[table.rows("train")] = 0
    else:
        table.labels[5, 0] = value
    from pipeline import tables

    tables.write_table("data/prepared/synthetic.parquet", table, "labels")  # as a foreign writer could
    sampled = Path("data/sampled/synthetic.parquet").read_bytes()
    assert_refused(invoke(*stage), "label table data/prepared/synthetic.parquet", fragment)
    assert Path("data/sampled/synthetic.parquet").read_bytes() == sampled and not Path("runs").exists()
    with pytest.raises(SpmlError, match="label table of synthetic"):  # and our writer refuses to write it
        write_label_table(Path("x.parquet"), table)
    assert not Path("x.parquet").exists()


def test_p07_num_positives_zero_is_refused(tiny_workspace):
    params = set_param(yaml.safe_load(Path("params.yaml").read_text()), "sample.num_positives", 0)
    write_params(tiny_workspace, params)
    assert_refused(invoke("sample", "synthetic"), "params sample.num_positives must be >= 1, got 0")


def _formatted(folder: Path, images_root: Path, train_names=None, train_labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    images_root.mkdir(parents=True, exist_ok=True)
    for phase, n in (("train", 6), ("val", 3)):
        names = [f"{phase}_{k}.png" for k in range(n)]
        for name in names:
            Image.new("RGB", (8, 8)).save(images_root / name)
        labels = np.eye(n, 3)
        labels[:, 0] = 1
        if phase == "train" and train_names is not None:
            names = train_names
        if phase == "train" and train_labels is not None:
            labels = train_labels
        np.save(folder / f"formatted_{phase}_images.npy", np.asarray(names, dtype=str))
        np.save(folder / f"formatted_{phase}_labels.npy", labels)


IMPORTS = [  # (train image names, train labels, fragment)
    ([], np.zeros((0, 3)), "formatted_train_images.npy lists no images (0 rows)"),
    (None, np.zeros((6, 0)), "formatted_train_labels.npy has 0 classes (shape (6, 0))"),
    (["../outside.png"] + [f"train_{k}.png" for k in range(1, 6)], None, "leave the image root with '..' (e.g. ../outside.png)"),
    (["/etc/passwd"] + [f"train_{k}.png" for k in range(1, 6)], None, "are absolute or leave the image root"),
    (None, np.where(np.eye(6, 3) > 0, np.nan, 1.0), "must hold only 0/1 labels, found [nan]"),
]


@pytest.mark.parametrize("names, labels, fragment", IMPORTS)
def test_p07_import_npy_refuses_impossible_input(workspace, tmp_path, names, labels, fragment):
    _formatted(tmp_path / "npy", tmp_path / "imgs", names, labels)
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine", "--images", tmp_path / "imgs")
    assert_refused(result, fragment)
    assert not Path("data/imported.json").exists() and not Path("data/raw/mine").exists()


def test_p07_markup_in_messages_is_printed_verbatim():
    import typer

    from pipeline.cli import _run

    def fail():
        raise SpmlError("found [nan] and [red]x[/red]")

    import io

    from pipeline import cli

    buffer = io.StringIO()
    console = cli.err
    cli.err = type(console)(file=buffer, no_color=True)
    try:
        with pytest.raises(typer.Exit):
            _run(fail)
    finally:
        cli.err = console
    assert buffer.getvalue() == "error: found [nan] and [red]x[/red]\n"


# ------------------------------------------------------------------------------------ 10. small but real


def test_p10_float_written_as_1e_3_is_accepted(tiny_workspace):
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("lr: 0.003", "lr: 1e-3"))
    params = yaml.safe_load(Path("params.yaml").read_text())
    assert params["train"]["default"]["lr"] == "1e-3"  # what YAML 1.1 makes of it
    assert resolve_run_config(params, "synthetic", "an", 0).train.lr == 0.001
    set_param(params, "train.default.lr", "fast")
    with pytest.raises(SpmlError, match="params train.lr must be float > 0, got 'fast'"):
        resolve_run_config(params, "synthetic", "an", 0)


def test_p10_bad_literal_lists_the_choices(tiny_workspace):
    params = set_param(yaml.safe_load(Path("params.yaml").read_text()), "train.default.optimizer", "sgd")
    write_params(tiny_workspace, params)
    assert_refused(invoke("train", "synthetic", "an"), "params train.optimizer must be one of adam, adamw, got 'sgd'")


def test_p10_empty_from_folder_names_the_users_folder(workspace, tmp_path):
    empty = tmp_path / "empty-voc"
    empty.mkdir()
    line = assert_refused(invoke("download", "voc2012", "--source", empty), f"--source {empty} is an empty folder")
    assert ".tmp-" not in line and not Path("data/raw/voc2012").exists()
    (empty / "readme.txt").write_text("not VOC")  # not empty, but not VOC either: still the user's folder
    line = assert_refused(invoke("download", "voc2012", "--source", empty), str(empty))
    assert ".tmp-" not in line and not Path("data/raw/voc2012").exists()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_p10_outputs_get_the_umask_default_mode(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "out.txt", "x")
        with atomic_file(tmp_path / "a.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.zeros(2))
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "metrics.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "run").stat().st_mode & 0o777 == dir_mode


# ------------------------------------------------------------------------------------- 11. under load


@pytest.mark.parametrize("cpu_max, v1, expected", [
    ("max 100000\n", None, None),  # no quota: the affinity mask
    ("150000 100000\n", None, 2),  # 1.5 CPUs of quota: 2 threads
    ("100000 100000\n", None, 1),
    (None, ("50000", "100000"), 1),  # cgroup v1
    (None, ("-1", "100000"), None),  # v1 without quota
])
def test_p11_usable_cpus_reads_affinity_and_cgroup_quota(tmp_path, cpu_max, v1, expected):
    affinity = len(os.sched_getaffinity(0))
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    assert host.usable_cpus(tmp_path) == (affinity if expected is None else min(affinity, expected))


def test_p11_usable_cpus_follows_the_affinity_mask(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert host.usable_cpus(tmp_path) == 5
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert host.usable_cpus(tmp_path) == 3


def test_p11_thread_count_precedence():
    assert host.torch_threads(3, {}) == 3
    assert host.torch_threads(3, {"SPML_THREADS": "1"}) == 1  # the launcher of side-by-side runs wins
    assert host.torch_threads(None, {}) == host.usable_cpus()
    with pytest.raises(SpmlError, match="SPML_THREADS='0' must be a positive integer"):
        host.torch_threads(None, {"SPML_THREADS": "0"})


def test_p11_fit_applies_the_thread_count(tiny_workspace):
    import torch

    params = set_param(yaml.safe_load(Path("params.yaml").read_text()), "runtime.threads", 1)
    set_param(params, "train.default.epochs", 1)
    write_params(tiny_workspace, params)
    before = torch.get_num_threads()
    try:
        result = invoke("train", "synthetic", "an")
        assert result.exit_code == 0, result.output
        assert json.loads(Path("runs/synthetic/an/0/metrics.json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_p11_bench_parallel_prints_both_wall_times(tmp_path, monkeypatch):
    from pipeline.config import deep_merge
    from pipeline.tools import bench_parallel
    from pipeline.tools.settings import params_overlay

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    tiny = deep_merge({"data": {"synthetic": {"num_train": 24, "num_test": 8, "image_size": 16, "seed": 0}},
                       "train": {"default": {"model": "smallcnn", "epochs": 1, "batch_size": 8, "eval_batch_size": 16,
                                             "image_size": 16}},
                       "models": {"smallcnn": {"width": 4, "weights": "none"}}},
                      params_overlay({"num_workers": 0, "threads": None}))
    monkeypatch.setattr(bench_parallel, "PARALLEL_WORKLOAD", tiny)
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", "parallel", "2", "--threads", "1", "--params", repo_params)
    assert result.exit_code == 0, result.output
    rows = [ln for ln in result.output.splitlines() if not ln.startswith("#")]
    assert rows[0].startswith("one after another") and "wall" in rows[0] and "threads per training" in rows[0]
    assert rows[2].startswith("side by side, SPML_THREADS=1") and rows[2].endswith("[1, 1]")
    assert "side by side, auto" in rows[1]
    assert_refused(invoke("bench", "parallel", "0", "--params", repo_params), "bench parallel 0")


def test_p11_params_yaml_documents_the_threads_knob():
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    assert "threads: null" in text and "SPML_THREADS" in text
    assert tiny_params()["runtime"]["threads"] is None
