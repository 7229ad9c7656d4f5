"""A run killed after an epoch checkpoint and resumed ends exactly like an uninterrupted run (CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pipeline.runtime.checkpoint import Checkpoint
from stages import train as train_stage
from tests.conftest import tiny_params, write_params

VOLATILE = {"train_seconds", "epoch_seconds"}


class Killed(Exception):
    pass


TINY_Q2L = {"layers": [1, 1, 1, 1], "width_per_group": 4, "hidden_dim": 16, "num_heads": 2,
            "dim_feedforward": 32, "weights": "none"}


def _params(workspace, epochs: int = 3, model: str = "smallcnn") -> None:
    params = tiny_params()
    params["train"]["default"].update(epochs=epochs, scheduler="onecycle", lr=3e-3, model=model)
    params["models"]["q2l"] = TINY_Q2L
    # plc-lac: the LAC queue is method state carried across the kill; q2l adds dropout (RNG state)
    params["method_params"]["plc-lac"]["default"].update(stage1_epochs=0, threshold=0.6, queue_size=64, proj_dim=8)
    if model == "q2l":
        params["train"]["default"]["batch_size"] = 32
    write_params(workspace, params)


def _read(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv").drop(columns=["epoch_seconds"])
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in metrics.items() if k not in VOLATILE}, history, state


@pytest.mark.parametrize("method,model,epochs,kill_after", [
    ("an", "smallcnn", 3, 2),
    pytest.param("plc-lac", "q2l", 2, 1, marks=pytest.mark.slow),  # ~20 s: a tiny Q2L is still a ResNet-50 trunk
])
def test_killed_then_resumed_equals_uninterrupted(tiny_workspace, monkeypatch, method, model, epochs, kill_after):
    _params(tiny_workspace, epochs=epochs, model=model)
    straight = tiny_workspace / "straight"
    train_stage.run("synthetic", method, 0, out_dir=straight)
    assert not (tiny_workspace / ".resume" / "straight").exists()  # removed on completion

    resumed = tiny_workspace / "resumed"
    resume_dir = train_stage.resume_dir_for("synthetic", method, 0, resumed)
    original = Checkpoint.save

    def save_then_die(self, directory, fingerprint):
        original(self, directory, fingerprint)
        if self.epoch == kill_after:
            raise Killed  # as if the process were killed right after this epoch's checkpoint

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train_stage.run("synthetic", method, 0, out_dir=resumed)
    assert not resumed.exists()  # nothing half-written
    assert (resume_dir / "last.pt").exists()
    assert torch.load(resume_dir / "last.pt", weights_only=False)["epoch"] == kill_after
    monkeypatch.setattr(Checkpoint, "save", original)

    calls = []
    real_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, *a: calls.append(r := real_load(self, *a)) or r)
    train_stage.run("synthetic", method, 0, out_dir=resumed)
    assert calls == [True]  # it did resume rather than start over
    assert not resume_dir.exists()

    m1, h1, s1 = _read(straight)
    m2, h2, s2 = _read(resumed)
    assert m1 == m2
    pd.testing.assert_frame_equal(h1, h2, check_exact=True)
    assert len(h1) == epochs
    for key in s1["model"]:
        assert torch.equal(s1["model"][key], s2["model"][key]), key


def test_changed_config_starts_over_and_no_resume_flag(tiny_workspace, monkeypatch):
    _params(tiny_workspace, epochs=1)
    out = tiny_workspace / "run"
    resume_dir = train_stage.resume_dir_for("synthetic", "an", 0, out)
    original = Checkpoint.save

    def die(self, directory, fingerprint):
        original(self, directory, fingerprint)
        raise Killed

    monkeypatch.setattr(Checkpoint, "save", die)
    with pytest.raises(Killed):
        train_stage.run("synthetic", "an", 0, out_dir=out)
    monkeypatch.setattr(Checkpoint, "save", original)
    assert (resume_dir / "last.pt").exists()

    # another config: the checkpoint does not fit and is ignored (a fresh 2-epoch run)
    _params(tiny_workspace, epochs=2)
    fingerprint_calls = []
    real_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, *a: fingerprint_calls.append(r := real_load(self, *a)) or r)
    metrics = train_stage.run("synthetic", "an", 0, out_dir=out)
    assert fingerprint_calls == [False] and metrics["epochs"] == 2

    # --no-resume deletes a leftover checkpoint before training
    resume_dir.mkdir(parents=True)
    (resume_dir / "last.pt").write_bytes(b"garbage")
    _params(tiny_workspace, epochs=1)
    train_stage.run("synthetic", "an", 0, out_dir=out, resume=False)
    assert not resume_dir.exists()
