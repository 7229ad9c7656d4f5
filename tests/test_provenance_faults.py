"""Issue 24, "no silent wrong number, round three": catalogue points 13-19 of docs/robustness.md.

Each test replays one case of the issue as a user would hit it (tiny configs) and checks the fixed behaviour:
the uninterrupted run's numbers or a clean restart, or one ``error:`` line with exit code 2 that names the
thing, with the previous outputs intact and nothing left that a later run would take as done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline import tables
from pipeline.cli import app
from pipeline.errors import SpmlError
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import Checkpoint
from pipeline.tables import read_label_table
from stages import train as train_stage
from tests.conftest import tiny_params, write_params
from tests.helpers import assert_one_line_error, set_params

runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})
VOLATILE = {"train_seconds", "epoch_seconds"}


class Killed(Exception):
    pass


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_run(folder: Path):
    metrics = {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if k not in VOLATILE}
    history = pd.read_csv(folder / "history.csv").drop(columns=["epoch_seconds"])
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)["model"]
    return metrics, history, best


def assert_same_run(a: Path, b: Path) -> None:
    (m1, h1, s1), (m2, h2, s2) = read_run(a), read_run(b)
    assert m1 == m2
    pd.testing.assert_frame_equal(h1, h2, check_exact=True)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def kill_after_epoch(monkeypatch, epoch: int = 1):
    """From now on, the process "dies" right after the checkpoint of ``epoch`` is written."""
    original = Checkpoint.save

    def save_then_die(self, directory, fingerprint):
        original(self, directory, fingerprint)
        if self.epoch == epoch:
            raise Killed

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    return original


def interrupted_run(workspace: Path, monkeypatch, out: Path, epochs: int):
    """Train synthetic/an into ``out`` for ``epochs`` epochs and "die" after epoch 1's checkpoint; the kill stays
    patched in. Returns the real Checkpoint.save."""
    set_params(workspace, epochs=epochs)
    original = kill_after_epoch(monkeypatch)
    with pytest.raises(Killed):
        train_stage.run("synthetic", "an", 0, out_dir=out)
    return original


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------------- p13
# case 1: a stale best checkpoint was resumed


def test_p13_case1_replayed_gives_the_uninterrupted_run(tiny_workspace, monkeypatch, capsys):
    """X killed after epoch 1; params change; the rerun discards X and is killed after epoch 1 again; the
    same command once more must end like an uninterrupted run with the new params, never with X's weights.
    One epoch: epoch 1 stays the best epoch, as in the issue, where the old code then reported X's weights."""
    out = tiny_workspace / "run"
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, out)
    original = interrupted_run(tiny_workspace, monkeypatch, out, epochs=1)
    x_best = torch.load(resume_dir / "best-e1.pt", weights_only=True)["model"]

    set_params(tiny_workspace, epochs=1, lr=0.5)
    with pytest.raises(Killed):
        train_stage.run("synthetic", "an", 0, out_dir=out)
    assert "discarding the resume checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(Checkpoint, "save", original)
    train_stage.run("synthetic", "an", 0, out_dir=out)
    assert not resume_dir.exists()

    straight = tiny_workspace / "straight"
    train_stage.run("synthetic", "an", 0, out_dir=straight)
    assert_same_run(out, straight)
    best = read_run(out)[2]
    assert not all(torch.equal(best[k], x_best[k]) for k in x_best)  # not X's epoch-1 weights


def test_p13_case1_full_disk_path(tiny_workspace, monkeypatch):
    """The full-disk way to the same state: X's best-e1.pt left behind, the rerun's last.pt cut by a full disk.
    The failing run is one line; the next one ends like an uninterrupted run with the new params."""
    out = tiny_workspace / "run"
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, out)
    original = interrupted_run(tiny_workspace, monkeypatch, out, epochs=2)
    monkeypatch.setattr(Checkpoint, "save", original)
    set_params(tiny_workspace, epochs=2, lr=0.5)

    real_save = torch.save

    def disk_full_for_last(obj, f, *args, **kwargs):
        if ".last.pt" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_for_last)
    assert_one_line_error(invoke("train", "synthetic", "an", "--out", out), "no space left on the device",
                          str(resume_dir / "last.pt"))
    assert not out.exists()
    monkeypatch.setattr(torch, "save", real_save)

    train_stage.run("synthetic", "an", 0, out_dir=out)
    straight = tiny_workspace / "straight"
    train_stage.run("synthetic", "an", 0, out_dir=straight)
    assert_same_run(out, straight)


