"""Baseline methods: every loss against values worked out by hand from the spec's formulas
(/work/shared/specs/baselines.md), the schedules and quotas, method state round trips, and the
diagnostics. A stub model returns logits written into the images, so each test controls them exactly.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline.contracts import Batch, HiddenLabels, MethodContext, ModelOutput, StepOutput
from pipeline.errors import SpmlError
from pipeline.hidden_scoring import FalseNegativeMeter, score_step
from pipeline.methods import losses as L
from tests.conftest import make_method

EPS = 1e-5


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def lp(p: float) -> float:  # ℓ⁺(p) = −log(p + ε)
    return -math.log(p + EPS)


def ln(p: float) -> float:  # ℓ⁻(p) = −log(1 − p + ε)
    return -math.log(1 - p + EPS)


def bce_logit(z: float, t: float) -> float:  # exact logit BCE
    p = sig(z)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


class StubModel(torch.nn.Module):
    """Logits are read from pixel row 0 of channel 0 (so each image carries its own logits); the CAM is
    those logits on a 2x2 map plus a zero-mean pattern, so its spatial mean equals the logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        logits = x[:, 0, 0, : self.num_classes] * self.scale
        pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        return ModelOutput(logits, logits[:, :, None, None] + pattern)


def images_with_logits(logits) -> torch.Tensor:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    x = torch.zeros(len(logits), 3, 2, max(logits.shape[1], 2))
    x[:, 0, 0, : logits.shape[1]] = logits
    return x


def make_ctx(observed, epochs=10, mean_positives=1.5) -> MethodContext:
    observed = torch.as_tensor(observed, dtype=torch.float32)
    return MethodContext(dataset="toy", model="stub", num_classes=observed.shape[1], num_train=len(observed),
                         epochs=epochs, steps_per_epoch=1, mean_positives=mean_positives,
                         observed_train=observed, device=torch.device("cpu"))


def make_batch(logits, observed, index=None, strong_logits=None) -> Batch:
    observed = torch.as_tensor(observed, dtype=torch.float32)
    return Batch(index=torch.arange(len(observed)) if index is None else torch.as_tensor(index),
                 image=images_with_logits(logits), observed=observed,
                 strong=None if strong_logits is None else images_with_logits(strong_logits))


def loop_scores(*steps: tuple[Batch, StepOutput], full) -> dict[str, float]:
    """What the training loop logs for these steps: their reports scored against the hidden ``full`` labels
    (the method itself never sees them)."""
    meter = FalseNegativeMeter()
    for batch, out in steps:
        score_step(meter, batch, out, HiddenLabels(torch.as_tensor(full, dtype=torch.float32)[batch.index]))
    return meter.summary()


def step_loss(name, params, logits, observed, epoch=1, ctx=None, **batch_kwargs) -> float:
    method = make_method(name, params, ctx or make_ctx(observed))
    out = method.training_step(StubModel(len(observed[0])), make_batch(logits, observed, **batch_kwargs), epoch)
    return out.loss.item()


Z = [[0.0, 2.0, -1.0], [-1.0, 1.0, 0.5]]
Y = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
BC = 6  # B·C of the toy batch


# --- Cole et al. ------------------------------------------------------------------------------------

def test_an_ls_single_entry_literal_and_batch():
    # z = 0 (p = 0.5): (1-ρ)ℓ⁺ + ρℓ⁻ = -log(0.50001) whatever ρ
    assert L.an_ls_loss(torch.zeros(1, 1), torch.ones(1, 1), 0.1).item() == pytest.approx(0.6931272, abs=1e-6)
    expected = 0.0
    for zr, yr in zip(Z, Y):
        for z, y in zip(zr, yr):
            p = sig(z)
            expected += 0.9 * lp(p) + 0.1 * ln(p) if y else 0.9 * ln(p) + 0.1 * lp(p)
    assert step_loss("an-ls", {}, Z, Y) == pytest.approx(expected / BC, rel=1e-5)


