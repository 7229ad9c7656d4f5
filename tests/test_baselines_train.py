"""Every baseline trains through the normal loop on the tiny synthetic data (2 epochs, so the LL
schedules and APL's round are active), writes its diagnostics, and reloads its checkpoint safely;
and adding a method really is one new module plus one params entry."""

from __future__ import annotations

import json
import sys
import textwrap

import pandas as pd
import pytest

from pipeline.config import deep_merge
from pipeline.errors import SpmlError
from pipeline.registry import METHODS
from tests.conftest import tiny_params, write_params

BASELINES = ["an-ls", "wan", "epr", "role", "em", "em-apl", "ll-r", "ll-ct", "ll-cp", "boostlu", "asl", "plc"]
DIAGNOSED = {"role", "em-apl", "ll-r", "ll-ct", "ll-cp", "boostlu", "plc"}
STATEFUL = {"role": "label_logits", "em-apl": "pseudo_mask", "ll-cp": "flips"}


@pytest.fixture
def run_params(tiny_data_dir, tmp_path, monkeypatch):
    """Write a params file for the tiny workspace (data shared read-only) and return its path."""
    monkeypatch.chdir(tiny_data_dir)

    def make(overrides: dict | None = None):
        # em-apl keeps its published W = 5 of 10 epochs: the timeline rule makes it 1 of these 2
        return write_params(tmp_path, deep_merge(tiny_params(), overrides or {}))

    return make


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_trains_two_epochs(method, run_params, tmp_path):
    from pipeline.train import load_checkpoint
    from stages import train

    out = tmp_path / "run"
    metrics = train.run("synthetic", method, 0, run_params(), out)
    assert 0 < metrics["test_map"] <= 100
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2 and history.train_loss.notna().all()
    if method in DIAGNOSED:
        for column in ("fn_precision", "fn_recall", "fn_f1", "fn_base_rate"):
            assert history[column].between(0, 1).all(), column
        assert history.fn_base_rate.gt(0).all()
    else:
        assert "fn_precision" not in history
    checkpoint = load_checkpoint(out / "best.pt")  # weights_only=True: method state is tensors only
    if method in STATEFUL:
        assert STATEFUL[method] in checkpoint["method"]


def test_adding_a_method_is_one_module_and_one_params_entry(run_params, tmp_path, monkeypatch):
    """A toy method in a new module file on the package path, plus its params entry, trains end to end."""
    from pipeline import methods
    from stages import train

    package = tmp_path / "plugins"
    package.mkdir()
    (package / "toy_an.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        import torch.nn.functional as F

        from pipeline.contracts import StepOutput
        from pipeline.methods import Method, register_method


        @register_method("toy-an")
        class ToyAN(Method):
            @dataclass
            class Params:
                weight: float

            def training_step(self, model, batch, epoch):
                logits = model(batch.image).logits
                loss = F.binary_cross_entropy_with_logits(logits, batch.positives)
                return StepOutput(self.params.weight * loss)
    '''))
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(package)])
    try:
        assert "toy-an" in methods.method_names()
        params = run_params({"train": {"default": {"epochs": 1}},
                             "method_params": {"toy-an": {"default": {"weight": 0.5}}}})
        metrics = train.run("synthetic", "toy-an", 0, params, tmp_path / "run")
        assert metrics["method"] == "toy-an" and metrics["epochs"] == 1
        assert json.loads((tmp_path / "run" / "config.json").read_text())["method_params"] == {"weight": 0.5}
        bad = run_params({"method_params": {"toy-an": {"default": {"wieght": 0.5}}}})
        with pytest.raises(SpmlError, match="method_params.toy-an.wieght"):
            train.run("synthetic", "toy-an", 0, bad, tmp_path / "bad")
    finally:
        METHODS.unregister("toy-an")
        sys.modules.pop("pipeline.methods.toy_an", None)
