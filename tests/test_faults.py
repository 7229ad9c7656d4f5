"""Hostile input and faults (issue 16): each test reproduces one catalogue point and checks the fixed
behaviour: one ``error:`` line and exit code 2, nothing written, nothing of the user's deleted, no stale
state reused. Tests are named after their point (p01, p03, ...)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
import yaml
from real_fixtures import make_voc
from test_download import archive_for, server  # noqa: F401 - `server` is a fixture used below
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets import coco2014, cub, voc2012
from pipeline.download import fetch
from pipeline.errors import SpmlError
from pipeline.io import write_json
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import Checkpoint
from stages import sample as sample_stage
from stages import train as train_stage
from tests.conftest import tiny_params, write_params
from tests.helpers import assert_one_line_error, set_params

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})
VOLATILE = {"train_seconds", "epoch_seconds"}


class Killed(Exception):
    pass


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (files with their bytes, folders as None): to prove nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------------- p01


@pytest.mark.parametrize("case", ["foreign-folder", "file", "cwd", "parent", "project-abs", "symlink"])
def test_p01_out_refuses_foreign_folder(tiny_workspace, tmp_path_factory, case):
    set_params(tiny_workspace, epochs=1)
    elsewhere = tmp_path_factory.mktemp("user")
    (elsewhere / "thesis.tex").write_text("years of work")
    out, fragment = {
        "foreign-folder": (elsewhere, "holds files that are not a run's"),
        "file": (elsewhere / "thesis.tex", "is an existing file"),
        "cwd": (Path("."), "current folder"),
        "parent": (Path(".."), "current folder"),
        "project-abs": (tiny_workspace, "current folder"),
        "symlink": (Path("link"), "is a symlink"),
    }[case]
    if case == "symlink":
        Path("link").symlink_to(elsewhere, target_is_directory=True)
    before_here, before_user = tree(tiny_workspace), tree(elsewhere)
    result = invoke("train", "synthetic", "an", "--out", out)
    assert_one_line_error(result, f"output folder {out}", fragment)
    assert tree(tiny_workspace) == before_here  # params.yaml and data/ intact, no runs/ or .resume/ written
    assert tree(elsewhere) == before_user


def test_p01_out_refuses_foreign_folder_below_params_project(tiny_workspace, tmp_path_factory):
    """--params names the project: its folder is protected even when run from elsewhere."""
    set_params(tiny_workspace, epochs=1)
    other = tmp_path_factory.mktemp("cwd")
    os.chdir(other)
    result = invoke("train", "synthetic", "an", "--params", tiny_workspace / "params.yaml", "--out", tiny_workspace)
    assert_one_line_error(result, "project folder")
    assert (tiny_workspace / "params.yaml").exists() and (tiny_workspace / "data").is_dir()


def test_p01_out_replaces_only_our_run_folder(tiny_workspace):
    set_params(tiny_workspace, epochs=1)
    out = Path("runs/mine")
    assert invoke("train", "synthetic", "an", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(train_stage.RUN_FILES)
    first = json.loads((out / "metrics.json").read_text())
    # our own run folder is replaced as a whole (e.g. with another seed)
    assert invoke("train", "synthetic", "an", "--seed", "1", "--out", out).exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1 != first["seed"]
    # a run folder that has gained a user's file is no longer ours alone
    (out / "notes.md").write_text("mine")
    assert_one_line_error(invoke("train", "synthetic", "an", "--out", out), "not a run's (notes.md)")
    assert (out / "notes.md").read_text() == "mine" and (out / "metrics.json").exists()
    # only run file names, but a config.json that is not ours: refused as well
    foreign = Path("foreign")
    foreign.mkdir()
    (foreign / "config.json").write_text('{"lr": 1}')
    assert_one_line_error(invoke("train", "synthetic", "an", "--out", foreign), "not a run's (config.json")
    assert (foreign / "config.json").read_text() == '{"lr": 1}'


@pytest.mark.parametrize("resume_flag", ["--resume", "--no-resume"])
def test_p01_resume_dir_of_out_keeps_user_files(tiny_workspace, resume_flag):
    set_params(tiny_workspace, epochs=1)
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, Path("exp"))
    assert resume_dir == tiny_workspace / ".resume" / "exp"
    resume_dir.mkdir(parents=True)
    (resume_dir / "diary.txt").write_text("keep me")
    result = invoke("train", "synthetic", "an", "--out", "exp", resume_flag)
    assert_one_line_error(result, f"resume folder {resume_dir}", "diary.txt")
    assert (resume_dir / "diary.txt").read_text() == "keep me" and not Path("exp").exists()
    # a file where the .resume folder would go
    (resume_dir / "diary.txt").unlink()
    resume_dir.rmdir()
    resume_dir.parent.rmdir()
    Path(".resume").write_text("a user's file")
    assert_one_line_error(invoke("train", "synthetic", "an", "--out", "exp", resume_flag), ".resume is a file")
    assert Path(".resume").read_text() == "a user's file"


def test_p01_clear_resume_removes_only_checkpoints(tmp_path):
    folder = tmp_path / ".resume" / "run"
    folder.mkdir(parents=True)
    for name in ("last.pt", "best-e3.pt", ".last.pt.tmp-1-x", "best-notes.pt", "keep.txt"):
        (folder / name).write_text(name)
    assert checkpoint.foreign_resume_files(folder) == ["best-notes.pt", "keep.txt"]
    checkpoint.clear_resume(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["best-notes.pt", "keep.txt"]


# ---------------------------------------------------------------------------------------------------- p03


def _kill_after_first_epoch(monkeypatch, workspace: Path, out: Path) -> Path:
    original = Checkpoint.save

    def save_then_die(self, directory, fingerprint):
        original(self, directory, fingerprint)
        raise Killed  # as if the process were killed right after epoch 1's checkpoint

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train_stage.run("synthetic", "an", 0, out_dir=out)
    monkeypatch.setattr(Checkpoint, "save", original)
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, out)
    assert (resume_dir / "last.pt").exists()
    return resume_dir


def _record_loads(monkeypatch) -> list[int | None]:
    """Per Checkpoint.load call: the epoch it resumed after, or None where it started over."""
    loads: list[int | None] = []
    real_load = Checkpoint.load

    def load(self, *args):
        resumed = real_load(self, *args)
        loads.append(self.epoch if resumed else None)
        return resumed

    monkeypatch.setattr(Checkpoint, "load", load)
    return loads


def _read_run(folder: Path):
    metrics = {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if k not in VOLATILE}
    return metrics, pd.read_csv(folder / "history.csv").drop(columns=["epoch_seconds"])


def test_p03_resume_discarded_after_resampling(tiny_workspace, monkeypatch, capsys):
    params = set_params(tiny_workspace, epochs=2)
    out = tiny_workspace / "run"
    resume_dir = _kill_after_first_epoch(monkeypatch, tiny_workspace, out)
    sampled = Path("data/sampled/synthetic.parquet")
    old = sampled.read_bytes()
    params["sample"]["seed"] = 7
    write_params(tiny_workspace, params)
    sample_stage.run("synthetic")
    assert sampled.read_bytes() != old  # other observed labels: the checkpoint was trained on stale ones
    capsys.readouterr()

    loads = _record_loads(monkeypatch)
    train_stage.run("synthetic", "an", 0, out_dir=out)
    notice = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert loads == [None]
    assert len(notice) == 1 and "input tables (data/sampled/synthetic.parquet)" in notice[0]
    assert str(resume_dir / "last.pt") in notice[0]
    assert not resume_dir.exists()

    fresh = tiny_workspace / "fresh"
    train_stage.run("synthetic", "an", 0, out_dir=fresh)
    (m1, h1), (m2, h2) = _read_run(out), _read_run(fresh)
    assert m1 == m2
    pd.testing.assert_frame_equal(h1, h2, check_exact=True)


@pytest.mark.parametrize("change, words", [
    ("code", "the code (pipeline/)"),
    ("config", "the run config"),
    ("format", "the checkpoint format"),
])
def test_p03_resume_fingerprint_covers_code_config_and_format(tiny_workspace, monkeypatch, capsys, change, words):
    set_params(tiny_workspace, epochs=2)
    out = tiny_workspace / "run"
    resume_dir = _kill_after_first_epoch(monkeypatch, tiny_workspace, out)
    if change == "code":
        monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: "another-version")
    elif change == "config":
        set_params(tiny_workspace, epochs=2, lr=1e-3)
    else:  # a checkpoint written by the previous format, keyed by the config alone
        state = torch.load(resume_dir / "last.pt", weights_only=False)
        torch.save({**state, "fingerprint": state["fingerprint"]["config"], "format": 1}, resume_dir / "last.pt")
    capsys.readouterr()
    loads = _record_loads(monkeypatch)
    train_stage.run("synthetic", "an", 0, out_dir=out)
    assert loads == [None]
    assert words in capsys.readouterr().err


def test_p03_unchanged_run_still_resumes(tiny_workspace, monkeypatch, capsys):
    set_params(tiny_workspace, epochs=2)
    out = tiny_workspace / "run"
    _kill_after_first_epoch(monkeypatch, tiny_workspace, out)
    loads = _record_loads(monkeypatch)
    capsys.readouterr()
    train_stage.run("synthetic", "an", 0, out_dir=out)
    assert loads == [1]
    assert "notice:" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- p04


@pytest.mark.parametrize("lr, max_loss, fragment", [
    (1.0e4, 1.0e6, "(runtime.max_loss 1e+06)"),  # finite blow-up: losses reach ~1e18 at this lr
    (1.0e30, None, "loss nan"),                  # non-finite: it used to reach scikit-learn as a traceback
])
def test_p04_divergence_stops_with_epoch_and_step(tiny_workspace, lr, max_loss, fragment):
    set_params(tiny_workspace, epochs=2, lr=lr, max_loss=max_loss)
    before = tree(tiny_workspace)
    result = invoke("train", "synthetic", "an")
    text = assert_one_line_error(result, "training diverged at epoch 1, step ", fragment, "lower train.lr")
    assert "of 6:" in text  # 96 train rows / batch 16
    assert not [p for p in Path("runs").rglob("*") if p.is_file()]  # no metrics, no checkpoint
    ours = ("runs", "data/cache")  # the run's own folder (left empty) and the image cache it may rebuild
    assert ({k: v for k, v in tree(tiny_workspace).items() if not k.startswith(ours)}
            == {k: v for k, v in before.items() if not k.startswith(ours)})


def test_p04_non_finite_scores_at_evaluation(tiny_workspace, monkeypatch):
    import numpy as np

    from pipeline import train as train_mod

    set_params(tiny_workspace, epochs=1)
    real_predict = train_mod.predict

    def nan_predict(*args, **kwargs):
        scores, targets = real_predict(*args, **kwargs)
        scores[3, 2] = np.nan
        return scores, targets

    monkeypatch.setattr(train_mod, "predict", nan_predict)
    result = invoke("train", "synthetic", "an")
    assert_one_line_error(result, "training diverged at epoch 1, val evaluation", "1 of 24 images")
    assert not [p for p in Path("runs").rglob("*") if p.is_file()]


def test_p04_divergence_check_adds_no_host_sync_per_step(tiny_workspace, monkeypatch):
    """Host reads of tensors by the loop and the method in train_one_epoch do not grow with the number of
    steps (one divergence check per epoch). Not counted: the sampler and loader (host-side data by design)
    and torch's CPU Adam reading its CPU step counter; none of them is a device sync."""
    import sys

    from pipeline import train as train_mod

    counts = []
    inside = [False]
    real_epoch = train_mod.train_one_epoch
    package = Path(train_mod.__file__).parent
    watched = (str(package / "train.py"), str(package / "hidden_scoring.py"), str(package / "methods"))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            if inside[0] and sys._getframe(1).f_code.co_filename.startswith(watched):
                counts[-1] += 1
            return real(self, *args)
        return read

    def wrapped_epoch(*args, **kwargs):
        counts.append(0)
        inside[0] = True
        try:
            return real_epoch(*args, **kwargs)
        finally:
            inside[0] = False

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):  # every way to read a value on the host
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(train_mod, "train_one_epoch", wrapped_epoch)
    for batch_size in (48, 8):  # 2 and 12 steps
        set_params(tiny_workspace, epochs=1, batch_size=batch_size)
        train_stage.run("synthetic", "an", 0, out_dir=tiny_workspace / f"b{batch_size}")
    assert len(counts) == 2 and counts[0] == counts[1] and 2 <= counts[0] <= 4


