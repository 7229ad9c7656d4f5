"""Stage ``pretrain``: an ImageNet stand-in for the embedded benchmark's ``smallcnn``.

Every published SPML number fine-tunes an ImageNet-pretrained trunk; the methods are about label noise on
top of good features, not about learning features from scratch. The embedded benchmark has no ImageNet, so
this stage pretrains the smallcnn trunk with *full* labels on a disjoint source task: twenty other shapes of
the same generator (``synthetic.SOURCE_SHAPES``, never one of the benchmark's classes), its own images and
seed. Train stages then start from ``data/pretrained/smallcnn/trunk.pt`` (``models.smallcnn.weights:
pretrained``), as a paper run starts from torchvision's ImageNet file. The head is not kept: the benchmark's
classes get a fresh 1x1-conv head, as in every paper.

The source images are rendered in memory (nothing to download, no PNG round trip); a held-out share of
them gives the source-task mAP written to ``metrics.json``, so a broken pretraining is visible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Range, parse_dataclass
from pipeline.datasets.synthetic import SOURCE_SHAPES, render_image
from pipeline.errors import SpmlError
from pipeline.metrics import mean_average_precision
from pipeline.models import build_model, parse_model_params
from pipeline.paths import TRUNK_FILE
from pipeline.progress import progress_bar
from pipeline.runtime.host import torch_threads

OUTPUT_FILES = (TRUNK_FILE, "metrics.json")


@dataclass
class PretrainParams:
    """``params.yaml: pretrain.smallcnn``; no defaults here, params.yaml holds every value."""

    num_images: Annotated[int, Range(ge=20)]
    holdout_fraction: Annotated[float, Range(gt=0, lt=1)]  # images kept out of training to score the trunk
    image_size: Annotated[int, Range(ge=16)]
    seed: Annotated[int, Range(ge=0)]
    objects_per_image: list[float]  # P(1 object), ..., P(k objects)
    object_size: list[float]  # [min, max] object diameter as a fraction of the image side
    min_visible: Annotated[float, Range(ge=0, le=1)]
    epochs: Annotated[int, Range(ge=1)]
    batch_size: Annotated[int, Range(ge=1)]
    lr: Annotated[float, Range(gt=0)]
    weight_decay: Annotated[float, Range(ge=0)]


def parse_params(params: dict[str, Any]) -> tuple[PretrainParams, dict[str, Any]]:
    """The stage's own block and the smallcnn model params (the trunk's width must match the benchmark's)."""
    block = (params.get("pretrain") or {}).get("smallcnn")
    if block is None:
        raise SpmlError("params pretrain.smallcnn is missing; add it to params.yaml (stage `pretrain`)")
    p = parse_dataclass(PretrainParams, block, "pretrain.smallcnn")
    probs = p.objects_per_image
    if not probs or len(probs) > len(SOURCE_SHAPES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise SpmlError(f"params pretrain.smallcnn.objects_per_image must be 1 to {len(SOURCE_SHAPES)} "
                        f"non-negative probabilities summing to 1, got {probs!r}")
    if len(p.object_size) != 2 or not 0 < p.object_size[0] <= p.object_size[1] <= 1:
        raise SpmlError("params pretrain.smallcnn.object_size must be [min, max] with 0 < min <= max <= 1, "
                        f"got {p.object_size!r}")
    if round(p.num_images * p.holdout_fraction) < 1 or round(p.num_images * (1 - p.holdout_fraction)) < 1:
        raise SpmlError("params pretrain.smallcnn: num_images x holdout_fraction leaves an empty split; "
                        "raise num_images or move holdout_fraction away from 0/1")
    model = parse_model_params("smallcnn", (params.get("models") or {}).get("smallcnn"))
    return p, model


def render_source(p: PretrainParams) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 images and (N, 20) full labels of the source task; uniform class frequencies."""
    rng = np.random.default_rng(p.seed)
    render_p = {"image_size": p.image_size, "objects_per_image": p.objects_per_image,
                "object_size": p.object_size, "min_visible": p.min_visible, "cooccurrence_prob": 0.0}
    weights = np.ones(len(SOURCE_SHAPES))
    images = np.empty((p.num_images, p.image_size, p.image_size, 3), dtype=np.uint8)
    labels = np.zeros((p.num_images, len(SOURCE_SHAPES)), dtype=np.float32)
    with progress_bar() as bar:
        task = bar.add_task("pretrain: rendering the source task", total=p.num_images)
        for i in range(p.num_images):
            images[i], _, classes = render_image(rng, render_p, weights, {}, SOURCE_SHAPES)
            labels[i, classes] = 1
            bar.advance(task)
    return images, labels


def _scores(model, images: torch.Tensor, normalize, batch: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(normalize(images[i:i + batch])).logits for i in range(0, len(images), batch)]).numpy()


def pretrain(p: PretrainParams, model_params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full-label BCE training of smallcnn on the source task; returns (trunk state dict, metrics)."""
    from pipeline.data import Normalizer  # the train loop's own input scaling, so fine-tuning sees the same

    torch.set_num_threads(torch_threads(None))
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True)
    images, labels = render_source(p)
    num_holdout = round(p.num_images * p.holdout_fraction)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    x_train, y_train, x_hold, y_hold = x[num_holdout:], y[num_holdout:], x[:num_holdout], labels[:num_holdout]
    model = build_model("smallcnn", len(SOURCE_SHAPES), **{**model_params, "weights": "none"})
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    normalize = Normalizer(torch.device("cpu"))
    generator = torch.Generator().manual_seed(p.seed)
    steps = math.ceil(len(x_train) / p.batch_size)
    history = []
    with progress_bar() as bar:
        task = bar.add_task("pretrain: smallcnn on the source task", total=p.epochs * steps)
        for epoch in range(1, p.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            total = 0.0
            for start in range(0, len(order), p.batch_size):
                idx = order[start:start + p.batch_size]
                batch = x_train[idx]
                flip = torch.rand(len(idx), generator=generator) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
                loss = F.binary_cross_entropy_with_logits(model(normalize(batch)).logits, y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                bar.advance(task)
            if not math.isfinite(total):
                raise SpmlError(f"pretrain diverged in epoch {epoch} (non-finite loss); lower pretrain.smallcnn.lr")
            holdout_map = mean_average_precision(y_hold, _scores(model, x_hold, normalize)).map
            history.append({"epoch": epoch, "train_loss": total / len(x_train), "holdout_map": holdout_map})
    metrics = {"source_classes": list(SOURCE_SHAPES), "holdout_map": history[-1]["holdout_map"],
               "num_train": len(x_train), "num_holdout": num_holdout, "history": history,
               "params": asdict(p), "model": model_params}
    return model.trunk.state_dict(), metrics
