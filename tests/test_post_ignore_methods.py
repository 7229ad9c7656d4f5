"""GR Loss, VLPL and AEVLP (docs/methods/): the losses against the specs' worked examples, the schedules and
the pseudo-label rules on small score tables, and the whole CLIP path with a tiny randomly initialised
open_clip model (stage clip-scores on the tiny workspace, then training and the report)."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.config import deep_merge
from pipeline.errors import SpmlError
from pipeline.methods import losses
from tests.conftest import tiny_params, write_params

vlpl = importlib.import_module("pipeline.methods.vlpl")
aevlp = importlib.import_module("pipeline.methods.aevlp")
runner = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"})

D = torch.float64
# the specs' worked example: B = 2, L = 3
F_ = torch.tensor([[0.80, 0.30, 0.05], [0.10, 0.60, 0.90]], dtype=D)
Y = torch.tensor([[1.0, 0, 0], [0, 0, 1]], dtype=D)
LOGITS = torch.log(F_ / (1 - F_))
GR_DEFAULTS = {"k_weight": [0.0, 2.0], "k_bias": [-2.0, -2.0], "v_mean": [0.5, 0.8], "v_std": [2.0, 0.5]}


# ------------------------------------------------------------------------------------------------ GR Loss
def test_gr_schedules_of_the_code_defaults():
    """T = 8: w = 0, 0.25, ..., 1.75 (w_T never reached); b = -2; mu = 0.5375 ... 0.8; sigma = 1.8125 ... 0.5."""
    values = [losses.gr_schedule(e, 8, **GR_DEFAULTS) for e in range(1, 9)]
    assert [v[0] for v in values] == pytest.approx([0.25 * i for i in range(8)])
    assert all(v[1] == -2.0 for v in values)
    assert [v[2] for v in values] == pytest.approx([0.5 + 0.0375 * e for e in range(1, 9)])
    assert [v[3] for v in values] == pytest.approx([2.0 - 0.1875 * e for e in range(1, 9)])
    assert values[-1][2:] == pytest.approx((0.8, 0.5))
    # COCO's beta [0, 10, -2, -8] over 8 epochs: b moves too, and stops one step short of -8
    w, b, _, _ = losses.gr_schedule(8, 8, [0.0, 10.0], [-2.0, -8.0], [0.5, 0.8], [2.0, 0.5])
    assert (w, b) == pytest.approx((8.75, -7.25))


def test_gr_loss_matches_the_spec_worked_example():
    """docs/methods/gr-loss.md: mean 0.34194 at epoch 1, 0.23845 at epoch 8 (T = 8, q2 = 0.01, q3 = 1)."""
    loss, k, v = losses.gr_loss(LOGITS, Y, *losses.gr_schedule(1, 8, **GR_DEFAULTS), 0.01, 1.0)
    assert loss.item() == pytest.approx(0.34194, abs=5e-6)
    assert torch.allclose(k, torch.full_like(k, 0.11920), atol=5e-6)
    assert torch.allclose(v, torch.tensor([[0.98957, 0.99145, 0.96448], [0.97129, 0.99941, 0.98020]], dtype=D),
                          atol=5e-6)
    # entry (0, 1) by hand: 0.99145 * (0.11920 * (1 - 0.3^0.01) / 0.01 + 0.88080 * 0.3)
    by_hand = 0.99145 * (0.11920 * (1 - 0.3 ** 0.01) / 0.01 + 0.88080 * 0.3)
    entry = losses.gr_unobserved(F_, k, v, 0.01, 1.0)[0, 1]
    assert entry.item() == pytest.approx(by_hand, abs=1e-4) and by_hand == pytest.approx(0.40342, abs=1e-4)

    def entries(k, v):  # the doc's entry matrix: -log(f + 1e-7) on the observed positives, the GR term elsewhere
        return torch.where(Y > 0, losses.gr_log_pos(F_), losses.gr_unobserved(F_, k, v, 0.01, 1.0))

    assert torch.allclose(entries(k, v), torch.tensor([[0.22314, 0.40342, 0.38178], [0.34910, 0.58886, 0.10536]],
                                                      dtype=D), atol=5e-6)
    loss, k, v = losses.gr_loss(LOGITS, Y, *losses.gr_schedule(8, 8, **GR_DEFAULTS), 0.01, 1.0)
    assert loss.item() == pytest.approx(0.23845, abs=5e-6)
    # epoch 8's entries (the doc first printed 0.28318 / 0.13750 / 0.15087 / 0.53065; recomputed by hand from
    # K = sigmoid(1.75 f - 2), V = exp(-(f - 0.8)^2 / 0.5), V (K (1 - f^0.01) / 0.01 + (1 - K) f))
    assert torch.allclose(entries(k, v), torch.tensor([[0.22314, 0.28323, 0.13746], [0.15093, 0.53058, 0.10536]],
                                                      dtype=D), atol=5e-6)
    # K = sigmoid(1.75 f - 2); the spec first printed 0.18624 and 0.13876 for (0, 1) and (1, 0), a slip in the
    # fourth decimal (sigmoid(-1.475) = 0.18618, sigmoid(-1.825) = 0.13883; the loss was right)
    assert torch.allclose(k, torch.tensor([[0.35434, 0.18618, 0.12870], [0.13883, 0.27888, 0.39532]], dtype=D),
                          atol=5e-6)
    assert torch.allclose(v, torch.tensor([[1.0, 0.60653, 0.32465], [0.37531, 0.92312, 0.98020]], dtype=D),
                          atol=5e-6)
    # the observed positives: -log(f + 1e-7)
    assert losses.gr_log_pos(torch.tensor(0.8, dtype=D)).item() == pytest.approx(0.22314, abs=5e-6)


def test_gr_loss_gradient_flows_through_the_robust_terms_only():
    logits = LOGITS.clone().requires_grad_(True)
    loss, k, v = losses.gr_loss(logits, Y, *losses.gr_schedule(3, 8, **GR_DEFAULTS), 0.01, 1.0)
    assert not k.requires_grad and not v.requires_grad
    loss.backward()
    # unobserved entry (0, 2): d/dz of V[K L2 + (1-K) f] / 6 with K, V constant
    p, kk, vv = F_[0, 2], k[0, 2], v[0, 2]
    dloss_dp = vv * (-kk * p ** (0.01 - 1) + (1 - kk)) / 6
    assert logits.grad[0, 2].item() == pytest.approx((dloss_dp * p * (1 - p)).item(), rel=1e-9)


def test_gr_pseudo_positives_are_where_the_term_pushes_up_at_one_half():
    """K * 2^(1-q2) > (1-K) * 2^(1-q3): with q3 = 1, K / (1-K) > 2^(q2-1), about K > 1/3."""
    k = torch.tensor([0.30, 0.3330, 0.3350, 0.60])
    assert losses.gr_pushes_up(k, 0.01, 1.0).tolist() == [False, False, True, True]
    # q3 = 1.5 (CUB): the negative term pulls harder near 1/2: K / (1-K) > 2^(q2 - q3) = 2^-1.49
    assert losses.gr_pushes_up(torch.tensor([0.25, 0.27]), 0.01, 1.5).tolist() == [False, True]


# ------------------------------------------------------------------------------------------------ VLPL
def test_vlpl_pseudo_labels_and_loss_match_the_spec_worked_example():
    """docs/methods/vlpl.md: tau 0.01, theta 0.3, alpha 0.2, beta+ 0.7 -> loss 0.08126."""
    cos = torch.tensor([[0.30, 0.29, 0.22], [0.21, 0.27, 0.26]], dtype=D)
    probs = torch.softmax(cos / 0.01, dim=1)
    assert torch.allclose(probs, torch.tensor([[0.73088, 0.26888, 0.00025], [0.00181, 0.72974, 0.26845]],
                                              dtype=D), atol=5e-6)
    u = vlpl.vlpl_pseudo_positives(cos, 0.01, 0.3)
    assert u.tolist() == [[True, False, False], [False, True, False]]  # row 1's observed class 2 is below theta
    pseudo = u & (Y == 0)  # row 0's pseudo-positive is its observed positive
    assert pseudo.tolist() == [[False, False, False], [False, True, False]]
    loss = vlpl.vlpl_loss(LOGITS, Y, pseudo, alpha=0.2, positive_weight=0.7, positive_target=0.9)
    entries = [0.22313, -0.12217, -0.03970, -0.06501, 0.38595, 0.10535]
    assert loss.item() == pytest.approx(sum(entries) / 6, abs=2e-5)
    assert loss.item() == pytest.approx(0.08126, abs=1e-5)


def test_vlpl_threshold_is_strict_and_at_most_floor_one_over_theta_classes_pass():
    cos = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # softmax 0.25 each
    assert not vlpl.vlpl_pseudo_positives(cos, 0.01, 0.25).any()
    assert vlpl.vlpl_pseudo_positives(cos, 0.01, 0.2499).all()
    many = torch.rand(50, 20, generator=torch.Generator().manual_seed(0))
    assert vlpl.vlpl_pseudo_positives(many, 0.05, 0.3).sum(dim=1).max() <= 3


# ------------------------------------------------------------------------------------------------ AEVLP
SG = torch.tensor([[0.55, 0.35, 0.10], [0.02, 0.68, 0.30]], dtype=D)
TILES = torch.tensor([[[0.70, 0.20, 0.10], [0.25, 0.70, 0.05], [0.80, 0.15, 0.05], [0.40, 0.25, 0.35]],
                      [[0.99, 0.005, 0.005], [0.01, 0.90, 0.09], [0.01, 0.80, 0.19], [0.01, 0.70, 0.29]]], dtype=D)


def test_damp_matches_the_spec_worked_example():
    """docs/methods/aevlp.md: g = 2, top-k 2, theta 0.5, eta 0.3, r = floor(0.34 * 3) = 1."""
    positive, veto = aevlp.damp_pseudo_labels(SG, TILES, Y, eta=0.3, top_k=2, threshold=0.5,
                                              vetoed=math.floor(0.34 * 3))
    # row 0: top-2 {0, 1} both >= 0.5, class 2 vetoed; row 1: top-2 {1, 0}, but class 0 is vetoed
    assert positive.tolist() == [[True, True, False], [False, True, False]]
    assert veto.tolist() == [[False, False, True], [True, False, False]]
    final = torch.where(Y > 0, Y, positive.to(D))
    assert final.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_damp_adaptive_threshold_and_the_images_without_a_positive():
    # eta_1 = min(0.3, S^g at class 2 = 0.30) = 0.3: the tile max 0.29 of class 2 is not > 0.3, so its local
    # score takes the tile min: 0.5 (0.30 + 0.005) = 0.1525; with theta 0.15 and top-3 that still passes
    positive, _ = aevlp.damp_pseudo_labels(SG, TILES, Y, eta=0.3, top_k=3, threshold=0.15, vetoed=0)
    assert positive[1].tolist() == [True, True, True]
    positive, _ = aevlp.damp_pseudo_labels(SG, TILES, Y, eta=0.3, top_k=3, threshold=0.153, vetoed=0)
    assert positive[1].tolist() == [True, True, False]
    # no observed positive: eta_n = 0, so every class takes its tile max (0.29 > 0): 0.5 (0.30 + 0.29) = 0.295
    positive, _ = aevlp.damp_pseudo_labels(SG, TILES, torch.zeros_like(Y), eta=0.3, top_k=3, threshold=0.29,
                                           vetoed=0)
    assert positive[1].tolist() == [True, True, True]
    # eta = 0 (VOC): always the max over the tiles
    positive, _ = aevlp.damp_pseudo_labels(SG, TILES, Y, eta=0.0, top_k=3, threshold=0.29, vetoed=0)
    assert positive[1].tolist() == [True, True, True]


def test_gpr_loss_matches_the_spec_worked_example():
    """VOC settings, epoch 1 of 8: lambda (0.7, 0.4), rho 0.9, lambda_reg 0.05, k-bar 1.5 -> 0.288025."""
    pseudo = torch.tensor([[False, True, False], [False, True, False]])
    schedule = losses.gr_schedule(1, 8, **GR_DEFAULTS)
    loss, _, _ = aevlp.gpr_loss(LOGITS, Y, pseudo, schedule, 0.01, 1.0, [0.7, 0.4], 0.9, 0.05, 1.5)
    assert loss.item() == pytest.approx(0.288025, abs=2e-6)
    # the parts: mean 0.287938 and R = (mean row sum 1.375 - 1.5)^2 / 9 = 0.0017361 (the spec first wrote 2.35
    # for the mean row sum, a slip: its R and loss are the 1.375 ones)
    unreg, _, _ = aevlp.gpr_loss(LOGITS, Y, pseudo, schedule, 0.01, 1.0, [0.7, 0.4], 0.9, 0.0, 1.5)
    assert unreg.item() == pytest.approx(0.287938, abs=2e-6)
    assert (loss - unreg).item() == pytest.approx(0.05 * (1.375 - 1.5) ** 2 / 9, rel=1e-9)
    # a pseudo-positive's weight is 1 - clip(V, 0.3, 0.6) = 0.4 here: 0.4 (0.9 l+(0.3) + 0.1 l-(0.3)) = 0.44770
    assert 0.4 * (0.9 * -math.log(0.3 + 1e-7) + 0.1 * -math.log(0.7 + 1e-7)) == pytest.approx(0.44770, abs=5e-6)
    # without pseudo-labels, and no regulariser, GPR is GR Loss
    gr, _, _ = losses.gr_loss(LOGITS, Y, *schedule, 0.01, 1.0)
    plain, _, _ = aevlp.gpr_loss(LOGITS, Y, torch.zeros_like(pseudo), schedule, 0.01, 1.0, [0.7, 0.4], 0.9, 0.0, 1.5)
    assert plain.item() == pytest.approx(gr.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ CLIP
def test_label_graph_by_hand():
    from pipeline.clip import label_graph

    relation = torch.tensor([[1.0, 0.8, 0.2, 0.4], [0.8, 1.0, 0.6, 0.1], [0.2, 0.6, 1.0, 0.3], [0.4, 0.1, 0.3, 1.0]])
    adj = label_graph(relation, topk=3, reweight=0.2)
    # row 0 keeps {1.0 (self), 0.8, 0.4}, drops the diagonal: 0.8, 0.4 -> 0.2 * (2/3, 1/3), diagonal 0.8
    assert torch.allclose(adj[0], torch.tensor([0.8, 0.2 * 2 / 3, 0.0, 0.2 / 3]))
    assert torch.allclose(adj.sum(dim=1), torch.ones(4))


def test_random_text_gcn_is_seeded_and_a_residual():
    from pipeline.clip import random_text_gcn

    text = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    a = random_text_gcn(text, hidden=16, topk=3, reweight=0.2, seed=0)
    assert torch.equal(a, random_text_gcn(text, hidden=16, topk=3, reweight=0.2, seed=0))
    assert not torch.allclose(a, random_text_gcn(text, hidden=16, topk=3, reweight=0.2, seed=1))
    assert a.shape == text.shape and not torch.allclose(a, text)


def test_tiles_are_row_major_and_leave_the_remainder_uncovered():
    from PIL import Image

    from pipeline.clip import image_views

    # a 10 x 7 image whose red channel is the column and green channel the row
    cols, rows = np.meshgrid(np.arange(10), np.arange(7))
    pixels = np.stack([cols * 20, rows * 30, np.zeros_like(cols)], axis=-1).astype(np.uint8)
    views = image_views(Image.fromarray(pixels), size=4, tiles=3)  # tiles of 3 x 2 px
    assert views.shape == (10, 3, 4, 4)
    # tile (row 1, col 2) covers columns 6-8 and rows 2-3: never column 9 or row 6
    tile = views[1 + 1 * 3 + 2]
    assert 6 * 20 <= tile[0].min() and tile[0].max() <= 8 * 20
    assert 2 * 30 <= tile[1].min() and tile[1].max() <= 3 * 30


def vl_params(tmp_path, **overrides):
    params = deep_merge(tiny_params(), {"vl_methods": ["vlpl", "aevlp"], "train": {"default": {"epochs": 1}}})
    return write_params(tmp_path, deep_merge(params, overrides))


def test_the_clip_path_end_to_end_with_a_tiny_random_clip(tiny_workspace):
    """spml clip-scores (every vl_methods entry) -> deterministic tables marked meaningless -> one epoch of
    vlpl and aevlp reading them -> the aggregate report marks both rows."""
    from pipeline.cli import app
    from pipeline.clip_scores import read_clip_scores
    from pipeline.tables import read_label_table
    from stages import aggregate, train

    params = vl_params(tiny_workspace)
    result = runner.invoke(app, ["clip-scores", "synthetic", "--params", str(params)])
    assert result.exit_code == 0, result.output
    table = read_label_table("data/prepared/synthetic.parquet")
    n, c = len(table.rows("train")), table.num_classes
    first = {}
    for method, tiles in (("vlpl", 0), ("aevlp", 16)):
        scores = read_clip_scores("synthetic", method, n, c)
        assert scores.global_cos.shape == (n, 2, c) and scores.tile_cos.shape == (n, tiles, 2, c)
        assert not scores.meaningful and scores.meta["random_init"] and scores.meta["weights_sha256"] is None
        assert np.abs(scores.global_cos).max() <= 1 + 1e-5
        assert not np.array_equal(scores.global_cos[:, 0], scores.global_cos[:, 1])  # the flip is a view
        first[method] = scores
    assert scores.meta["text_gcn"] == "random" and scores.meta["prompt"] == "a photo of a {}."
    # no official files for synthetic: each method's official inputs ran on the substitutes, recorded as such
    assert first["vlpl"].substitutes == ["text_features"] and first["aevlp"].substitutes == ["class_names", "relation"]
    # the same params give the same table (seeded random weights, seeded GCN)
    assert runner.invoke(app, ["clip-scores", "synthetic", "aevlp", "--params", str(params)]).exit_code == 0
    again = read_clip_scores("synthetic", "aevlp", n, c)
    assert np.array_equal(again.global_cos, first["aevlp"].global_cos)
    assert np.array_equal(again.tile_cos, first["aevlp"].tile_cos)
    # another seed, other random weights
    reseeded = vl_params(tiny_workspace, clip={"aevlp": {"synthetic": {"seed": 1}}})
    assert runner.invoke(app, ["clip-scores", "synthetic", "aevlp", "--params", str(reseeded)]).exit_code == 0
    assert not np.array_equal(read_clip_scores("synthetic", "aevlp", n, c).global_cos, first["aevlp"].global_cos)
    runner.invoke(app, ["clip-scores", "synthetic", "aevlp", "--params", str(params)])

    for method in ("vlpl", "aevlp", "gr-loss"):
        metrics = train.run("synthetic", method, 0, params)
        assert 0 < metrics["test_map"] <= 100
        history = pd.read_csv(f"runs/synthetic/{method}/0/history.csv")
        assert {"fn_flagged", "fn_precision", "fn_recall"} <= set(history.columns), method
        if method != "gr-loss":
            assert history.clip_meaningful.eq(0).all() and history.fn_flagged.gt(0).all()
            assert history.clip_substitutes.eq(1 if method == "vlpl" else 2).all()
    assert "damp_negative_error" in pd.read_csv("runs/synthetic/aevlp/0/history.csv").columns
    grid = yaml.safe_load(params.read_text())
    grid["methods"] = ["an", "full", "gr-loss"]
    for method in ("an", "full"):
        train.run("synthetic", method, 0, params)
    aggregate.run(write_params(tiny_workspace, grid), tiny_workspace / "reports")
    results = (tiny_workspace / "reports/results.md").read_text()
    assert "| vlpl |" in results and "| aevlp |" in results and "| gr-loss |" in results
    assert results.count("| vlpl †‡ |") == 1 and "† random CLIP weights" in results
    assert "| aevlp | " in results and " †‡ | 1 |" in results and "‡ ran on substitutes" in results
    assert "| gr-loss † |" not in results
    summary = json.loads((tiny_workspace / "reports/summary.json").read_text())["synthetic"]
    assert summary["vlpl"]["clip_random_weights"] and summary["aevlp"]["clip_random_weights"]
    assert "clip_random_weights" not in summary["gr-loss"] and summary["vlpl"]["gap_closed"] is None
    assert summary["vlpl"]["clip_substitutes"] and "clip_substitutes" not in summary["gr-loss"]
    runs = pd.read_csv(tiny_workspace / "reports/runs.csv")
    assert dict(zip(runs.method, runs.clip_random_weights)) == {"an": False, "full": False, "gr-loss": False,
                                                                "vlpl": True, "aevlp": True}
    assert "vlpl †" in (tiny_workspace / "reports/diagnostics.md").read_text()


def test_a_vl_method_without_its_clip_scores_says_which_stage_to_run(tiny_workspace):
    from stages import train

    with pytest.raises(SpmlError, match=r"data/clip/synthetic/vlpl.*run `spml clip-scores synthetic vlpl`"):
        train.run("synthetic", "vlpl", 0, vl_params(tiny_workspace))


def test_clip_scores_of_another_prepared_table_are_refused(tiny_workspace):
    from pipeline.clip_scores import read_clip_scores
    from stages import clip_scores

    params = yaml.safe_load(vl_params(tiny_workspace).read_text())
    clip_scores.run("synthetic", "vlpl")
    meta_path = tiny_workspace / "data/clip/synthetic/vlpl/meta.json"
    meta = json.loads(meta_path.read_text())
    n = meta["rows"]
    with pytest.raises(SpmlError, match="training images"):
        read_clip_scores("synthetic", "vlpl", n + 1, meta["num_classes"])
    meta_path.write_text(json.dumps({**meta, "labels_sha256": "0" * 64}))
    with pytest.raises(SpmlError, match="computed from another .*rerun|computed from another"):
        read_clip_scores("synthetic", "vlpl", n, meta["num_classes"])
    assert params["vl_methods"] == ["vlpl", "aevlp"]


@pytest.fixture
def no_clip_cache(tmp_path, monkeypatch):
    """open_clip's caches point into an empty folder (nothing is ever downloaded)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_real_clip_model_without_its_weights_is_a_one_line_error_naming_the_key(tiny_workspace, no_clip_cache):
    from pipeline.cli import app

    real = yaml.safe_load(vl_params(tiny_workspace).read_text())
    del real["clip"]["vlpl"]["synthetic"]  # the default block: ViT-L-14-336, openai
    params = write_params(tiny_workspace, real)
    result = runner.invoke(app, ["clip-scores", "synthetic", "vlpl", "--params", str(params)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    message = " ".join(lines)
    assert message.startswith("error: CLIP weights ViT-L-14-336/openai are not in open_clip's cache")
    assert "clip.vlpl.weights" in message and "3035c92b" in message
    assert not (tiny_workspace / "data/clip/synthetic/vlpl").exists()


def test_clip_weights_files_are_pinned(tiny_workspace, no_clip_cache):
    from pipeline.clip import clip_params, resolve_weights

    weights = tiny_workspace / "ViT-B-16.pt"
    weights.write_bytes(b"not the real weights")
    base = yaml.safe_load(vl_params(tiny_workspace).read_text())
    del base["clip"]["aevlp"]["synthetic"]
    base["clip"]["aevlp"]["default"]["weights"] = str(weights)
    with pytest.raises(SpmlError, match=r"have SHA-256 [0-9a-f]{64}, but params clip.aevlp.sha256 pins 5806e77c"):
        resolve_weights(clip_params(base, "synthetic", "aevlp"), "clip.aevlp")
    base["clip"]["aevlp"]["default"]["sha256"] = None
    with pytest.raises(SpmlError, match=r"not pinned: set params clip.aevlp.sha256 to [0-9a-f]{64}"):
        resolve_weights(clip_params(base, "synthetic", "aevlp"), "clip.aevlp")
    base["clip"]["aevlp"]["default"]["weights"] = str(tiny_workspace / "missing.pt")
    with pytest.raises(SpmlError, match=r"missing.pt \(params clip.aevlp.weights\) does not exist"):
        resolve_weights(clip_params(base, "synthetic", "aevlp"), "clip.aevlp")


@pytest.mark.parametrize("block,fragment", [
    ({"pretrained": "openai"}, "random_init_config builds random weights"),
    ({"prompt": "a photo"}, "must hold one {} for the class name"),
    ({"tiles": -1}, "tiles must be >= 0"),
    ({"random_init_config": {"no_such_key": 1}}, "random_init_config is not an open_clip model config"),
])
def test_bad_clip_params_are_one_line_errors(tiny_workspace, block, fragment):
    from stages import clip_scores

    params = vl_params(tiny_workspace, clip={"vlpl": {"synthetic": block}})
    with pytest.raises(SpmlError) as info:
        clip_scores.run("synthetic", "vlpl", params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_aggregate_grid_holds_the_vl_methods():
    from stages.aggregate import grid

    params = {"datasets": ["synthetic"], "methods": ["an"], "ablations": ["an-cons"], "vl_methods": ["vlpl"],
              "seeds": [0]}
    assert grid(params) == (["synthetic"], ["an", "an-cons", "vlpl"], [0])
    with pytest.raises(SpmlError, match="params vl_methods must be a list"):
        grid({**params, "vl_methods": None})


def test_a_resume_checkpoint_is_tied_to_the_clip_scores_it_was_trained_with(workspace):
    """Changed CLIP scores (a new `clip-scores` run) invalidate a resume checkpoint of vlpl/aevlp: their files
    are part of the run's fingerprint (Method.input_files); other methods read none."""
    from pipeline import paths
    from pipeline.methods import get_method_class
    from pipeline.runtime.checkpoint import run_fingerprint

    folder = paths.clip_scores_dir("synthetic", "vlpl")
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    (folder / "scores.npy").write_bytes(b"one")
    files = get_method_class("vlpl").input_files("synthetic")
    assert [f.name for f in files] == ["meta.json", "scores.npy"]
    assert get_method_class("em").input_files("synthetic") == []
    before = run_fingerprint({}, 1, files)["inputs"]
    (folder / "scores.npy").write_bytes(b"two")
    assert run_fingerprint({}, 1, files)["inputs"] != before
