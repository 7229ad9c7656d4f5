"""IGNORE: each piece against values computed by hand from the paper's equations and the spec."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pipeline.contracts import Batch, HiddenLabels, MethodContext, ModelOutput
from pipeline.hidden_scoring import FalseNegativeMeter, mask_coverage, score_step
from pipeline.methods import ignore as ig
from tests.conftest import make_method


def approx(t, expected, tol=1e-5):
    t = t.detach() if isinstance(t, torch.Tensor) else t
    return torch.allclose(torch.as_tensor(t, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32),
                          atol=tol, equal_nan=False)


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------- pieces
def test_positive_index_and_gather():
    y = torch.tensor([[0., 1, 0], [0, 0, 0], [1, 0, 0]])
    cls, has = ig.positive_index(y)
    assert cls.tolist() == [1, 0, 0] and has.tolist() == [True, False, True]
    cam = torch.arange(3 * 3 * 2 * 2, dtype=torch.float32).view(3, 3, 2, 2)
    got = ig.gather_cam(cam, cls)
    assert torch.equal(got[0], cam[0, 1]) and torch.equal(got[2], cam[2, 0])


def test_logit_gap_is_absolute_and_detached():
    z = torch.tensor([[1., -2], [0.5, 3]], requires_grad=True)
    zm = torch.tensor([[0.5, -3], [1., 3]])
    g = ig.logit_gap(z, zm)
    assert approx(g, [[0.5, 1.0], [0.5, 0.0]]) and not g.requires_grad


def test_tau_update_and_batch_without_positive():
    gap = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    y = torch.tensor([[1., 0], [0, 1]])
    tau, ok = ig.update_tau(torch.tensor(0.2), gap, y, 0.9)
    # mean gap at the positives = (0.5 + 0.0) / 2 = 0.25; 0.9 * 0.2 + 0.1 * 0.25 = 0.205
    assert ok and approx(tau, 0.205)
    tau2, ok2 = ig.update_tau(torch.tensor(0.2), gap, torch.zeros(2, 2), 0.9)
    assert not ok2 and approx(tau2, 0.2) and torch.isfinite(tau2)


def test_mu_update_all_images_and_unannotated_scope():
    z = torch.tensor([[1., -2], [3, 4]])
    y = torch.tensor([[1., 0], [0, 0]])
    avg, ok = ig.batch_logit_average(z, y, "all")  # (1+3)/2, (-2+4)/2
    assert approx(ig.ema(torch.tensor([0., 1]), avg, 0.5, ok), [1.0, 1.0])
    avg, ok = ig.batch_logit_average(z, y, "unannotated")  # class 0: row 2 only -> 3; class 1: 1
    assert approx(ig.ema(torch.tensor([0., 1]), avg, 0.5, ok), [1.5, 1.0])


def test_bias_correction():
    # one update of a zero-initialised EMA with decay 0.9 gives 0.1 * v; corrected: v
    assert approx(ig.debias(torch.tensor(0.1 * 3.0), 0.9, torch.tensor(1.0)), 3.0)
    assert approx(ig.debias(torch.tensor(0.0), 0.9, torch.tensor(0.0)), 0.0)


def test_rejection_rule():
    gap = torch.tensor([[0.5, 1.0, 0.2], [0.6, 0.1, 0.9]])
    z = torch.tensor([[2., 1, 3], [0.5, 2, 1]])
    observed = torch.tensor([[1., 0, 0], [0, 1, 0]])
    tau, mu = torch.tensor(0.4), torch.tensor([0., 1.5, 0.])
    # G > tau: [[T,T,F],[T,F,T]]; z > mu: [[T,F,T],[T,T,T]]; positives never rejected
    assert ig.rejection(gap, z, tau, mu, observed).tolist() == [[False, False, False], [True, False, True]]
    assert ig.rejection(gap, z, tau, None, observed).tolist() == [[False, True, False], [True, False, True]]
    # strict comparisons: equal to the threshold is not rejected
    assert not ig.rejection(torch.tensor([[0.4]]), torch.tensor([[5.]]), tau, None, torch.zeros(1, 1)).any()


def test_ignore_loss_normalises_by_kept_entries():
    zs = torch.tensor([[0., 2], [-1, 0]])
    y = torch.tensor([[1., 0], [0, 1]])
    keep = torch.tensor([[1., 0], [1, 1]])
    exact = (math.log(2) + softplus(-1) + math.log(2)) / 3
    assert approx(ig.ignore_loss(zs, y, keep, "exact"), exact)
    s = lambda x: 1 / (1 + math.exp(-x))
    eps = (-math.log(s(0) + 1e-5) - math.log(1 - s(-1) + 1e-5) - math.log(s(0) + 1e-5)) / 3
    assert approx(ig.ignore_loss(zs, y, keep, "eps"), eps)
    # all kept: the plain AN mean over B*C
    full = (math.log(2) + softplus(2) + softplus(-1) + math.log(2)) / 4
    assert approx(ig.an_loss(zs, y, "exact"), full)


def test_spbc_and_consistency():
    z = torch.tensor([[0., 2], [-1, 1]])
    y = torch.tensor([[1., 0], [0, 1]])
    assert approx(ig.spbc_loss(z, y, "exact"), (math.log(2) + softplus(-1)) / 2)
    assert approx(ig.spbc_loss(z, torch.zeros(2, 2), "exact"), 0.0)
    z1, z2 = torch.tensor([[1., 2]], requires_grad=True), torch.tensor([[0., 4]], requires_grad=True)
    reg = ig.consistency_loss(z1, z2)
    assert approx(reg, 2.5)  # (1 + 4) / 2, minimised (+ sign)
    reg.backward()
    assert z1.grad is not None and z2.grad is not None and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_cam_normalisation_per_image():
    cam = torch.tensor([[[0., 2], [4, 8]], [[3., 3], [3, 3]]])
    got = ig.normalize_cam_image(cam)
    assert approx(got[0], [[0, 0.25], [0.5, 1]]) and approx(got[1], [[0, 0], [0, 0]])


def test_cam_normalisation_batchwise_per_pixel_divided_by_max():
    a1 = [[1., 2], [3, 4]]
    a2 = [[3., 0], [1, 8]]
    cam = torch.tensor([a1, a2, [[100., 100], [-100, 100]]])
    has = torch.tensor([True, True, False])  # the third row takes no part in the min/max
    got = ig.normalize_cam_batch(cam, has)
    # min [[1,0],[1,4]], max [[3,2],[3,8]]
    assert approx(got[0], [[0, 1], [2 / 3, 0]]) and approx(got[1], [[2 / 3, 0], [0, 0.5]])


def test_threshold_is_strict_and_rows_without_positive_keep_everything():
    up = torch.tensor([[[0.4, 0.41], [0.0, 1.0]], [[0., 0], [0, 0]]])
    m = ig.binary_mask(up, 0.4, torch.tensor([True, False]))
    assert m.tolist() == [[[0, 1], [0, 1]], [[1, 1], [1, 1]]]


def test_positive_mask_upsamples_bilinear_and_masks_normalised_image():
    cam = torch.zeros(1, 2, 2, 2)
    cam[0, 1] = torch.tensor([[0., 0], [0, 1]])
    mask = ig.positive_mask(cam, torch.tensor([[0., 1]]), (4, 4), 0.5, "image")
    # bilinear (align_corners=False) of [[0,0],[0,1]] to 4x4: bottom-right 2x2 block is 0.5625, 0.75, 0.75, 1
    assert mask.shape == (1, 4, 4) and mask[0, 2:, 2:].sum() == 4 and mask.sum() == 4
    x = torch.ones(1, 3, 4, 4)
    xm = ig.masked_image(x, mask)
    assert xm[0, :, 0, 0].tolist() == [0, 0, 0] and xm[0, :, 3, 3].tolist() == [1, 1, 1]


def test_mask_coverage_metric():
    inst = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.uint8)
    classes = torch.tensor([[2, 5, -1]])
    y = torch.zeros(1, 6)
    y[0, 2] = 1
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 0] = 1  # 3 of object 1's 4 pixels
    mask[0, 0, 2] = 1  # 1 of object 2's 4 pixels
    kept, w_pos, removed, w_other = mask_coverage(mask, y, inst, classes)
    assert approx((kept * w_pos).sum() / w_pos.sum(), 0.75)
    assert approx((removed * w_other).sum() / w_other.sum(), 0.75)
    # a row without an observed positive does not count
    _, w_pos0, _, w_other0 = mask_coverage(mask, torch.zeros(1, 6), inst, classes)
    assert w_pos0.sum() == 0 and w_other0.sum() == 0


def test_masked_forward_has_no_graph_and_bn_mode():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            cam = self.net(x)
            return ModelOutput(cam.mean((2, 3)), cam)

    net = Wrap().train()
    x = torch.randn(4, 3, 5, 5)
    before = model[1].running_mean.clone()
    out = ig.masked_logits(net, x, "eval")
    assert not out.requires_grad and torch.equal(model[1].running_mean, before) and model[1].training
    ig.masked_logits(net, x, "train")
    assert not torch.equal(model[1].running_mean, before)  # train mode updates the running stats (code)


# ------------------------------------------------------------------------------------ the whole step
class ChannelCAM(nn.Module):
    """CAM = a learnable scale times the first C image channels; logits = their spatial mean (no BN)."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        cam = self.scale * x[:, : self.c]
        return ModelOutput(cam.mean((2, 3)), cam)


