"""The resume checkpoint object: save then load restores the training state; another run's is refused."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.runtime.checkpoint import Best, Checkpoint, run_fingerprint
from pipeline.runtime.optim import WeightEMA, build_scheduler


class CounterMethod:
    """A stand-in for a training method with cross-iteration state (e.g. IGNORE's EMAs)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"steps": 0, "tau": torch.zeros(3)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.state["steps"], "tau": self.state["tau"].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {"steps": state["steps"], "tau": state["tau"].clone()}


def _checkpoint(seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = build_scheduler("onecycle", optimizer, 2, 5, 0.2)
    return Checkpoint(model, optimizer, CounterMethod(), torch.Generator().manual_seed(seed), scheduler,
                      ema=WeightEMA(model, 0.9))


def _train(state: Checkpoint, steps: int) -> None:
    for _ in range(steps):
        loss = state.model(torch.randn(8, 4)).square().mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.ema.update(state.model)
        state.method.state["steps"] += 1
        state.method.state["tau"] += 0.5


@pytest.fixture
def fingerprint(tmp_path: Path) -> dict[str, Any]:
    table = tmp_path / "labels.parquet"
    table.write_bytes(b"rows")
    return run_fingerprint({"lr": 1e-2, "epochs": 2}, 1, [table])


def test_save_then_load_restores_the_same_state(tmp_path, fingerprint):
    saved = _checkpoint(seed=0)
    _train(saved, 3)
    saved.loader_generator.manual_seed(1234)
    saved.epoch, saved.history, saved.train_seconds = 1, [{"epoch": 1, "val_map": 40.0}], 12.5
    saved.best = Best(40.0, 1, {k: v.clone() for k, v in saved.model.state_dict().items()}, saved.method.state_dict())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    saved.save(tmp_path / "resume", fingerprint)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    loaded = _checkpoint(seed=1)  # other initial weights and generator
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert loaded.load(tmp_path / "resume", fingerprint) is True
    assert (random.random(), np.random.rand()) == expected_draws[:2] and torch.equal(torch.rand(1), expected_draws[2])
    assert loaded.epoch == 1 and loaded.history == saved.history and loaded.train_seconds == 12.5
    assert loaded.best.val_map == 40.0 and loaded.best.epoch == 1
    for name in ("model", "ema"):
        a = (saved.model if name == "model" else saved.ema.model).state_dict()
        b = (loaded.model if name == "model" else loaded.ema.model).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(saved.best.model[k], loaded.best.model[k]) for k in saved.best.model)
    assert loaded.method.state["steps"] == 3 and torch.equal(loaded.method.state["tau"], saved.method.state["tau"])
    assert loaded.scheduler.state_dict() == saved.scheduler.state_dict()
    assert torch.equal(loaded.loader_generator.get_state(), saved.loader_generator.get_state())
    # the optimizer moments came back too: the next step is the same on both
    torch.manual_seed(3)
    _train(saved, 1)
    torch.manual_seed(3)
    _train(loaded, 1)
    assert all(torch.equal(p, q) for p, q in zip(saved.model.parameters(), loaded.model.parameters()))


def test_only_the_current_best_file_is_kept(tmp_path, fingerprint):
    state = _checkpoint(seed=0)
    for epoch, best_epoch in ((1, 1), (2, 2), (3, 2)):
        state.epoch = epoch
        state.best = Best(float(best_epoch), best_epoch, state.model.state_dict(), {})
        state.save(tmp_path / "resume", fingerprint)
        assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == [f"best-e{best_epoch}.pt", "last.pt"]


@pytest.mark.parametrize("change, words", [
    ("config", "the run config"),
    ("inputs", "the input tables"),
    ("code", "the code (pipeline/)"),
    ("format", "the checkpoint format"),
])
def test_another_runs_checkpoint_is_refused_and_changes_nothing(tmp_path, fingerprint, capsys, change, words):
    saved = _checkpoint(seed=0)
    _train(saved, 2)
    saved.epoch = 1
    folder = tmp_path / "resume"
    saved.save(folder, fingerprint)
    if change == "format":  # a checkpoint of the previous format, keyed by the config alone
        state = torch.load(folder / "last.pt", weights_only=False)
        torch.save({**state, "fingerprint": fingerprint["config"], "format": 1}, folder / "last.pt")
        current = fingerprint
    elif change == "inputs":
        current = {**fingerprint, "inputs": {path: "0" * 64 for path in fingerprint["inputs"]}}
    else:
        current = {**fingerprint, change: "another"}

    fresh = _checkpoint(seed=1)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    capsys.readouterr()
    assert fresh.load(folder, current) is False
    notice = capsys.readouterr().err
    assert notice.startswith("notice: discarding the resume checkpoint") and words in notice
    assert notice.count("\n") == 1 and "training from scratch" in notice
    assert fresh.epoch == 0 and fresh.history == [] and fresh.best.epoch == 0
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())


def test_no_checkpoint_is_no_resume(tmp_path, fingerprint):
    assert _checkpoint(seed=0).load(tmp_path / "absent", fingerprint) is False
