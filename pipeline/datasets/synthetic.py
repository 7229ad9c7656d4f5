"""The embedded default: a procedurally generated, seeded multi-label shape dataset.

Twenty classes differ by **shape only** (every object gets a random colour), with random size, position
and rotation on a textured background. Images hold 1 to 4 objects of distinct classes, with unequal
class frequencies and a few class pairs that tend to co-occur, so a single observed positive leaves
on average more than one false negative under "assume negative". Every object's visible pixels are
stored as an instance map, which lets later stages score CAMs and false-negative identification.

Layout written by ``download`` (nothing is fetched):
    images/{train,test}/NNNNN.png      RGB, image_size x image_size
    masks/{train,test}/NNNNN.png       8-bit instance map: 0 background, k = k-th object (1-based)
    annotations.json                   classes, params, and per image: split, file, mask, objects
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from pipeline.config import Range
from pipeline.datasets import DatasetParams, OfficialSplits, SplitRows, register_dataset
from pipeline.errors import SpmlError
from pipeline.progress import progress_bar

# Shapes are indicator functions on object coordinates (u, v) in [-1, 1]^2 (before rotation/scaling).
# They are chosen to stay distinguishable under any rotation (no square/diamond or plus/X pairs).


def _polygon(n: int, u: np.ndarray, v: np.ndarray, radius: float = 0.95) -> np.ndarray:
    r, t = np.hypot(u, v), np.arctan2(v, u)
    sector = 2 * np.pi / n
    edge = radius * np.cos(np.pi / n) / np.cos(np.mod(t, sector) - np.pi / n)
    return r <= edge


def _star(points: int, inner: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r, t = np.hypot(u, v), np.arctan2(v, u)
    sector = 2 * np.pi / points
    phase = np.abs(np.mod(t, sector) / sector - 0.5) * 2  # 1 at a tip, 0 between tips
    return r <= inner + (0.95 - inner) * phase


def _box(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


SHAPES: dict[str, Any] = {
    "disk": lambda u, v: np.hypot(u, v) <= 0.95,
    "ring": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u, v) >= 0.55),
    "triangle": lambda u, v: _polygon(3, u, v),
    "square": lambda u, v: _polygon(4, u, v),
    "pentagon": lambda u, v: _polygon(5, u, v),
    "hexagon": lambda u, v: _polygon(6, u, v) & ~(np.hypot(u, v) <= 0.3),  # hexagonal nut
    "star5": lambda u, v: _star(5, 0.4, u, v),
    "star4": lambda u, v: _star(4, 0.3, u, v),
    "plus": lambda u, v: _box(u, v, -0.3, 0.3, -0.95, 0.95) | _box(u, v, -0.95, 0.95, -0.3, 0.3),
    "crescent": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u - 0.5, v) > 0.75),
    "heart": lambda u, v: ((1.15 * u) ** 2 + (1.15 * v + 0.25) ** 2 - 1) ** 3 - (1.15 * u) ** 2 * (-(1.15 * v + 0.25)) ** 3 <= 0,
    "arrow": lambda u, v: _box(u, v, -0.95, 0.15, -0.2, 0.2) | ((u >= 0.15) & (np.abs(v) <= 0.95 - u) & (u <= 0.95)),
    "ell": lambda u, v: _box(u, v, -0.9, -0.35, -0.9, 0.9) | _box(u, v, -0.9, 0.9, 0.35, 0.9),
    "tee": lambda u, v: _box(u, v, -0.9, 0.9, -0.9, -0.4) | _box(u, v, -0.27, 0.27, -0.9, 0.9),
    "aitch": lambda u, v: _box(u, v, -0.9, -0.4, -0.9, 0.9) | _box(u, v, 0.4, 0.9, -0.9, 0.9) | _box(u, v, -0.9, 0.9, -0.2, 0.2),
    "half_disk": lambda u, v: (np.hypot(u, v + 0.45) <= 0.95) & (v >= -0.45),
    "bowtie": lambda u, v: (np.abs(v) <= np.abs(u)) & (np.abs(u) <= 0.9),
    "ellipse": lambda u, v: (u / 0.95) ** 2 + (v / 0.42) ** 2 <= 1,
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85) & (np.maximum(np.abs(u), np.abs(v)) >= 0.5),
    "bars": lambda u, v: (np.abs(u) <= 0.9) & ((np.abs(v) <= 0.16) | (np.abs(v - 0.62) <= 0.16) | (np.abs(v + 0.62) <= 0.16)),
}
CLASS_NAMES = list(SHAPES)

# The pretraining source task (stage `pretrain`, pipeline/pretrain.py): twenty *other* shapes, never one of
# the benchmark's classes, so a trunk pretrained on them learns generic edges, corners and parts without ever
# seeing a benchmark label (as an ImageNet trunk has never seen a VOC label). Same renderer, own seed.
SOURCE_SHAPES: dict[str, Any] = {
    "pacman": lambda u, v: (np.hypot(u, v) <= 0.95) & ~(u > np.abs(v)),
    "arch": lambda u, v: _box(u, v, -0.9, 0.9, -0.9, 0.6) & ~(np.hypot(u, v + 0.9) <= 0.55),
    "star6": lambda u, v: _star(6, 0.5, u, v),
    "star8": lambda u, v: _star(8, 0.62, u, v),
    "star3": lambda u, v: _star(3, 0.25, u, v),
    "triangle_ring": lambda u, v: _polygon(3, u, v) & ~_polygon(3, u, v, radius=0.5),
    "square_hole": lambda u, v: _polygon(4, u, v) & ~(np.hypot(u, v) <= 0.35),
    "two_disks": lambda u, v: (np.hypot(u + 0.5, v) <= 0.42) | (np.hypot(u - 0.5, v) <= 0.42),
    "three_disks": lambda u, v: ((np.hypot(u, v - 0.5) <= 0.38) | (np.hypot(u - 0.45, v + 0.35) <= 0.38)
                                 | (np.hypot(u + 0.45, v + 0.35) <= 0.38)),
    "chevron": lambda u, v: (np.abs(u) <= 0.9) & (v >= np.abs(u) - 0.75) & (v <= np.abs(u) - 0.25),
    "zigzag": lambda u, v: (np.abs(u) <= 0.9) & (np.abs(v - 0.5 * (np.abs(np.mod(u * 2, 2) - 1) * 2 - 1)) <= 0.2),
    "drop": lambda u, v: (np.hypot(u, v - 0.3) <= 0.6) | ((v <= 0.3) & (v >= -0.95) & (np.abs(u) <= 0.6 * (v + 0.95) / 1.25)),
    "kite": lambda u, v: np.where(v >= 0, np.abs(u) / 0.55 + v / 0.5, np.abs(u) / 0.55 - v / 0.95) <= 1,
    "trapezoid": lambda u, v: (np.abs(v) <= 0.6) & (np.abs(u) <= 0.45 + 0.45 * (v + 0.6) / 1.2),
    "comb": lambda u, v: _box(u, v, -0.9, 0.9, 0.5, 0.9) | ((np.abs(np.mod(u + 0.9, 0.6) - 0.15) <= 0.15)
                                                          & (u <= 0.9) & (v >= -0.9) & (v <= 0.5)),
    "u_shape": lambda u, v: _box(u, v, -0.9, -0.4, -0.9, 0.9) | _box(u, v, 0.4, 0.9, -0.9, 0.9) | _box(u, v, -0.9, 0.9, 0.4, 0.9),
    "semi_ring": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u, v) >= 0.5) & (v >= 0),
    "quarter_disk": lambda u, v: (np.hypot(u + 0.45, v + 0.45) <= 1.35) & (u >= -0.45) & (v >= -0.45),
    "target": lambda u, v: ((np.hypot(u, v) <= 0.95) & (np.hypot(u, v) >= 0.7)) | (np.hypot(u, v) <= 0.4),
    "dumbbell": lambda u, v: ((np.hypot(u + 0.6, v) <= 0.35) | (np.hypot(u - 0.6, v) <= 0.35)
                              | _box(u, v, -0.6, 0.6, -0.12, 0.12)),
}

# The smallest image: objects are 28-46 % of the side, and the training trunks need 16 px (train.MIN_IMAGE_SIZE).
MIN_IMAGE_SIZE = 16


@dataclass
class SyntheticParams(DatasetParams):
    """``params.yaml: data.synthetic`` (and ``data.synthetic-dense``); no defaults here, params.yaml holds every
    value. ``download`` reads them all; ``prepare`` reads none (they reach it through data/raw)."""

    num_train: Annotated[int, Range(ge=2)]  # official-train images; `prepare` splits them into train and val
    num_test: Annotated[int, Range(ge=1)]
    image_size: Annotated[int, Range(ge=MIN_IMAGE_SIZE)]
    seed: Annotated[int, Range(ge=0)]
    objects_per_image: list[float]  # P(1 object), ..., P(k objects); k <= 20 classes
    # how often each class is drawn, after a seeded shuffle of the classes: one of the two is null.
    # class_weights: 20 non-negative weights (e.g. a real dataset's per-class image counts);
    # frequency_decay: class c drawn with weight (c + 1) ** -decay (a power law)
    class_weights: list[float] | None
    frequency_decay: Annotated[float, Range(ge=0)] | None
    cooccurrence_pairs: Annotated[int, Range(ge=0, le=len(SHAPES) // 2)]  # class pairs that tend to co-occur
    cooccurrence_prob: Annotated[float, Range(ge=0, le=1)]
    object_size: list[float]  # [min, max] object diameter as a fraction of the image side
    min_visible: Annotated[float, Range(ge=0, le=1)]  # fraction of an object's pixels that must stay visible

    def check(self, where: str) -> None:
        probs = self.objects_per_image
        if not probs or len(probs) > len(SHAPES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            raise SpmlError(f"params {where}.objects_per_image must be 1 to {len(SHAPES)} non-negative "
                            f"probabilities summing to 1, got {probs!r}")
        if len(self.object_size) != 2 or not 0 < self.object_size[0] <= self.object_size[1] <= 1:
            raise SpmlError(f"params {where}.object_size must be [min, max] with 0 < min <= max <= 1, "
                            f"got {self.object_size!r}")
        if (self.class_weights is None) == (self.frequency_decay is None):
            raise SpmlError(f"params {where}: set exactly one of class_weights (a list of {len(SHAPES)} weights) "
                            f"and frequency_decay (a power law); the other must be null")
        if self.class_weights is not None and (len(self.class_weights) != len(SHAPES) or min(self.class_weights) < 0
                                               or not sum(self.class_weights) > 0):
            raise SpmlError(f"params {where}.class_weights must be {len(SHAPES)} non-negative weights, not all 0, "
                            f"got {self.class_weights!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise plus oriented stripes: texture without any object-like structure."""
    base = rng.uniform(0.2, 0.8, size=3)
    coarse = rng.normal(0, 0.12, size=(3, 5, 5))
    up = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1)))[:, :size, :size]
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.uniform(0, np.pi), rng.uniform(6, 14)
    stripes = 0.06 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    grain = rng.normal(0, 0.03, size=(3, size, size))
    img = base[:, None, None] + up + stripes[None] + grain
    return np.clip(img, 0, 1)