def _ctx(c=3, b=2):
    return MethodContext(dataset="synthetic", model="x", num_classes=c, num_train=b, epochs=4, steps_per_epoch=1,
                         mean_positives=1.5, observed_train=torch.zeros(b, c), device=torch.device("cpu"))


FULL = torch.tensor([[1., 1, 0], [0, 1, 1]])  # the hidden labels of _batch's two images, for the loop's scores


def _batch(observed):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 4, 4) * 2
    img[0, 1, :2] += 3  # class 1 strong in the top half of image 0 (a false negative there)
    return Batch(index=torch.arange(2), image=img, observed=observed, strong=img.flip(-1) * 0.9)


def _reference_loss(method, model, batch, reject_on):
    p = method.params
    out = model(batch.image)
    z, zs = out.logits, model(batch.strong).logits
    mask = ig.positive_mask(out.cam.detach(), batch.positives, (4, 4), p.cam_threshold, p.cam_norm)
    zm = model(ig.masked_image(batch.image, mask)).logits.detach()
    return z, zs, zm, mask


@pytest.mark.parametrize("warmup_mode", ["code", "an"])
def test_warmup_switch_and_full_loss(warmup_mode):
    observed = torch.tensor([[1., 0, 0], [0, 0, 1]])
    params = {"cam_threshold": 0.5, "warmup_epochs": 1, "warmup_mode": warmup_mode, "gap_decay": 0.5, "avg_decay": 0.5,
                  "spbc_weight": 0.3, "reg_weight": 0.7, "ignore_weight": 1.1, "loss_form": "exact"}
    method = make_method("ignore", params, _ctx())
    model = ChannelCAM(3)
    batch = _batch(observed)
    z, zs, zm, mask = _reference_loss(method, model, batch, False)
    y = batch.positives
    gap = (z - zm).abs().detach()

    # epoch 1 = warm-up: tau/mu are updated, nothing is rejected
    out = method.training_step(model, batch, 1)
    tau1 = 0.5 * ((gap * y).sum() / 2)
    mu1 = 0.5 * z.detach().mean(0)
    assert approx(method.tau, float(tau1)) and approx(method.mu, mu1.tolist())
    if warmup_mode == "code":
        expected = 1.1 * ig.an_loss(zs, y, "exact") + 0.3 * ig.spbc_loss(z, y, "exact") + 0.7 * ((zs - z) ** 2).mean()
    else:
        expected = ig.an_loss(z, y, "exact")
    assert approx(out.loss, expected.detach().item())
    assert float(out.logs["reject_frac"]) == 0.0

    # epoch 2: thresholds updated again, then rejection with G > tau and z > mu
    out2 = method.training_step(model, batch, 2)
    tau2 = 0.5 * tau1 + 0.5 * ((gap * y).sum() / 2)
    mu2 = 0.5 * mu1 + 0.5 * z.detach().mean(0)
    reject = (gap > tau2) & (z.detach() > mu2) & (observed == 0)
    assert reject.any(), "the hand-made batch should trigger at least one rejection"
    keep = (~reject).float()
    expected2 = (1.1 * ig.ignore_loss(zs, y, keep, "exact") + 0.3 * ig.spbc_loss(z, y, "exact")
                 + 0.7 * ((zs - z) ** 2).mean())
    assert approx(out2.loss, expected2.detach().item())
    assert approx(out2.logs["reject_frac"], float(reject.float().mean()))
    out2.loss.backward()
    assert model.scale.grad is not None

    # the step reports what it did; the loop scores it against the hidden labels (both steps: same gap)
    assert torch.equal(out2.flagged, reject) and torch.equal(out2.kept_region, mask)
    assert torch.equal(out.flagged, torch.zeros_like(reject))  # warm-up: nothing rejected
    meter = FalseNegativeMeter()
    for step in (out, out2):
        score_step(meter, batch, step, HiddenLabels(FULL))
    diag = meter.summary()
    assert diag["fn_flagged"] == float(reject.sum())
    # false negatives (0, 1), (1, 1); true negatives (0, 2), (1, 0); observed positives (0, 0), (1, 2)
    assert approx(diag["gap_fn"], float(gap[0, 1] + gap[1, 1]) / 2)
    assert approx(diag["gap_tn"], float(gap[0, 2] + gap[1, 0]) / 2)
    assert approx(diag["gap_sp"], float(gap[0, 0] + gap[1, 2]) / 2)
    assert "mask_pos_kept" not in diag  # no instance maps
    # what needs no hidden labels stays with the method: tau, the mask area, mu, whether rejection ran
    own = method.epoch_diagnostics()
    assert set(own) == {"mask_area", "tau", "fn_active", "mu_mean"}
    assert approx(own["tau"], float(tau2)) and approx(own["mask_area"], float(mask.mean()))
    assert approx(own["mu_mean"], float(mu2.mean()))