def test_wan_weights_negatives_by_one_over_c_minus_one():
    gamma = 1 / (3 - 1)
    expected = sum(lp(sig(z)) if y else gamma * ln(sig(z)) for zr, yr in zip(Z, Y) for z, y in zip(zr, yr))
    assert step_loss("wan", {}, Z, Y) == pytest.approx(expected / BC, rel=1e-5)
    # an explicit weight overrides the default
    expected = sum(lp(sig(z)) if y else 0.25 * ln(sig(z)) for zr, yr in zip(Z, Y) for z, y in zip(zr, yr))
    assert step_loss("wan", {"negative_weight": 0.25}, Z, Y) == pytest.approx(expected / BC, rel=1e-5)


def test_epr_regulariser_hand_values():
    p = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.5, 0.25]])
    # row sums 0.75 and 1.75 -> batch mean 1.25; (1.25 - 2)^2 / 3^2 = 0.5625 / 9
    assert L.expected_positive_regulariser(p, 2.0).item() == pytest.approx(0.0625)
    ps = [[sig(z) for z in zr] for zr in Z]
    positives = sum(lp(p) for pr, yr in zip(ps, Y) for p, y in zip(pr, yr) if y)
    reg = ((sum(ps[0]) + sum(ps[1])) / 2 - 1.5) ** 2 / 9
    assert step_loss("epr", {"expected_positives": 1.5}, Z, Y) == pytest.approx(positives / BC + reg, rel=1e-5)


def test_epr_k_defaults_to_the_datasets_true_mean_positives():
    method = make_method("epr", {}, make_ctx(Y, mean_positives=2.25))
    assert method.k == 2.25
    with pytest.raises(SpmlError, match="expected_positives"):
        make_method("epr", {"expected_positives": 0.0}, make_ctx(Y))


