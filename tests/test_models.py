"""ResNet-50 (1x1-conv CAM head) and Query2Label: shapes, CAMs, frozen parts, weights, state dicts.

Tiny variants (1 bottleneck per stage, narrow groups, small transformer) keep this fast on a CPU; the
default sizes are checked by parameter count only (the spec's numbers), without a forward pass.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline.contracts import ModelOutput
from pipeline.errors import SpmlError
from pipeline.models import build_model
from pipeline.models.q2l import sine_position_encoding
from pipeline.models.resnet50 import trunk_features
from pipeline.models.weights import resolve_weights, verified_state_dict

TINY_TRUNK = {"layers": [1, 1, 1, 1], "width_per_group": 4}
TINY_Q2L = {**TINY_TRUNK, "hidden_dim": 32, "num_heads": 4, "dim_feedforward": 64}


def _sha(path) -> str:
    from pipeline.io import sha256_file

    return sha256_file(path)


def test_default_sizes_match_the_spec_parameter_counts():
    with torch.device("meta"):  # count without allocating 175 M parameters
        q2l = build_model("q2l", 20)
    assert sum(p.numel() for p in q2l.parameters()) == 174_615_764  # datasets.md section 6, VOC
    assert sum(p.numel() for p in q2l.parameters() if p.requires_grad) == 174_615_764 - 222_400
    with torch.device("meta"):
        resnet = build_model("resnet50", 20)
    # trunk convs 23,454,912 + BN 53,120 + 1x1 head 2048*20 + 20
    assert sum(p.numel() for p in resnet.parameters()) == 23_454_912 + 53_120 + 2048 * 20 + 20


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_resnet50_forward_backward_cam_is_the_class_map(size):
    torch.manual_seed(0)
    model = build_model("resnet50", 5, **TINY_TRUNK)
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert isinstance(out, ModelOutput) and out.embeddings is None
    assert out.logits.shape == (2, 5) and out.cam.shape == (2, 5, size[0] // 32, size[1] // 32)
    torch.testing.assert_close(out.logits, out.cam.mean(dim=(2, 3)))  # GAP of the raw (signed) CAM
    out.logits.sum().backward()
    assert model.head.weight.grad is not None and model.trunk.conv1.weight.grad is not None
    logits, cam = out  # still a 2-tuple
    assert logits is out.logits and cam is out.cam


def test_q2l_forward_backward_any_input_size_and_attention_cam():
    torch.manual_seed(0)
    model = build_model("q2l", 6, **TINY_Q2L).eval()
    for h, w in [(64, 64), (96, 64)]:
        x = torch.randn(2, 3, h, w)
        out = model(x)
        assert out.logits.shape == (2, 6) and out.cam.shape == (2, 6, h // 32, w // 32)
        assert out.embeddings.shape == (2, 6, 32)
        # CAM = head-averaged attention (sums to 1 over locations) x channel mean of layer4 (>= 0)
        energy = trunk_features(model.trunk, x).mean(dim=1)
        attention = out.cam / energy[:, None].clamp(min=1e-12)
        torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(2, 6), atol=1e-4, rtol=0)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    (out.logits.sum() + out.cam.sum()).backward()
    assert model.trunk.conv1.weight.grad is None and not model.trunk.layer1[0].conv1.weight.requires_grad
    assert model.trunk.layer2[0].conv1.weight.grad is not None
    assert model.query_embed.weight.grad is not None and model.fc.weight.grad is not None
    groups = model.parameter_groups(1e-4, 2.0)
    assert groups[1]["lr"] == 2e-4
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_q2l_projector_embeddings_are_unit_norm():
    model = build_model("q2l", 3, **TINY_Q2L, projector_dim=8).eval()
    emb = model(torch.randn(2, 3, 64, 64)).embeddings
    assert emb.shape == (2, 3, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))


def test_sine_position_encoding_hand_computed():
    # h = w = 2, dim 4: per axis 2 channels (sin, cos) of the position normalised to (0, 2pi]
    pos = sine_position_encoding(2, 2, 4, "cpu")
    assert pos.shape == (4, 4)
    y1, x2 = 1 / (2 + 1e-6) * 2 * math.pi, 2 / (2 + 1e-6) * 2 * math.pi
    expected = torch.tensor([math.sin(y1), math.cos(y1), math.sin(x2), math.cos(x2)])  # row 0, column 1
    torch.testing.assert_close(pos[1], expected)
    # a larger map is not a crop of a smaller one: the positions are normalised to the actual size
    assert not torch.allclose(sine_position_encoding(4, 4, 4, "cpu")[1], pos[1])


@pytest.mark.parametrize("name,kwargs", [("resnet50", TINY_TRUNK), ("q2l", TINY_Q2L)])
def test_state_dict_round_trip(name, kwargs):
    torch.manual_seed(1)
    a = build_model(name, 4, **kwargs).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(2)
    b = build_model(name, 4, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(a(x).logits, b(x).logits)
    b.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(a(x).logits, b(x).logits)
    torch.testing.assert_close(a(x).cam, b(x).cam)


def test_weights_file_is_checked_by_sha256(tmp_path):
    torch.manual_seed(3)
    source = build_model("resnet50", 4, **TINY_TRUNK)
    path = tmp_path / "trunk.pth"
    state = {k: v for k, v in source.trunk.state_dict().items()}
    state["fc.weight"] = torch.zeros(2, 2)  # classifier keys of a torchvision file are dropped
    torch.save(state, path)
    right = _sha(path)
    with pytest.raises(SpmlError, match="SHA-256"):
        build_model("resnet50", 4, **TINY_TRUNK, weights=str(path))  # default: the IMAGENET1K_V1 hash
    with pytest.raises(SpmlError, match="SHA-256"):
        verified_state_dict(path, "0" * 64)
    loaded = build_model("resnet50", 4, **TINY_TRUNK, weights=str(path), weights_sha256=right)
    for key, value in source.trunk.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[key], value), key
    # the same file into the frozen-BN Q2L trunk (FrozenBatchNorm2d has no num_batches_tracked)
    q2l = build_model("q2l", 4, **TINY_Q2L, weights=str(path), weights_sha256=right)
    assert torch.equal(q2l.trunk.layer1[0].conv1.weight, source.trunk.layer1[0].conv1.weight)
    with pytest.raises(SpmlError, match="does not exist"):
        build_model("resnet50", 4, **TINY_TRUNK, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(SpmlError, match="do not fit"):
        build_model("resnet50", 4, weights=str(path), weights_sha256=right)  # full-size trunk, tiny file


def test_imagenet_weights_come_from_a_preseeded_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    target.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1)}, target)  # not the real file: refused by hash, no download
    with pytest.raises(SpmlError, match="SHA-256"):
        resolve_weights("imagenet")
    assert resolve_weights("none") is None and resolve_weights(None) is None
