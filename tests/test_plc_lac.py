"""PLC + LAC: the memory queue's pointer rule, the SupCon-style LAC loss by hand, and a training step."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from pipeline.contracts import Batch, MethodContext
from pipeline.models import build_model
from tests.conftest import make_method

plc_lac = importlib.import_module("pipeline.methods.plc-lac")  # a method module is named like its method
lac_loss, queue_update = plc_lac.lac_loss, plc_lac.queue_update

TINY_Q2L = {"layers": [1, 1, 1, 1], "width_per_group": 4, "hidden_dim": 32, "num_heads": 4, "dim_feedforward": 64}


def test_queue_pointer_rule_and_gradients():
    q, d = 4, 2
    feats, labels, ptr = torch.zeros(q, 2, d), torch.zeros(q, dtype=torch.long), torch.zeros((), dtype=torch.long)
    new = torch.arange(5 * 2 * d, dtype=torch.float).reshape(5, 2, d).requires_grad_()
    selected = torch.tensor([True, False, True, True, False])
    ids = torch.tensor([7, 8, 9, 10, 11])
    feats, labels, ptr = queue_update(feats, labels, ptr, new, selected, ids)
    assert int(ptr) == 3  # p + M = 3 < 4: p <- 3, items in [0, 3)
    assert labels.tolist() == [8, 10, 11, 0]  # class id + 1; 0 = empty
    assert torch.equal(feats[1], new[2].detach())
    feats.sum().backward()
    assert new.grad[[0, 2, 3]].eq(1).all() and new.grad[[1, 4]].eq(0).all()  # current items carry gradient

    old = feats.detach()
    new2 = torch.ones(3, 2, d, requires_grad=True)
    feats2, labels2, ptr2 = queue_update(old, labels, ptr, new2, torch.tensor([True, True, False]),
                                         torch.tensor([0, 1, 2]))
    assert int(ptr2) == 2  # 3 + 2 >= 4: restart, p <- M = 2, items in [0, 2)
    assert labels2.tolist() == [1, 2, 11, 0]  # slot 2 keeps its stale entry (not a ring buffer)
    assert torch.equal(feats2[2], old[2])


def test_queue_overflow_keeps_the_first_q_items():
    feats, labels = torch.zeros(3, 2, 1), torch.zeros(3, dtype=torch.long)
    new = torch.arange(5, dtype=torch.float).reshape(5, 1, 1).expand(5, 2, 1)
    f, lab, p = queue_update(feats, labels, torch.tensor(1), new, torch.ones(5, dtype=torch.bool), torch.arange(5))
    assert int(p) == 5 and lab.tolist() == [1, 2, 3] and f[:, 0, 0].tolist() == [0, 1, 2]


def test_lac_loss_hand_computed():
    # two classes, each with two identical views; orthogonal classes; an empty slot that must be ignored
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],
                          [[0.0, 1.0], [0.0, 1.0]],
                          [[0.6, 0.8], [0.8, 0.6]]])
    labels = torch.tensor([1, 2, 0])
    # anchor a: sims to the 3 other valid embeddings are 1, 0, 0 (T = 1); one positive (its other view)
    expected = -(1 - math.log(math.e + 2))
    torch.testing.assert_close(lac_loss(feats, labels, 1.0), torch.tensor(expected))
    # T = 0.5 scales the similarities by 2
    torch.testing.assert_close(lac_loss(feats, labels, 0.5), torch.tensor(-(2 - math.log(math.e**2 + 2))))
    # same class for both entries: each anchor has 3 positives with sims 1, 0, 0
    same = lac_loss(feats, torch.tensor([1, 1, 0]), 1.0)
    lse = math.log(math.e + 2)
    torch.testing.assert_close(same, torch.tensor(-((1 - lse) + 2 * (0 - lse)) / 3))
    assert lac_loss(feats, torch.zeros(3, dtype=torch.long), 1.0).item() == 0.0  # empty queue
    grad_in = feats.clone().requires_grad_()
    lac_loss(grad_in, labels, 0.5).backward()
    assert torch.isfinite(grad_in.grad).all()


def _ctx(num_classes, b):
    return MethodContext(dataset="synthetic", model="q2l", num_classes=num_classes, num_train=b, epochs=2,
                         steps_per_epoch=1, mean_positives=1.5, observed_train=torch.zeros(b, num_classes),
                         device=torch.device("cpu"))


@pytest.mark.parametrize("epoch,expect_lac", [(1, False), (2, True)])
def test_training_step_on_tiny_q2l(epoch, expect_lac):
    torch.manual_seed(0)
    b, c = 3, 4
    method = make_method("plc-lac", {"stage1_epochs": 1, "threshold": 0.55, "queue_size": 16, "proj_dim": 8},
                          _ctx(c, b))
    model = build_model("q2l", c, **TINY_Q2L, **method.model_kwargs())
    observed = torch.eye(b, c)
    batch = Batch(index=torch.arange(b), image=torch.randn(b, 3, 64, 64), observed=observed,
                  strong=torch.randn(b, 3, 64, 64))
    out = method.training_step(model, batch, epoch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.projector[0].weight.grad is not None
    assert ("lac_loss" in out.logs) == expect_lac
    if expect_lac:
        # at least the 3 observed positives entered the queue, two views each, unit norm
        filled = method.queue_labels > 0
        assert int(filled.sum()) >= 3 and int(method.queue_ptr) == int(filled.sum())
        torch.testing.assert_close(method.queue_feats[filled].norm(dim=-1), torch.ones(int(filled.sum()), 2))
        state = method.state_dict()
        other = make_method("plc-lac", {"queue_size": 16, "proj_dim": 8}, _ctx(c, b))
        other.load_state_dict(state)
        assert torch.equal(other.queue_labels, method.queue_labels)


def test_plc_lac_on_resnet50_says_to_use_q2l():
    from pipeline.errors import SpmlError

    method = make_method("plc-lac", {}, _ctx(3, 2))
    with pytest.raises(SpmlError, match="projector_dim"):
        build_model("resnet50", 3, layers=[1, 1, 1, 1], width_per_group=4, **method.model_kwargs())