def test_role_symmetric_terms_value_and_stop_gradients():
    f = torch.tensor([[0.8]], requires_grad=True)
    g = torch.tensor([[0.3]], requires_grad=True)
    y, k = torch.tensor([[1.0]]), 0.5
    loss = L.role_loss(f, g, y, k)
    fv, gv = 0.8, 0.3
    expected = (0.5 * (lp(fv) + lp(gv)) + 0.5 * ((gv * lp(fv) + (1 - gv) * ln(fv)) + (fv * lp(gv) + (1 - fv) * ln(gv)))
                + 0.5 * ((fv - k) ** 2 + (gv - k) ** 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dg: the positive term, the estimator's BCE against sg(f), and R(g); BCE(f; sg(g)) gives none
    dg = 0.5 * (-1 / (gv + EPS)) + 0.5 * (-fv / (gv + EPS) + (1 - fv) / (1 - gv + EPS)) + (gv - k)
    df = 0.5 * (-1 / (fv + EPS)) + 0.5 * (-gv / (fv + EPS) + (1 - gv) / (1 - fv + EPS)) + (fv - k)
    assert g.grad.item() == pytest.approx(dg, rel=1e-5)
    assert f.grad.item() == pytest.approx(df, rel=1e-5)


def test_role_cross_terms_cover_observed_positives_too_and_batch_normalisation():
    f = torch.tensor([[0.9, 0.2], [0.4, 0.6]])
    g = torch.tensor([[0.7, 0.1], [0.5, 0.99]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    total = 0.0
    for i in range(2):
        for j in range(2):
            fv, gv, yv = f[i, j].item(), g[i, j].item(), y[i, j].item()
            total += 0.5 * yv * (lp(fv) + lp(gv))
            total += 0.5 * ((gv * lp(fv) + (1 - gv) * ln(fv)) + (fv * lp(gv) + (1 - fv) * ln(gv)))
    rf = ((1.1 + 1.0) / 2 - 1.0) ** 2 / 4
    rg = ((0.8 + 1.49) / 2 - 1.0) ** 2 / 4
    assert L.role_loss(f, g, y, 1.0).item() == pytest.approx(total / 4 + 0.5 * (rf + rg), rel=1e-5)


def test_role_label_table_init_lr_and_diagnostics():
    observed = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]])
    torch.manual_seed(7)
    role = make_method("role", {"expected_positives": 1.0}, make_ctx(observed))
    theta = role.label_logits.detach()
    assert theta[observed > 0] == pytest.approx(math.log(0.995 / 0.005), rel=1e-5)
    unobserved = theta[observed == 0]
    assert unobserved.abs().max() < math.log(1.5) and unobserved.std() > 0
    torch.manual_seed(7)  # seeded from the run's torch RNG: same seed, same table
    again = make_method("role", {"expected_positives": 1.0}, make_ctx(observed))
    assert torch.equal(again.label_logits.detach(), theta)
    (group,) = role.parameter_groups(2e-3)
    assert group["params"] == [role.label_logits] and group["lr"] == pytest.approx(2e-2)

    # estimates >= 0.5 on unannotated entries are the method's "found false negatives"
    with torch.no_grad():
        role.label_logits.copy_(torch.tensor([[5.0, 1.0, -1.0, -2.0], [1.0, -1.0, 5.0, -1.0], [-1, 5.0, -1, -1]]))
    full = torch.tensor([[1.0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0]])
    batch = make_batch(torch.zeros(3, 4), observed)
    out = role.training_step(StubModel(4), batch, 1)
    out.loss.backward()
    assert role.label_logits.grad.abs().sum() > 0
    diag = loop_scores((batch, out), full=full)
    # flagged: (0,1) true FN and (1,0) not; false negatives: (0,1), (0,2)
    assert diag["fn_flagged"] == 2 and diag["fn_precision"] == 0.5 and diag["fn_recall"] == 0.5


# --- Zhou et al. ------------------------------------------------------------------------------------

def entropy(p):
    return p * lp(p) + (1 - p) * ln(p)


def test_em_loss_maximises_entropy_of_unknowns():
    # single unknown at p = 0.5: -α·H = -0.2·(-log(0.50001)) ... = -0.2 * 0.6931272
    assert L.em_loss(torch.zeros(1, 1), torch.zeros(1, 1), 0.2).item() == pytest.approx(-0.2 * 0.6931272, abs=1e-6)
    expected = sum(lp(sig(z)) if y else -0.2 * entropy(sig(z)) for zr, yr in zip(Z, Y) for z, y in zip(zr, yr))
    assert step_loss("em", {"alpha": 0.2}, Z, Y) == pytest.approx(expected / BC, rel=1e-5)


def test_apl_soft_pseudo_negatives_loss():
    mask = torch.tensor([[False, True, False], [True, False, False]])
    target = torch.tensor([[0.0, 0.1, 0.0], [0.05, 0.0, 0.0]])
    alpha, beta = 0.1, 0.9
    expected = 0.0
    for i in range(2):
        for j in range(3):
            p, y = sig(Z[i][j]), Y[i][j]
            if y:
                expected += lp(p)
            elif mask[i, j]:
                s = target[i, j].item()
                expected += beta * (s * lp(p) + (1 - s) * ln(p))
            else:
                expected -= alpha * entropy(p)
    got = L.em_loss(torch.tensor(Z), torch.tensor(Y), alpha, mask, target, beta)
    assert got.item() == pytest.approx(expected / BC, rel=1e-5)


def test_apl_quota_and_lowest_probability_selection():
    quota = L.apl_quota(torch.tensor([100, 37, 0, 4]), theta=0.9, epochs=10, warmup=5)
    assert quota.tolist() == [18, 6, 0, 0]  # int(0.9*100/5), int(33.3/5), 0, int(3.6/5)
    probs = torch.tensor([[0.3, 0.1], [0.2, 0.9], [0.05, 0.2], [0.4, 0.0]])
    candidates = torch.tensor([[True, True], [True, True], [False, True], [True, False]])
    chosen = L.lowest_k_per_class(probs, candidates, torch.tensor([2, 5]))
    # column 0: candidates 0.3, 0.2, 0.4 (0.05 is not a candidate) -> rows 1, 0; column 1: all 3 candidates
    assert chosen.tolist() == [[True, True], [True, True], [False, True], [False, False]]


def test_apl_rounds_after_warmup_with_soft_targets_and_state_round_trip():
    observed = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]])
    full = torch.tensor([[1.0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]])
    # E = 4, W = 2: U = (3, 4, 4), quota int(0.9*U/2) = (1, 1, 1)
    apl = make_method("em-apl", {"warmup": 2, "theta": 0.9, "quota_epochs": 4}, make_ctx(observed, epochs=4))
    assert apl.quota.tolist() == [1, 1, 1]
    logits = torch.tensor([[0.0, -3.0, 1.0], [-2.0, 0.0, -1.0], [2.0, -0.5, 0.0], [-1.0, 0.5, -4.0], [0.0, 1.0, 2.0]])
    batches = [make_batch(logits[rows], observed[rows], index=rows) for rows in ([3, 0, 4], [1, 2])]
    apl.on_epoch_end(1, StubModel(3), batches)  # before W: nothing
    assert not apl.pseudo_mask.any()
    apl.on_epoch_end(2, StubModel(3), batches)
    # per class, the lowest-probability unknown: class 0 row 1 (-2), class 1 row 0 (-3), class 2 row 3 (-4)
    assert apl.pseudo_mask.nonzero().tolist() == [[0, 1], [1, 0], [3, 2]]
    assert apl.pseudo_target[1, 0].item() == pytest.approx(sig(-2.0))
    apl.on_epoch_end(3, StubModel(3), batches)  # next-lowest unknowns accumulate
    assert apl.pseudo_mask.sum().item() == 6
    before = apl.pseudo_mask.clone()
    apl.on_epoch_end(4, StubModel(3), batches)  # after the last epoch: nothing (it could not train)
    assert torch.equal(apl.pseudo_mask, before)

    restored = make_method("em-apl", {"warmup": 2}, make_ctx(observed, epochs=4))
    restored.load_state_dict(save_and_load(apl.state_dict()))
    assert torch.equal(restored.pseudo_mask, apl.pseudo_mask)
    assert torch.equal(restored.pseudo_target, apl.pseudo_target)

    # diagnostics: "flagged" = unknowns not (yet) taken as negatives; before any round all are (inactive)
    restored = make_method("em-apl", {"warmup": 2}, make_ctx(observed, epochs=4))
    assert restored.epoch_diagnostics() == {}  # no epoch yet
    restored.on_epoch_start(1)
    batch = make_batch(logits, observed)
    diag = {**loop_scores((batch, restored.training_step(StubModel(3), batch, 1)), full=full),
            **restored.epoch_diagnostics()}
    assert diag["fn_active"] == 0.0 and diag["fn_precision"] == pytest.approx(diag["fn_base_rate"])
    apl.on_epoch_start(4)
    diag = {**loop_scores((batch, apl.training_step(StubModel(3), batch, 4)), full=full), **apl.epoch_diagnostics()}
    assert diag["fn_active"] == 1.0
    assert diag["fn_flagged"] == 5  # 11 unknowns, 6 pseudo-labelled
    assert diag["apl_pseudo_negative_error"] == pytest.approx(sum(full[apl.pseudo_mask]).item() / 6)