def test_variants_components():
    observed = torch.tensor([[1., 0, 0], [0, 0, 1]])
    common = {"warmup_epochs": 0, "gap_decay": 0.0, "avg_decay": 0.0, "loss_form": "exact", "reg_weight": 0.5}
    model = ChannelCAM(3)
    batch = _batch(observed)
    y = batch.positives
    z, zs = model(batch.image).logits, model(batch.strong).logits
    cons = make_method("an-cons", common, _ctx()).training_step(model, batch, 1)
    assert approx(cons.loss, (ig.an_loss(zs, y, "exact") + 0.5 * ((zs - z) ** 2).mean()).item())
    gap_only = make_method("ignore-gap", common, _ctx())
    full = make_method("ignore", common, _ctx())
    r_gap = gap_only.training_step(model, batch, 1).logs["reject_frac"]
    r_full = full.training_step(model, batch, 1).logs["reject_frac"]
    assert float(r_gap) >= float(r_full)  # the logit-average test can only remove rejections


def test_batch_without_positive_neither_crashes_nor_poisons_tau():
    method = make_method("ignore", {"warmup_epochs": 0, "gap_decay": 0.5}, _ctx())
    model = ChannelCAM(3)
    out = method.training_step(model, _batch(torch.zeros(2, 3)), 1)
    assert torch.isfinite(out.loss) and float(method.tau) == 0.0 and float(method.tau_updates) == 0
    out = method.training_step(model, _batch(torch.tensor([[1., 0, 0], [0, 0, 0]])), 1)
    assert torch.isfinite(out.loss) and float(method.tau) > 0 and torch.isfinite(method.tau)


