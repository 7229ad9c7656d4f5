"""DDP through torchrun on CPU (gloo, 2 processes): rank 0 alone writes the run, and the val mAP it
reports is the mAP of the whole val set (all ranks' predictions gathered), the same number a
single-process evaluation of the saved model gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, make_method


@pytest.mark.slow
def test_torchrun_two_processes_gathers_all_predictions(tiny_workspace):
    out = tiny_workspace / "ddp"
    env = dict(os.environ, SPML_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.cli", "train", "synthetic", "an", "--out", str(out)]
    result = subprocess.run(cmd, check=False, cwd=tiny_workspace, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert not list(tiny_workspace.glob(".ddp.tmp-*")) and not (tiny_workspace / ".resume" / "ddp").exists()

    # evaluate the saved best model in this process on the whole val split
    from pipeline.config import load_params
    from pipeline.data import Normalizer
    from pipeline.contracts import MethodContext
    from pipeline.metrics import mean_average_precision
    from pipeline.models import build_model
    from pipeline.run_config import resolve_run_config
    from pipeline.train import load_run_data, predict

    run = resolve_run_config(load_params("params.yaml"), "synthetic", "an", 0)
    data = load_run_data("synthetic", run.train, False, False, 0)
    model = build_model(run.train.model, data.table.num_classes, **run.model_kwargs)
    model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
    ctx = MethodContext("synthetic", run.train.model, data.table.num_classes, len(data.train), 1, 1, 1.0,
                        data.train.observed, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(data.val, batch_size=64)
    scores, targets = predict(model, make_method("an", {}, ctx), loader, Normalizer(torch.device("cpu")))
    assert len(targets) == len(data.val)  # every val image, each once
    single = mean_average_precision(targets, scores).map
    np.testing.assert_allclose(metrics["val_map"], single, rtol=0, atol=1e-6)