def test_apl_refuses_a_warmup_outside_the_run():
    with pytest.raises(SpmlError, match="warmup"):
        make_method("em-apl", {"warmup": 10}, make_ctx(Y, epochs=10))


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- Large loss (Kim et al.) ---------------------------------------------------------------------------

@pytest.mark.parametrize("epoch,expected", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (6, 4), (7, 4), (8, 5),
                                            (9, 6), (10, 6)])
def test_ll_schedule_voc_worked_values(epoch, expected):
    # spec: LL-Ct with Δ = 0.2 % on VOC (B·L = 16·20 = 320): k = 1 at e = 2 rising to 6 at e = 10
    assert L.large_loss_count(320, epoch, 0.2) == expected


def test_ll_schedule_coco_fixed_and_float_noise():
    assert [L.large_loss_count(1280, e, 0.2) for e in (1, 2, 10)] == [0, 3, 24]  # spec's COCO values
    assert [L.large_loss_count(320, e, 0.1, fixed=True) for e in (1, 2, 5, 10)] == [0, 1, 1, 1]  # LL-Cp
    assert L.large_loss_count(10, 30, 50.0) == 10  # never more than the batch


@pytest.mark.parametrize("entries,epoch,delta,expected,why", [
    # the official clean_rate after 9 subtractions of 0.001 leaves 1 - clean_rate = 0.009000000000000008,
    # so B·C·(1 - clean_rate) = 9.000000000000007 and the ceiling gives 10 (the exact schedule says 9)
    (1000, 10, 0.1, 10, "9.000000000000007"),
    # VOC at batch 8 (B·C = 160), Δ = 0.5 %, epoch 6: 1 - clean_rate = 0.025000000000000022 -> 4.0000000000000036
    (160, 6, 0.5, 5, "4.0000000000000036"),
    (320, 10, 0.2, 6, "5.760000000000005"),
])
def test_ll_schedule_follows_the_official_float_arithmetic(entries, epoch, delta, expected, why):
    clean_rate = 1.0  # the official per-epoch update, written out: clean_rate -= delta_rel after each epoch
    for _ in range(epoch - 1):
        clean_rate -= delta / 100
    assert repr(entries * (1 - clean_rate)) == why
    assert L.large_loss_count(entries, epoch, delta) == expected