def test_p04_max_loss_is_validated_and_in_params_yaml(tiny_workspace):
    repo_params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert repo_params["runtime"]["max_loss"] == 1.0e6
    set_params(tiny_workspace, max_loss=-1.0)
    assert_one_line_error(invoke("train", "synthetic", "an"), "params runtime.max_loss must be > 0")


# ---------------------------------------------------------------------------------------------------- p08


@pytest.fixture
def voc_folder(tmp_path, monkeypatch):
    """An extracted VOC folder (to pass to --source) and a workspace as cwd; returns (folder, outside file)."""
    folder = tmp_path / "voc"
    make_voc(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    work = tmp_path / "work"
    work.mkdir()
    write_params(work, tiny_params())
    monkeypatch.chdir(work)
    return folder, secret


@pytest.mark.parametrize("name, target, fragment", [
    ("escape.txt", "SECRET", "points outside the folder"),
    ("loop", "..", "points outside the folder"),
    ("VOCdevkit/up", "..", "link cycle"),
    ("self", ".", "link cycle"),
    ("a", "b", "link cycle"),  # a -> b -> a
    ("dangling.jpg", "nothing-here.jpg", "points to nothing"),
])
def test_p08_download_from_folder_refuses_links_leaving_it(voc_folder, name, target, fragment):
    folder, secret = voc_folder
    link = folder / name
    link.symlink_to(secret if target == "SECRET" else target)
    if name == "a":
        (folder / "b").symlink_to("a")
    result = invoke("download", "voc2012", "--source", folder)
    assert_one_line_error(result, f"the link {link}", fragment)
    assert not Path("data/raw/voc2012").exists() and not list(Path("data/raw").glob(".*tmp-*"))
    assert secret.stat().st_nlink == 1  # never hard-linked into data/raw


def test_p08_links_inside_the_folder_are_followed(voc_folder):
    folder, _ = voc_folder
    main = folder / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    (folder / "VOCdevkit" / "alias-main").symlink_to(main, target_is_directory=True)
    (folder / "VOCdevkit" / "cat.txt").symlink_to(main / "cat_train.txt")
    assert invoke("download", "voc2012", "--source", folder).exit_code == 0
    raw = Path("data/raw/voc2012/VOCdevkit")
    assert (raw / "cat.txt").read_bytes() == (main / "cat_train.txt").read_bytes()
    assert (raw / "alias-main" / "dog_val.txt").is_file() and not (raw / "cat.txt").is_symlink()


# ---------------------------------------------------------------------------------------------------- p09


def _blocker() -> Path:
    Path("somefile").write_text("a user's file")
    return Path("somefile/sub")


@pytest.mark.parametrize("case", ["params-dir", "train-out", "export-npy", "prepare-data-file", "sample-readonly"])
def test_p09_unwritable_places_and_bad_params_give_one_line(tiny_workspace, monkeypatch, case):
    set_params(tiny_workspace, epochs=1)
    sampled_before = Path("data/sampled/synthetic.parquet").read_bytes()
    if case == "params-dir":
        Path("conf").mkdir()
        result = invoke("prepare", "synthetic", "--params", "conf")
        fragments = ["params file conf is a folder"]
    elif case == "train-out":
        result = invoke("train", "synthetic", "an", "--out", _blocker())
        fragments = ["cannot write somefile/sub", "somefile is a file"]
    elif case == "export-npy":
        result = invoke("export-npy", "synthetic", _blocker() / "npy")
        fragments = ["cannot create folder somefile/sub/npy", "somefile is a file"]
    elif case == "prepare-data-file":  # data/prepared is a file where the folder should be
        for stale in Path("data/prepared").iterdir():
            stale.unlink()
        Path("data/prepared").rmdir()
        Path("data/prepared").write_text("x")
        result = invoke("prepare", "synthetic")
        fragments = ["data/prepared is a file"]
    else:  # a read-only data/sampled: tests run as root, so the refusal is simulated where it happens
        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
        result = invoke("sample", "synthetic")
        fragments = ["cannot write data/sampled/synthetic.parquet", "Permission denied"]
    assert_one_line_error(result, *fragments)
    assert Path("data/sampled/synthetic.parquet").read_bytes() == sampled_before
    assert not Path("runs").exists() and not list(Path(".").rglob(".*tmp-*"))
    if Path("somefile").exists():
        assert Path("somefile").read_text() == "a user's file"


GOOD_METRICS = {"dataset": "synthetic", "method": "an", "model": "smallcnn", "seed": 0, "protocol": "unified",
                "val_map": 50.0,
                "test_map": 40.0, "best_epoch": 1, "epochs": 2, "train_seconds": 3.0,
                "test_classes_without_positives": 0, "versions": {"torch": "2"}}


@pytest.mark.parametrize("content, fragments", [
    (json.dumps(GOOD_METRICS)[:60], ["is not readable JSON", "truncated or corrupt"]),
    (json.dumps({k: v for k, v in GOOD_METRICS.items() if k != "test_map"}), ["has no key 'test_map'"]),
    (json.dumps(GOOD_METRICS).replace("40.0", "NaN"), ["key 'test_map' is nan, not a finite number"]),
    (json.dumps(GOOD_METRICS).replace('"best_epoch": 1', '"best_epoch": null'), ["key 'best_epoch' is None"]),
    ("[1, 2]", ["must hold a JSON object"]),
])
def test_p09_aggregate_refuses_bad_metrics_json(workspace, content, fragments):
    from stages.aggregate import cell_config_sha256

    params = tiny_params() | {"datasets": ["synthetic"], "methods": ["an"], "seeds": [0]}
    write_params(workspace, params)
    metrics = Path("runs/synthetic/an/0/metrics.json")
    metrics.parent.mkdir(parents=True)
    good = GOOD_METRICS | {"config_sha256": cell_config_sha256(params)("synthetic", "an", 0)}  # the cell's run
    metrics.write_text(json.dumps(good))
    assert invoke("aggregate").exit_code == 0
    summary = Path("reports/summary.json").read_text()
    json.loads(summary, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    metrics.write_text(content)
    result = invoke("aggregate")
    assert_one_line_error(result, str(metrics), *fragments)
    assert Path("reports/summary.json").read_text() == summary  # the previous, valid summary is kept


def test_p09_write_json_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "summary.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- p12

# Hosts (and path prefixes) specs/datasets.md reports dead: CUB's vision.caltech.edu, the SPML Box link, the
# NUS-WIDE urls host. Its VOC section lists host.robots.ox.ac.uk (301 to thor.robots.ox.ac.uk), thor and
# data.pjreddie.com as the places to fetch from; pjreddie.com/media/files is only named as the mirror's older
# form and is reported dead or slow, so it must not come back either.
DEAD = {"www.vision.caltech.edu": "/", "caltech.box.com": "/", "dl.nextcenter.org": "/",
        "pjreddie.com": "/media/files/"}


@pytest.mark.parametrize("module", [voc2012, coco2014, cub])
def test_p12_mirror_lists_name_no_dead_host(module):
    for archive in module.ARCHIVES:
        assert archive.urls and len(set(archive.urls)) == len(archive.urls)
        for url in archive.urls:
            parsed = urlparse(url)
            assert not parsed.path.startswith(DEAD.get(parsed.hostname, "\0")), url
            assert parsed.path.rstrip("/").endswith(archive.filename.split("?")[0]) or "?download" in url, url
        assert len(archive.md5) == 32 and int(archive.md5, 16) >= 0


def test_p12_voc_mirrors_match_the_spec():
    hosts = [urlparse(u).hostname for u in voc2012.ARCHIVES[0].urls]
    assert hosts == ["host.robots.ox.ac.uk", "thor.robots.ox.ac.uk", "data.pjreddie.com"]
    assert voc2012.ARCHIVES[0].md5 == "6cd6e144f989b92b3379bac3b3de84fd"


def test_p12_every_mirror_goes_through_the_one_md5_check(server, tmp_path):  # noqa: F811 - fixture
    """A dead first mirror and a second one serving other bytes of the right size: refused, nothing kept."""
    good = os.urandom(5000)
    archive = archive_for(server, "VOCtrainval_11-May-2012.tar", good)
    server.files["/mirror/VOCtrainval_11-May-2012.tar"] = bytes(reversed(good))
    mirrors = (f"{server.base}/dead/VOCtrainval_11-May-2012.tar", f"{server.base}/mirror/VOCtrainval_11-May-2012.tar")
    with pytest.raises(SpmlError, match=f"checksum mismatch .* expected {archive.md5}"):
        fetch(archive, tmp_path, mirrors)
    assert not (tmp_path / archive.filename).exists()
    assert hashlib.md5(fetch(archive, tmp_path / "ok", mirrors[:1] + archive.urls).read_bytes()).hexdigest() \
        == archive.md5