@pytest.mark.parametrize("damaged", ["best-e1.pt", "last.pt"])
def test_p13_truncated_checkpoint_is_discarded_with_a_notice(tiny_workspace, monkeypatch, capsys, damaged):
    """A truncated resume file used to be a traceback (best) or an error on every rerun (last) until .resume
    was deleted by hand: now the set is discarded with one notice and the run restarts cleanly."""
    out = tiny_workspace / "run"
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, out)
    original = interrupted_run(tiny_workspace, monkeypatch, out, epochs=2)
    monkeypatch.setattr(Checkpoint, "save", original)
    data = (resume_dir / damaged).read_bytes()
    (resume_dir / damaged).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    train_stage.run("synthetic", "an", 0, out_dir=out)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and f"{damaged} is unreadable" in notices[0] and "training from scratch" in notices[0]
    straight = tiny_workspace / "straight"
    train_stage.run("synthetic", "an", 0, out_dir=straight)
    assert_same_run(out, straight)


def test_p13_foreign_best_file_is_never_taken(tmp_path, capsys):
    """Unit level: a best file keyed by another fingerprint is not loaded, and a save overwrites it."""
    from tests.test_checkpoint import _checkpoint, _train

    fingerprint = {"config": "a", "inputs": {}, "code": "c"}
    other = {**fingerprint, "config": "b"}
    folder = tmp_path / "resume"
    foreign = _checkpoint(seed=0)
    _train(foreign, 1)
    foreign.epoch, foreign.best = 1, checkpoint.Best(10.0, 1, foreign.model.state_dict(), {})
    foreign.save(folder, other)
    ours = _checkpoint(seed=1)
    ours.epoch, ours.best = 1, checkpoint.Best(20.0, 1, ours.model.state_dict(), {})
    last = torch.load(folder / "last.pt", weights_only=False)
    ours.save(folder, fingerprint)  # X's best-e1.pt is there already: it must be replaced
    saved = torch.load(folder / "best-e1.pt", weights_only=True)
    assert saved["fingerprint"] == fingerprint
    assert all(torch.equal(saved["model"][k], v) for k, v in ours.model.state_dict().items())
    # X's last.pt beside our best file: refused as a set
    torch.save(last, folder / "last.pt")
    assert _checkpoint(seed=2).load(folder, fingerprint) is False
    assert not folder.exists() and "discarding" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- p14
# case 2: test images leaked into training