def test_large_loss_mask_includes_ties_and_skips_observed():
    loss = torch.tensor([[5.0, 3.0, 3.0], [1.0, 9.0, 2.0]])
    unobserved = torch.tensor([[True, True, True], [True, False, True]])
    mask = L.large_loss_mask(loss, unobserved, 2)
    assert mask.tolist() == [[True, True, True], [False, False, False]]  # τ = 3, both ties, not the 9


ZL = [[0.0, 2.0, -1.0], [-1.0, 1.0, 0.5]]  # unobserved losses: (0,1) 2.127, (0,2) .313, (1,0) .313, (1,2) .974
YL = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def ll_matrix():
    return [[bce_logit(z, y) for z, y in zip(zr, yr)] for zr, yr in zip(ZL, YL)]


def test_ll_r_rejects_the_largest_unobserved_losses_mean_over_bc():
    m = ll_matrix()
    # B·C = 6, Δ = 20 %: epoch 2 -> k = ceil(1.2) = 2: the (0,1) and (1,2) losses are rejected
    expected = (m[0][0] + m[0][2] + m[1][0] + m[1][1]) / 6
    assert step_loss("ll-r", {"delta_percent": 20.0}, ZL, YL, epoch=2) == pytest.approx(expected, rel=1e-5)
    # epoch 1 is plain AN
    assert step_loss("ll-r", {"delta_percent": 20.0}, ZL, YL, epoch=1) == pytest.approx(sum(map(sum, m)) / 6, rel=1e-5)


def test_ll_ct_corrects_the_largest_losses_for_this_step():
    m = ll_matrix()
    expected = (m[0][0] + bce_logit(2.0, 1) + m[0][2] + m[1][0] + m[1][1] + bce_logit(0.5, 1)) / 6
    assert step_loss("ll-ct", {"delta_percent": 20.0}, ZL, YL, epoch=2) == pytest.approx(expected, rel=1e-5)


def test_ll_cp_fixed_k_permanent_flips_and_state():
    ctx = make_ctx(YL)
    full = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    cp = make_method("ll-cp", {"delta_percent": 10.0}, ctx)  # fixed k = ceil(6·0.1) = 1
    model = StubModel(3)
    batch = make_batch(ZL, YL)
    out = cp.training_step(model, batch, 3)
    first = (batch, out)
    m = ll_matrix()
    assert out.loss.item() == pytest.approx((sum(map(sum, m)) - m[0][1] + bce_logit(2.0, 1)) / 6, rel=1e-5)
    assert not cp.flips.any()  # flips land after the optimizer step
    cp.after_optimizer_step(make_batch(ZL, YL), 3)
    assert cp.flips.nonzero().tolist() == [[0, 1]]
    # next step: (0,1) is now a positive, the next largest unobserved loss (1,2) is corrected
    out = cp.training_step(model, batch, 3)
    expected = (m[0][0] + bce_logit(2.0, 1) + m[0][2] + m[1][0] + m[1][1] + bce_logit(0.5, 1)) / 6
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    cp.after_optimizer_step(make_batch(ZL, YL), 3)
    diag = loop_scores(first, (batch, out), full=full)
    assert diag["fn_flagged"] == 3 and diag["fn_precision"] == pytest.approx(2 / 3)  # (0,1) twice, (1,2) once
    restored = make_method("ll-cp", {"delta_percent": 10.0}, ctx)
    restored.load_state_dict(save_and_load(cp.state_dict()))
    assert torch.equal(restored.flips, cp.flips) and restored.flips.sum() == 2
    assert make_method("ll-r", {}, ctx).state_dict() == {}