def test_batchwise_normalisation_runs_in_the_step():
    method = make_method("ignore", {"cam_norm": "batch", "warmup_epochs": 0}, _ctx())
    out = method.training_step(ChannelCAM(3), _batch(torch.tensor([[1., 0, 0], [0, 0, 1]])), 1)
    assert torch.isfinite(out.loss)


def test_params_validation_and_state_roundtrip():
    from pipeline.errors import SpmlError

    with pytest.raises(SpmlError, match="gap_decay"):
        make_method("ignore", {"gap_decay": 1.0}, _ctx())
    with pytest.raises(SpmlError, match="cam_norm"):
        make_method("ignore", {"cam_norm": "pixel"}, _ctx())
    m = make_method("ignore", {}, _ctx())
    m.tau = torch.tensor(0.7)
    m2 = make_method("ignore", {}, _ctx())
    m2.load_state_dict(m.state_dict())
    assert float(m2.tau) == pytest.approx(0.7)


def test_an_ablation_reads_ignores_block_and_its_cells_track_it():
    """One key per value: Table 3's rows read IGNORE's block (a preset that changes IGNORE's gamma changes its
    ablations too), and dvc.yaml's ablate cells track that block."""
    import yaml

    from pipeline.config import load_params
    from pipeline.run_config import resolve_run_config
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml")
    assert "ignore-gap" not in params["method_params"] and "an-cons" not in params["method_params"]
    params["method_params"]["ignore"]["default"]["cam_threshold"] = 0.3
    for row in ("ignore-gap", "an-cons"):
        assert resolve_run_config(params, "synthetic", row, 0).method_params["cam_threshold"] == 0.3
    ablate = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["ablate"]
    assert "method_params.ignore" in ablate["params"] and "pipeline/methods/ignore.py" in ablate["deps"]