def formatted(folder: Path, images: Path, train: list[str], val: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for phase, names in (("train", train), ("val", val)):
        for name in names:
            if not (images / name).exists():
                Image.new("RGB", (8, 8), (len(name) * 9 % 255, 0, 0)).save(images / name)
        labels = np.zeros((len(names), 3))
        labels[:, 0] = 1
        labels[np.arange(len(names)), np.arange(len(names)) % 3] = 1
        np.save(folder / f"formatted_{phase}_images.npy", np.asarray(names, dtype=str))
        np.save(folder / f"formatted_{phase}_labels.npy", labels)


TRAIN_NAMES = [f"train_{k}.png" for k in range(6)]
VAL_NAMES = [f"val_{k}.png" for k in range(3)]


@pytest.mark.parametrize("train, val, fragment", [
    (TRAIN_NAMES, VAL_NAMES[:1] + TRAIN_NAMES[:2],
     "2 images in two splits (by id; e.g. train_0.png (formatted_train_images.npy/formatted_val_images.npy)"),
    (TRAIN_NAMES + TRAIN_NAMES[:1], VAL_NAMES, "gives 1 image ids more than once (e.g. train_0.png)"),
    (TRAIN_NAMES, VAL_NAMES[:2] + ["./train_3.png"], "1 images in two splits (by path; e.g. train_3.png"),
])
def test_p14_import_npy_refuses_repeated_images(workspace, tmp_path, train, val, fragment):
    formatted(tmp_path / "npy", tmp_path / "imgs", train, val)
    result = invoke("import-npy", tmp_path / "npy", "--name", "mine", "--images", tmp_path / "imgs")
    assert_one_line_error(result, fragment)
    assert not Path("data/imported.json").exists() and not Path("data/raw/mine").exists()


@pytest.mark.parametrize("leak, fragment", [
    ("copy-train-rows-to-test", "has 10 images in two splits (by id"),
    ("same-path-new-id", "has 10 images in two splits (by path"),
    ("duplicate-id", "gives 1 image ids more than once"),
])
def test_p14_label_table_refuses_leaks(tiny_workspace, leak, fragment):
    # the same rows changed in the prepared and the sampled table, as a foreign writer of both could
    for name, column in (("sampled", "observed"), ("prepared", "labels")):
        table = tables.read_table(f"data/{name}/synthetic.parquet", column, "table", "")
        train, test = table.rows("train"), table.rows("test")
        if leak == "duplicate-id":
            table.image_id[train[1]] = table.image_id[train[0]]
        else:
            table.path[test[:10]] = table.path[train[:10]]
            if leak == "copy-train-rows-to-test":
                table.image_id[test[:10]] = table.image_id[train[:10]]
        tables.write_table(f"data/{name}/synthetic.parquet", table, column)
    for stage in (("train", "synthetic", "an"), ("sample", "synthetic")):
        assert_one_line_error(invoke(*stage), "label table data/prepared/synthetic.parquet", fragment)
    assert not Path("runs").exists()
    with pytest.raises(SpmlError, match=re.escape(f"label table of synthetic {fragment}")):  # prepare's writer too
        tables.write_label_table(Path("x.parquet"), table)  # the prepared table (the loop's last)


# ---------------------------------------------------------------------------------------------------- p15
# case 3: aggregate took foreign metrics


def grid_params(workspace: Path, seeds: list[int]) -> dict:
    params = tiny_params() | {"datasets": ["synthetic"], "methods": ["an"], "seeds": seeds}
    params["train"]["default"]["epochs"] = 1
    write_params(workspace, params)
    return params


def test_p15_aggregate_refuses_a_run_of_another_cell(tiny_workspace):
    grid_params(tiny_workspace, [0, -1])
    assert invoke("train", "synthetic", "an", "--seed", "0").exit_code == 0
    # the command: full's run, seed -1, written into an's folder
    assert invoke("train", "synthetic", "full", "--seed", "-1", "--out", "runs/synthetic/an/-1").exit_code == 0
    result = invoke("aggregate")
    assert_one_line_error(result, "runs/synthetic/an/-1/metrics.json", "is a run of method 'full'",
                          "folder of method 'an'")
    assert not Path("reports/runs.csv").exists()


@pytest.mark.parametrize("change, fragment", [
    ({"test_map": 1e9}, "key 'test_map' is 1000000000.0, outside [0, 100]"),
    ({"val_map": -3.0}, "key 'val_map' is -3.0, outside [0, 100]"),
    ({"seed": 5}, "is a run of seed 5, but it sits in the folder of seed 0"),
    ({"best_epoch": 4}, "best_epoch 4 of 1 epochs"),
    ({"epochs": 1.5}, "key 'epochs' is 1.5, not a whole number"),
    ({"config_sha256": "0" * 64}, "was trained with another config than params.yaml gives its cell"),
])
def test_p15_aggregate_refuses_tampered_metrics(tiny_workspace, change, fragment):
    grid_params(tiny_workspace, [0])
    assert invoke("train", "synthetic", "an").exit_code == 0
    assert invoke("aggregate").exit_code == 0
    summary = Path("reports/summary.json").read_bytes()
    path = Path("runs/synthetic/an/0/metrics.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    assert_one_line_error(invoke("aggregate"), str(path), fragment)
    assert Path("reports/summary.json").read_bytes() == summary


def test_p15_aggregate_refuses_a_run_trained_with_other_params(tiny_workspace):
    params = grid_params(tiny_workspace, [0])
    assert invoke("train", "synthetic", "an").exit_code == 0
    params["train"]["default"]["lr"] = 0.5  # params.yaml changed after training; runs/ not retrained
    write_params(tiny_workspace, params)
    assert_one_line_error(invoke("aggregate"), "runs/synthetic/an/0/metrics.json",
                          "trained with another config than params.yaml gives its cell")


# ---------------------------------------------------------------------------------------------------- p16
# case 4: stale inputs outside DVC


def test_p16_redownload_without_prepare_is_refused(tiny_workspace):
    params = tiny_params()
    params["data"]["synthetic"]["seed"] = 4  # another data seed: new images and new labels
    write_params(tiny_workspace, params)
    assert invoke("download", "synthetic").exit_code == 0
    for stage in (("train", "synthetic", "an"), ("sample", "synthetic")):
        assert_one_line_error(invoke(*stage), "label table data/prepared/synthetic.parquet",
                              "was made from other raw data than data/raw/synthetic holds now",
                              "rerun `spml prepare synthetic`")
    assert not Path("runs").exists()
    assert invoke("prepare", "synthetic").exit_code == 0 and invoke("sample", "synthetic").exit_code == 0


def test_p16_resampling_is_required_after_prepare(tiny_workspace):
    params = tiny_params()
    params["data"]["synthetic"]["seed"] = 4  # new labels, same image ids: row-for-row ids cannot tell
    write_params(tiny_workspace, params)
    assert invoke("download", "synthetic").exit_code == 0 and invoke("prepare", "synthetic").exit_code == 0
    assert_one_line_error(invoke("train", "synthetic", "an"), "data/sampled/synthetic.parquet was not sampled",
                          "rerun `spml sample synthetic`")


def test_p16_reimport_of_other_data_is_refused(workspace, tmp_path):
    formatted(tmp_path / "a", tmp_path / "imgs-a", TRAIN_NAMES, VAL_NAMES)
    formatted(tmp_path / "b", tmp_path / "imgs-b", TRAIN_NAMES, VAL_NAMES)
    assert invoke("import-npy", tmp_path / "a", "--name", "mine", "--images", tmp_path / "imgs-a").exit_code == 0
    assert invoke("prepare", "mine").exit_code == 0 and invoke("sample", "mine").exit_code == 0
    # the same file names over other images: only source.json (the image root) tells them apart
    assert invoke("import-npy", tmp_path / "b", "--name", "mine", "--images", tmp_path / "imgs-b").exit_code == 0
    assert_one_line_error(invoke("train", "mine", "an"), "label table data/prepared/mine.parquet",
                          "was made from other raw data than data/raw/mine holds now")


# ---------------------------------------------------------------------------------------------------- p17
# case 5: an absolute path in a prepared table


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_p17_table_paths_must_stay_inside_the_image_root(tiny_workspace, where):
    table = read_label_table("data/prepared/synthetic.parquet")
    outside = tiny_workspace / "elsewhere.png"
    Image.new("RGB", (32, 32)).save(outside)
    root = Path(table.meta["image_root"])
    table.path[0] = str(outside.resolve()) if where == "absolute" else os.path.relpath(outside, root)
    tables.write_table("data/prepared/synthetic.parquet", table, "labels")
    assert_one_line_error(invoke("train", "synthetic", "an"), "label table data/prepared/synthetic.parquet",
                          "1 image paths that are absolute or leave the image root", "elsewhere.png")
    assert not Path("runs").exists()


# ---------------------------------------------------------------------------------------------------- p18
# case 6: a duplicated YAML key; a params block of the wrong type


def test_p18_duplicated_yaml_key_names_key_and_lines(tiny_workspace):
    lines = yaml.safe_dump(tiny_params(), sort_keys=False).splitlines()
    start = lines.index("train:")
    at = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("lr:"))
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, f"{indent}lr: 0.5")
    Path("params.yaml").write_text("\n".join(lines) + "\n")
    for command in (("train", "synthetic", "an"), ("config", "synthetic", "an")):
        assert_one_line_error(invoke(*command), "params file params.yaml", "key 'lr' is given twice in one block",
                              f"lines {at + 1} and {at + 2}")
    assert not Path("runs").exists()