def test_ll_flags_feed_the_false_negative_meter():
    ll = make_method("ll-r", {"delta_percent": 20.0}, make_ctx(YL))
    full = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]  # (0,1) is a false negative
    batch = make_batch(ZL, YL)
    diag = loop_scores((batch, ll.training_step(StubModel(3), batch, 2)), full=full)
    assert diag["fn_flagged"] == 2 and diag["fn_precision"] == 0.5 and diag["fn_recall"] == 1.0


# --- BoostLU -------------------------------------------------------------------------------------------

def test_boostlu_pooling_hand_values():
    cam = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]])
    assert L.boostlu_logits(cam, 5.0).item() == pytest.approx((5 - 2 + 15 - 4) / 4)
    assert L.boostlu_logits(cam, 1.0).item() == pytest.approx(cam.mean().item())


def test_boostlu_is_used_at_train_and_test_time_with_ll_r():
    model = StubModel(3)  # CAM = logits + (1, -1; -1, 1): z = 0 -> cells 1,-1,-1,1 -> (5 - 2 + 5)/4 = 2
    method = make_method("boostlu", {"alpha": 5.0, "delta_percent": 0.0}, make_ctx([[1.0, 0, 0]]))
    boosted = method.predict(model, images_with_logits([[0.0, 0.5, -3.0]]))
    cells = lambda z: [z + 1, z - 1, z - 1, z + 1]
    expected = [sum(5 * c if c > 0 else c for c in cells(z)) / 4 for z in (0.0, 0.5, -3.0)]
    assert boosted[0].tolist() == pytest.approx(expected)
    loss = method.training_step(model, make_batch([[0.0, 0.5, -3.0]], [[1.0, 0, 0]]), 1).loss.item()
    assert loss == pytest.approx(sum(bce_logit(z, y) for z, y in zip(expected, (1, 0, 0))) / 3, rel=1e-5)


def test_boostlu_refuses_a_model_whose_logits_are_not_its_cam_mean():
    class NotCam(StubModel):
        def forward(self, x):
            out = super().forward(x)
            return ModelOutput(out.logits + 1, out.cam)

    method = make_method("boostlu", {}, make_ctx([[1.0, 0]]))
    with pytest.raises(SpmlError, match="CAM-head"):
        method.training_step(NotCam(2), make_batch([[0.0, 1.0]], [[1.0, 0]]), 1)


# --- ASL, PLC ------------------------------------------------------------------------------------------

def test_asl_hand_values():
    # positive z = 0: -(1 - 0.5)^1 * log(0.5); negative z = 0: p_m = 0.45, -(0.45^4) * log(0.55)
    pos = -(0.5 ** 1) * math.log(0.5)
    neg = -(0.45 ** 4) * math.log(0.55)
    got = L.asl_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1.0, 4.0, 0.05)
    assert got.item() == pytest.approx(pos + neg, rel=1e-5)
    # a clearly negative prediction below the margin costs nothing
    assert L.asl_loss(torch.tensor([[-4.0]]), torch.zeros(1, 1), 1.0, 4.0, 0.05).item() == 0.0
    expected = sum(-(1 - sig(z)) * math.log(sig(z)) if y else
                   -max(sig(z) - 0.05, 0) ** 4 * math.log(1 - max(sig(z) - 0.05, 0))
                   for zr, yr in zip(Z, Y) for z, y in zip(zr, yr))
    assert step_loss("asl", {}, Z, Y) == pytest.approx(expected, rel=1e-5)  # sum reduction


def test_asl_focal_weight_gradient_is_detached_by_default():
    z = torch.tensor([[0.3]], requires_grad=True)
    L.asl_loss(z, torch.ones(1, 1), 1.0, 4.0, 0.05).backward()
    p = sig(0.3)
    assert z.grad.item() == pytest.approx(-(1 - p) * (1 - p), rel=1e-5)  # (1-p) · d(-log p)/dz


