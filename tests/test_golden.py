"""The default ``ignore`` configuration against the official IGNORE code's own outputs.

``tests/golden/ignore_official.{npz,json}`` (see its README; copied from the project's reference material so that
a clone runs these tests) holds inputs and outputs computed by running
the official repository's functions on fixed random tensors. Every case here goes through
``Ignore.training_step`` with the method params that ``params.yaml`` resolves for ``voc2012``/``ignore`` (the
official runs' dataset; ``synthetic`` converts the per-step lambda to its own steps per epoch, tested below)
(only the case's gamma, or the variant without the logit-average test, is set from the case), driving the
step with a model that replays the case's tensors: the mask reaches the model as the masked image, the
thresholds and the loss come out of the real step, and gradients flow back to the replayed logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_params
from pipeline.contracts import Batch, MethodContext, ModelOutput
from pipeline.methods import build_method
from pipeline.run_config import resolve_run_config
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"

ARRAYS = np.load(GOLDEN / "ignore_official.npz")
CASES = {case["name"]: case for case in json.loads((GOLDEN / "ignore_official.json").read_text())["cases"]}


def golden(case: str, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ARRAYS[f"{case}/{key}"]))


class Replay(nn.Module):
    """A stand-in model: each call returns the next queued (logits, cam) and records its input."""

    def __init__(self):
        super().__init__()
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        logits, cam = self.queue.pop(0)
        return ModelOutput(logits, cam)


def default_params(method: str = "ignore", params_path=REPO / "params.yaml", **override) -> dict:
    run = resolve_run_config(load_params(params_path), "voc2012", method, 0)
    return {**run.method_params, **override}


def test_synthetic_lambda_keeps_the_official_voc_horizon_as_a_share_of_training():
    """docs/embedded-benchmark.md (one timeline rule): the official lambda 0.999 over VOC's 25 epochs of 286 steps
    becomes lambda_synthetic with lambda_synthetic ** (6 x 100) == 0.999 ** (25 x 286)."""
    import math

    from pipeline.run_config import apply_timeline

    params = load_params(REPO / "params.yaml")
    voc = default_params()
    train_images = round(params["data"]["synthetic"]["num_train"] * (1 - params["split"]["val_fraction"]))
    synthetic = apply_timeline(resolve_run_config(params, "synthetic", "ignore", 0), train_images)
    voc_steps = math.ceil(4574 / 16)  # the official VOC run: 4574 training images at batch 16 (specs/ignore.md)
    assert voc_steps == 286 and synthetic.timeline["steps_per_epoch"] == 100
    for key in ("gap_decay", "avg_decay"):
        assert voc[key] == 0.999
        assert synthetic.method_params[key] ** (6 * 100) == pytest.approx(0.999 ** (25 * 286), rel=1e-9)


def build(params: dict, num_classes: int, method: str = "ignore"):
    ctx = MethodContext(dataset="synthetic", model="smallcnn", num_classes=num_classes, num_train=64,
                        epochs=10, steps_per_epoch=4, mean_positives=1.0,
                        observed_train=torch.zeros(64, num_classes), device=torch.device("cpu"))
    return build_method(method, params, ctx)


def batch(image, positives, strong=None) -> Batch:
    return Batch(index=torch.arange(len(image)), image=image, observed=positives,
                 strong=image if strong is None else strong)


def run_mask_case(case: str, params: dict) -> torch.Tensor:
    """The masked image the default step feeds to its third forward."""
    cam, positives, image = golden(case, "cam"), golden(case, "positives"), golden(case, "image")
    b, c = positives.shape
    method = build({**params, "cam_threshold": CASES[case]["gamma"]}, c)
    model = Replay()
    logits = torch.zeros(b, c, dtype=image.dtype, requires_grad=True)
    model.queue = [(logits, cam), (logits, cam), (logits.detach(), cam)]
    method.training_step(model, batch(image, positives), epoch=1)
    return model.inputs[2]


MASK_CASES = [name for name, case in CASES.items() if case["kind"] == "mask"]
STEP_CASES = [name for name, case in CASES.items() if case["kind"] == "step"]


def test_golden_cases_are_all_covered():
    assert len(MASK_CASES) == 4 and len(STEP_CASES) == 3


@pytest.mark.parametrize("case", MASK_CASES)
def test_default_masks_equal_the_official_ones_exactly(case):
    masked = run_mask_case(case, default_params())
    expected = golden(case, "masked_image")
    assert masked.dtype == expected.dtype and torch.equal(masked, expected)
    kept = float((masked != 0).any(dim=1).double().mean())
    assert kept == pytest.approx(CASES[case]["kept_fraction"], abs=1e-6)


@pytest.mark.parametrize("case", MASK_CASES)
def test_per_image_normalisation_fails_the_golden_masks(case):
    """The same test with ``cam_norm: image`` does not reproduce the official masks."""
    masked = run_mask_case(case, default_params(cam_norm="image"))
    assert not torch.equal(masked, golden(case, "masked_image"))


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = expected.abs().max().clamp_min(1e-12)
    return bool(((actual.double() - expected).abs().max() / scale) <= rel)


@pytest.mark.parametrize("case", STEP_CASES)
def test_default_step_reproduces_the_official_thresholds_loss_and_gradients(case):
    spec = CASES[case]
    method_name = "ignore" if spec["logit_average"] else "ignore-gap"
    params = default_params(method_name)
    # the case's settings are the default configuration's (nothing is overridden for the steps)
    for key in ("spbc_weight", "ignore_weight", "reg_weight", "gap_decay", "avg_decay"):
        assert params[key] == spec[key], key
    assert params["warmup_epochs"] == spec["warm_up"] and spec["loss_form"].split()[0] == params["loss_form"]
    c = golden(case, "logits_0").shape[1]
    method = build(params, c, method_name)
    b = golden(case, "logits_0").shape[0]
    image, cam = torch.zeros(b, 3, 2, 2, dtype=torch.float64), torch.zeros(b, c, 1, 1, dtype=torch.float64)

    def step(logits, strong, masked, positives, epoch):
        model = Replay()
        z, zs = logits.clone().requires_grad_(True), strong.clone().requires_grad_(True)
        model.queue = [(z, cam), (zs, cam), (masked, cam)]
        out = method.training_step(model, batch(image, positives), epoch)
        return out, z, zs

    # four steps of the tau / mu updates from zero
    for i in range(4):
        logits = golden(case, f"logits_{i}")
        step(logits, logits, golden(case, f"mask_logits_{i}"), golden(case, f"positives_{i}"), spec["epoch"])
        assert _rel_close(method.tau, golden(case, f"tau_{i}")), (i, float(method.tau))
        assert _rel_close(method.mu, golden(case, f"mu_{i}")), i

    # the loss step: the step updates tau/mu before using them, so start it from the state whose update
    # gives the case's thresholds (tau_used, mu_used)
    logits, masked, positives = golden(case, "logits_3"), golden(case, "mask_logits_3"), golden(case, "positives_3")
    lam_g, lam_a = params["gap_decay"], params["avg_decay"]
    gap_mean = ((logits - masked).abs() * positives).sum() / positives.sum()
    method.tau = (golden(case, "tau_used") - (1 - lam_g) * gap_mean) / lam_g
    method.mu = (golden(case, "mu_used") - (1 - lam_a) * logits.mean(0)) / lam_a
    out, z, zs = step(logits, golden(case, "strong_logits"), masked, positives, spec["epoch"])
    assert _rel_close(method.tau, golden(case, "tau_used")) and _rel_close(method.mu, golden(case, "mu_used"))
    rejected = round(float(out.logs["reject_frac"]) * z.numel())
    assert rejected == spec["rejected_entries_at_last_step"]
    assert _rel_close(out.loss.detach(), golden(case, "loss"))
    out.loss.backward()
    assert _rel_close(z.grad, golden(case, "grad_logits"))
    assert _rel_close(zs.grad, golden(case, "grad_strong_logits"))