# ------------------------------------------------------------------------------------------- smoke
def test_one_epoch_smoke_train_on_tiny_synthetic(tiny_workspace):
    import pandas as pd

    from pipeline.config import load_params
    from pipeline.run_config import resolve_run_config
    from pipeline.train import fit

    params = load_params("params.yaml")
    params["train"]["default"]["epochs"] = 2
    # 13 of IGNORE's 25 reference epochs: 1 of these 2 by the timeline rule (config.json records the mapped 1)
    params["method_params"]["ignore"]["default"]["warmup_epochs"] = 13
    run = resolve_run_config(params, "synthetic", "ignore", 0)
    out = tiny_workspace / "run"
    out.mkdir()
    metrics = fit(run, out)
    assert 0 <= metrics["test_map"] <= 100
    hist = pd.read_csv(out / "history.csv")
    for col in ("fn_precision", "fn_recall", "fn_f1", "fn_tn_ratio", "fn_base_rate", "gap_sp", "gap_tn", "gap_fn",
                "tau", "mask_pos_kept", "mask_other_removed", "loss_spbc", "loss_reg", "reject_frac"):
        assert col in hist.columns, col
    assert hist.fn_active.tolist() == [0.0, 1.0]
    assert hist.fn_flagged.iloc[0] == 0  # warm-up rejects nothing
    assert 0 < hist.fn_base_rate.iloc[0] < 1 and 0 <= hist.mask_pos_kept.iloc[1] <= 1
    assert json.loads((out / "config.json").read_text())["method_params"]["warmup_epochs"] == 1