def test_plc_masks_and_normalisation():
    weak = torch.logit(torch.tensor([[0.7, 0.5, 0.2, 0.1]]))
    y = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    mask, target = L.plc_targets(weak, y, 0.6)
    # q = 0.7 (confident positive), 0.5 (unsure), 0.2 (< 0.4: confident negative), 1.1 (observed positive)
    assert mask.tolist() == [[True, False, True, True]]
    assert target.tolist() == [[True, False, False, True]]
    strong = torch.tensor([[1.0, -1.0, 0.5, -2.0]])
    expected = (bce_logit(1.0, 1) + bce_logit(0.5, 0) + bce_logit(-2.0, 1)) / 3
    assert L.plc_loss(weak, strong, y, 0.6).item() == pytest.approx(expected, rel=1e-5)
    assert L.plc_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.9).item() == 0.0  # none confident


def test_plc_method_adds_an_on_weak_view_and_flags_pseudo_positives():
    weak = torch.logit(torch.tensor([[0.7, 0.5, 0.2, 0.1]])).tolist()
    strong = [[1.0, -1.0, 0.5, -2.0]]
    observed, full = [[0.0, 0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0, 1.0]]
    an = sum(bce_logit(z, y) for z, y in zip(weak[0], observed[0])) / 4
    consistency = (bce_logit(1.0, 1) + bce_logit(0.5, 0) + bce_logit(-2.0, 1)) / 3
    method = make_method("plc", {"threshold": 0.6, "plc_weight": 2.0}, make_ctx(observed))
    assert method.needs_strong_view
    batch = make_batch(weak, observed, strong_logits=strong)
    out = method.training_step(StubModel(4), batch, 1)
    assert out.loss.item() == pytest.approx(an + 2.0 * consistency, rel=1e-5)
    diag = loop_scores((batch, out), full=full)
    assert diag["fn_flagged"] == 1 and diag["fn_precision"] == 1.0 and diag["fn_recall"] == 1.0


@pytest.mark.parametrize("name,params", [("an-ls", {"smoothing": 0.7}), ("ll-r", {"delta_percent": -1.0}),
                                         ("plc", {"threshold": 0.3}), ("boostlu", {"alpha": 0.0}),
                                         ("role", {"lr_mult": 0.0}), ("em", {"alpha": -1.0})])
def test_bad_hyperparameters_are_refused_naming_the_param(name, params):
    with pytest.raises(SpmlError, match=f"method_params.{name}"):
        make_method(name, params, make_ctx(Y))


# --- row-keyed state under DDP (two gloo processes on the CPU) ------------------------------------------

APL_OBSERVED = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
APL_LOGITS = torch.tensor([[0.0, -3.0, 1.0], [-2.0, 0.0, -1.0], [2.0, -0.5, 0.0], [-1.0, 0.5, -4.0],
                           [0.0, 1.0, 2.0], [-5.0, 0.0, 3.0]])


def apl_round(rows_seen: list[int]) -> torch.Tensor:
    apl = make_method("em-apl", {"warmup": 1, "theta": 0.9, "quota_epochs": 2}, make_ctx(APL_OBSERVED, epochs=2))
    index = torch.tensor(rows_seen)
    apl.on_epoch_end(1, StubModel(3), [make_batch(APL_LOGITS[index], APL_OBSERVED[index], index=index)])
    return apl.pseudo_mask


def test_apl_never_labels_rows_it_did_not_score():
    mask = apl_round([0, 1, 2])
    assert not mask[3:].any() and mask.any()


def _ddp_worker(rank: int, port: int, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = apl_round([0, 2, 4] if rank == 0 else [1, 3, 5]).tolist()
        cp = make_method("ll-cp", {}, make_ctx(APL_OBSERVED))
        cp.flips[rank, rank] = True
        cp.on_epoch_end(1, None, [])
        results[2 + rank] = cp.flips.nonzero().tolist()
        role = make_method("role", {"expected_positives": 1.0}, make_ctx(APL_OBSERVED))
        role.label_logits[rank].sum().backward()  # each rank touches its own row
        results[4 + rank] = role.label_logits.grad.tolist()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_combine_their_shards_into_identical_state():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2)
    single = apl_round(list(range(6))).tolist()
    assert results[0] == results[1] == single  # APL: both ranks see every row's probability
    assert results[2] == results[3] == [[0, 0], [1, 1]]  # LL-Cp: flips of both ranks
    expected = torch.zeros(6, 3)
    expected[:2] = 0.5  # ROLE: Θ's gradient averaged over the ranks, as DDP does for the model
    assert results[4] == results[5] == expected.tolist()