def _shape_mask(shape, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return shape(u, v)


def _draw_classes(rng, weights, partners, count, cooccurrence_prob) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        pending = [p for c in chosen for p in partners.get(c, []) if p not in chosen]
        if pending and rng.random() < cooccurrence_prob:
            chosen.append(int(pending[0]))
            continue
        w = weights.copy()
        w[chosen] = 0
        chosen.append(int(rng.choice(len(w), p=w / w.sum())))
    return chosen


def render_image(rng, p, weights, partners, shapes=SHAPES) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image, its instance map and its classes (indices into ``shapes``, a name -> indicator table)."""
    table = list(shapes.values())
    size = p["image_size"]
    count = 1 + int(rng.choice(len(p["objects_per_image"]), p=p["objects_per_image"]))
    classes = _draw_classes(rng, weights, partners, count, p["cooccurrence_prob"])
    for _attempt in range(50):
        image = _background(rng, size)
        instances = np.zeros((size, size), dtype=np.uint8)
        full_masks = []
        for k, cls in enumerate(classes):
            radius = 0.5 * size * rng.uniform(*p["object_size"])
            cx, cy = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(table[cls], size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
            colour = rng.uniform(0, 1, size=3)
            while abs(colour.mean() - image[:, mask].mean()) < 0.2:  # keep the object visible
                colour = rng.uniform(0, 1, size=3)
            shade = 1 + 0.08 * rng.normal(size=(1, size, size))  # mild shading, not a class cue
            image[:, mask] = np.clip(colour[:, None] * shade[:, mask], 0, 1)
            instances[mask] = k + 1
            full_masks.append(mask)
        visible = [(instances == k + 1).sum() / max(m.sum(), 1) for k, m in enumerate(full_masks)]
        if min(visible) >= p["min_visible"]:
            break
    return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8), instances, classes


def class_weights(p: SyntheticParams) -> np.ndarray:
    """Each class's draw weight before the seeded shuffle: the given weights, or the power law."""
    if p.class_weights is not None:
        return np.asarray(p.class_weights, dtype=float)
    return (np.arange(len(CLASS_NAMES)) + 1.0) ** -p.frequency_decay


def generate(out_dir: Path, params: SyntheticParams) -> None:
    """Render the images, instance maps and ``annotations.json`` (which records ``params``) into ``out_dir``."""
    # render_image reads a plain mapping (the pretrain stage hands it its own settings); the same mapping is
    # what annotations.json records, in the dataclass's field order
    p = dataclasses.asdict(params)
    rng = np.random.default_rng(p["seed"])
    num_classes = len(CLASS_NAMES)
    weights = class_weights(params)
    weights = weights[rng.permutation(num_classes)]
    pair_classes = rng.permutation(num_classes)[: 2 * p["cooccurrence_pairs"]].reshape(-1, 2)
    partners: dict[int, list[int]] = {}
    for a, b in pair_classes:
        partners.setdefault(int(a), []).append(int(b))
        partners.setdefault(int(b), []).append(int(a))
    records = []
    splits = [("train", p["num_train"]), ("test", p["num_test"])]
    with progress_bar() as bar:
        task = bar.add_task("synthetic: rendering", total=p["num_train"] + p["num_test"])
        for split, count in splits:
            (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
            (out_dir / "masks" / split).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image, instances, classes = render_image(rng, p, weights, partners)
                name = f"{index:05d}.png"
                Image.fromarray(image).save(out_dir / "images" / split / name, optimize=False)
                Image.fromarray(instances).save(out_dir / "masks" / split / name)
                objects = []
                for k, cls in enumerate(classes):
                    ys, xs = np.nonzero(instances == k + 1)
                    objects.append({"instance": k + 1, "class": CLASS_NAMES[cls], "area": len(xs),
                                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]})
                records.append({"id": f"{split}_{index:05d}", "split": split, "file": f"{split}/{name}",
                                "mask": f"{split}/{name}", "objects": objects})
                bar.advance(task)
    annotations = {"classes": CLASS_NAMES, "params": p,
                   "cooccurring_pairs": [[CLASS_NAMES[a], CLASS_NAMES[b]] for a, b in pair_classes],
                   "images": records}
    (out_dir / "annotations.json").write_text(json.dumps(annotations))


@register_dataset("synthetic")
class Synthetic:
    """Procedurally generated shapes; ``download`` renders them, nothing is fetched. ``synthetic`` (the
    default) has VOC 2012's label statistics, ``synthetic-dense`` CUB's density of false negatives
    (docs/embedded-benchmark.md); both are this generator with their own ``data.<name>`` block."""

    Params = SyntheticParams

    def download(self, raw_dir: Path, params: SyntheticParams, source: Path | None) -> None:
        if source is not None:
            raise SpmlError(f"dataset '{self.name}' is generated, not downloaded; drop --source")
        generate(raw_dir, params)

    def load_official(self, raw_dir: Path, params: SyntheticParams) -> OfficialSplits:
        path = raw_dir / "annotations.json"
        if not path.exists():
            raise SpmlError(f"{path} does not exist; run `spml download {self.name}` first")
        try:
            annotations = json.loads(path.read_text())
            classes = annotations["classes"]
            index = {name: i for i, name in enumerate(classes)}
            splits = {}
            for split in ("train", "test"):
                records = [r for r in annotations["images"] if r["split"] == split]
                labels = np.zeros((len(records), len(classes)), dtype=np.int8)
                for row, record in enumerate(records):
                    for obj in record["objects"]:
                        labels[row, index[obj["class"]]] = 1
                splits[split] = SplitRows(
                    image_ids=[r["id"] for r in records],
                    paths=[f"images/{r['file']}" for r in records],
                    labels=labels,
                    extras={
                        "mask_path": [f"masks/{r['mask']}" for r in records],
                        "instance_classes": [[index[o["class"]] for o in r["objects"]] for r in records],
                    },
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpmlError(f"{path} is malformed ({exc!r}); rerun `spml download {self.name}`") from None
        return OfficialSplits(class_names=classes, image_root=".", train=splits["train"], test=splits["test"],
                              provenance={"generator": "pipeline.datasets.synthetic", "params": annotations["params"]})


@register_dataset("synthetic-dense")
class SyntheticDense(Synthetic):
    """The first embedded default's settings: 2.75 positives per image (CUB's share of false negatives among
    the unannotated entries, not VOC's); compared with Table 2's CUB column."""
