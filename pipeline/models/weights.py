"""ImageNet weights for the ResNet-50 trunks, pinned by SHA-256 and loadable offline.

(:func:`verified_state_dict` is shared: other models, e.g. EfficientNet-Lite0, pin their own file with it.)

Every SPML paper used torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` (what ``pretrained=True`` maps to).
``weights`` (a model parameter, ``params.yaml: models.<name>.weights`` or ``spml train --weights``) is one of:

* ``none``: random initialisation (tests, timing);
* ``imagenet``: the V1 file from the torch hub cache (``$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth``),
  downloaded through torchvision's weights API when missing and a network is reachable;
* a path to a ``.pth`` state dict (offline machines), checked against the same SHA-256 unless another
  hash is given (``weights_sha256``).

torch's own hash check runs only when it downloads; a cached file is re-hashed here on every load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import SpmlError
from pipeline.io import sha256_file

RESNET50_IMAGENET1K_V1_SHA256 = "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"
RESNET50_IMAGENET1K_V1_FILE = "resnet50-0676ba61.pth"


def hub_checkpoint_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_IMAGENET1K_V1_FILE


def _download_imagenet_v1() -> Path:
    from torchvision.models import ResNet50_Weights

    target = hub_checkpoint_path()
    try:
        ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types (URLError, OSError, RuntimeError)
        raise SpmlError(f"ImageNet weights are not at {target} and the download failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); copy {RESNET50_IMAGENET1K_V1_FILE} "
                        "there (or set TORCH_HOME), or pass --weights PATH") from None
    return target


def verified_state_dict(path: str | Path, expected_sha256: str = RESNET50_IMAGENET1K_V1_SHA256,
                        source: str = "torchvision ResNet50_Weights.IMAGENET1K_V1",
                        remedy: str = "use the right file or set weights_sha256") -> dict:
    """Load a state dict after checking the file's SHA-256 (a one-line SpmlError if it differs).

    ``source`` names the file the hash pins and ``remedy`` says what to do on a mismatch; the defaults are the
    ResNet-50 trunks' (which may take another hash), other models pass their own."""
    path = Path(path)
    if not path.is_file():
        raise SpmlError(f"weights file {path} does not exist; pass an existing .pth file, 'imagenet' or 'none'")
    digest = sha256_file(path)
    if digest != expected_sha256.lower():
        raise SpmlError(f"weights file {path} has SHA-256 {digest[:16]}..., expected {expected_sha256[:16]}... "
                        f"({source}); {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unloadable file gets the same advice
        raise SpmlError(f"weights file {path} is not a loadable state dict ({type(exc).__name__}); replace it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpmlError(f"weights file {path} does not hold a state dict; replace it")
    return state


def resolve_weights(weights: str | None, expected_sha256: str = RESNET50_IMAGENET1K_V1_SHA256) -> dict | None:
    """``none``/None -> None; ``imagenet`` -> the hub-cached V1 file (downloaded if missing); else a path."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        path = hub_checkpoint_path()
        if not path.is_file():
            path = _download_imagenet_v1()
        return verified_state_dict(path, RESNET50_IMAGENET1K_V1_SHA256)
    return verified_state_dict(weights, expected_sha256)


def load_trunk_weights(trunk: torch.nn.Module, state: dict | None, what: str) -> None:
    """Load ImageNet weights into a torchvision ResNet trunk (the classifier ``fc.*`` is dropped)."""
    if state is None:
        return
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = trunk.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches (e.g. a tiny test trunk given the real file)
        raise SpmlError(f"{what}: weights do not fit the trunk ({str(exc).splitlines()[-1].strip()}); "
                        "use the torchvision ResNet-50 IMAGENET1K_V1 file with the default model sizes") from None
    # FrozenBatchNorm2d has no num_batches_tracked buffer; those keys are the only acceptable leftovers
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    missing_keys = [k for k in result.missing_keys if not k.startswith("fc.")]  # the classifier is replaced
    if missing_keys or unexpected:
        missing = ", ".join(missing_keys[:3])
        extra = ", ".join(unexpected[:3])
        raise SpmlError(f"{what}: weights do not fit the ResNet-50 trunk (missing: {missing or '-'}; unexpected: "
                        f"{extra or '-'}); use the torchvision ResNet-50 IMAGENET1K_V1 file or weights: none")