def test_p18_yaml_merge_keys_may_still_override(workspace):
    Path("params.yaml").write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    from pipeline.config import load_params

    assert load_params(Path("params.yaml"))["other"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("block", ["train", "models", "method_params", "method_params.an", "runtime",
                                   "method_params.an.original", "train.default"])
def test_p18_params_block_of_the_wrong_type(tiny_workspace, block):
    params = tiny_params()
    *parents, last = block.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = [1, 2]
    write_params(tiny_workspace, params)
    assert_one_line_error(invoke("train", "synthetic", "an"), f"params {block} must be a block of keys",
                          "got a list")


# ---------------------------------------------------------------------------------------------------- p19
# resource errors: decompression bombs, a garbage pinned CLIP file, full disks


def bomb_png(path: Path, side: int = 30000) -> None:
    """A valid PNG header claiming side x side pixels, with a few bytes of data (Pillow refuses it on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_p19_decompression_bomb_through_import_npy_and_train(workspace, tmp_path):
    formatted(tmp_path / "npy", tmp_path / "imgs", TRAIN_NAMES, VAL_NAMES)
    bomb_png(tmp_path / "imgs" / "train_2.png")
    assert invoke("import-npy", tmp_path / "npy", "--name", "mine", "--images", tmp_path / "imgs").exit_code == 0
    assert invoke("prepare", "mine").exit_code == 0 and invoke("sample", "mine").exit_code == 0
    assert_one_line_error(invoke("train", "mine", "an"), f"image {tmp_path / 'imgs' / 'train_2.png'}",
                          "900,000,000 pixels, over the limit of")
    assert not Path("runs").exists() and not any(Path("data/cache").rglob("*.npy"))


def test_p19_garbage_clip_file_with_a_pinned_hash(tiny_workspace, tmp_path):
    garbage = tmp_path / "ViT-B-32.pt"
    garbage.write_bytes(b"not a checkpoint at all " * 100)
    params = tiny_params()
    params["clip"]["vlpl"]["synthetic"] = {
        "model": "ViT-B-32", "pretrained": None, "weights": str(garbage), "random_init_config": None,
        "sha256": hashlib.sha256(garbage.read_bytes()).hexdigest(), "image_size": 32, "num_workers": 0}
    write_params(tiny_workspace, params)
    assert_one_line_error(invoke("clip-scores", "synthetic", "vlpl"), f"CLIP weights {garbage}",
                          "match the pinned SHA-256 but are not ViT-B-32 weights")
    assert not Path("data/clip").exists()


# A real full disk: a small tmpfs mounted by the test (root only).

def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the full-disk case is also covered by a simulated ENOSPC in "
                    "test_p13_case1_full_disk_path)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")


@pytest.fixture
def small_disk(tiny_data_dir, tmp_path, monkeypatch):
    """The tiny workspace on its own 64 MiB tmpfs (cwd), and a function filling it to ``left`` free bytes."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64m")
    try:
        shutil.copytree(tiny_data_dir, disk, dirs_exist_ok=True)
        monkeypatch.chdir(disk)
        filler = disk / "filler"

        def fill(left: int) -> None:
            free = shutil.disk_usage(disk).free + (filler.stat().st_size if filler.exists() else 0)
            filler.unlink(missing_ok=True)
            with open(filler, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, max(free - left, 0))

        yield disk, fill, filler
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def outputs(disk: Path) -> dict[str, bytes | None]:
    """The workspace's files but the filler, params.yaml and the resume checkpoints."""
    return {k: v for k, v in tree(disk).items() if k not in ("filler", "params.yaml") and ".resume" not in k}


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("stage", ["download", "prepare", "image-cache", "train-first-save", "train-last-save"])
def test_p19_full_disk_leaves_previous_outputs_and_nothing_reusable(small_disk, stage):
    disk, fill, filler = small_disk
    params = set_params(disk, epochs=2)
    assert invoke("train", "synthetic", "an").exit_code == 0  # the previous outputs
    before = outputs(disk)
    command = ("train", "synthetic", "an")
    left, fragment, message = 0, "", "no space left on the device to write"
    if stage == "download":
        params["data"]["synthetic"]["seed"] = 4
        command = ("download", "synthetic")
    elif stage == "prepare":
        params["split"]["seed"] = 5
        command = ("prepare", "synthetic")
    elif stage == "image-cache":
        params["train"]["default"]["image_size"] = 48  # a new cache: 160 x 3 x 48 x 48 bytes
        # refused before any decoding, naming the bytes needed and free (issue 28), not at the first failed write
        message, fragment = "the image cache of synthetic images at 48 px needs 1,106,048 bytes", "bytes free"
    else:
        params["train"]["default"]["lr"] = 0.5
        fragment = "best-e1.pt"
        if stage == "train-last-save":  # room for best-e1.pt (about best.pt's size), none for last.pt
            left, fragment = (disk / "runs/synthetic/an/0/best.pt").stat().st_size + (64 << 10), "last.pt"
    write_params(disk, params)
    fill(left)
    assert_one_line_error(invoke(*command), message, fragment)
    assert outputs(disk) == before  # previous outputs intact
    assert no_temporaries(disk) == []
    filler.unlink()
    if stage.startswith("train"):  # whatever the failed run left in .resume, the next run is not fooled by it
        assert invoke("train", "synthetic", "an").exit_code == 0
        assert invoke("train", "synthetic", "an", "--no-resume", "--out", "runs/straight").exit_code == 0
        assert_same_run(Path("runs/synthetic/an/0"), Path("runs/straight"))
    else:
        assert invoke(*command).exit_code == 0
