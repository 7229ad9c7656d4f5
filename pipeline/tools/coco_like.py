"""COCO 2014 in miniature with real JPEGs: ``N`` photo-like images at COCO's sizes and file sizes, in COCO's layout.

The input benchmark (:mod:`pipeline.tools.input_bench`) times decoding, so the files must cost what COCO's cost to
decode: a JPEG decoder's time grows with the pixels and with the entropy-coded bytes, and a flat or noise image
has the wrong number of either. Choices, and why:

* **Layout**: ``annotations/instances_{train,val}2014.json`` and ``{train,val}2014/COCO_{phase}2014_{id:012d}.jpg``,
  COCO's own, so :mod:`pipeline.datasets.coco2014` reads it (its rows: annotated images, ids sorted as strings).
  Each image gets 1 to 4 annotations of the 80 COCO category ids; labels do not change the timing.
* **Sizes** (:data:`COCO_SIZES`): every image 640 px on its long side or smaller, mostly 640x480 and 640x427,
  landscape about 3:1 over portrait. A plausible mix, not a count: no COCO copy was at hand. It keeps COCO's
  published spread (90 % of train2014's images hold between 167,500 and 355,840 pixels, height/width between 0.6
  and 1.5); the mean is 283,000 pixels, about 0.92 of 640x480.
* **Content** (:func:`photo_like`): a field whose amplitude spectrum falls as 1/f (the statistic natural photographs
  share), in correlated colour channels, overlaid with flat-coloured shapes (edges) and textured again, plus
  sensor-like noise. At quality 90 a 640x480 image is about 165 KB.
* **Quality**: uniform in 85..95 (the web's usual range; COCO's Flickr files carry no single setting), 4:2:0 chroma
  subsampling (Pillow's default, and the common camera and Flickr choice). With the sizes above the mean file is
  166 KB (48 images, seed 0), as COCO's: train2014.zip holds 13,510,573,713 bytes of already-compressed JPEGs for
  82,783 images, 163 KB each.
* **Grayscale**: one image in :data:`GRAYSCALE_EVERY` is single-channel, as some of COCO's are, so the loaders'
  conversion to RGB runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.tools.bench_prepare import CATEGORY_IDS

# (width, height): share of the images
COCO_SIZES: dict[tuple[int, int], float] = {
    (640, 480): 0.38, (640, 427): 0.25, (480, 640): 0.12, (427, 640): 0.08,
    (640, 360): 0.05, (640, 512): 0.04, (500, 375): 0.04, (500, 333): 0.04,
}
QUALITY = (85, 95)  # inclusive
GRAYSCALE_EVERY = 50
SPECTRUM_SLOPE = 1.0  # amplitude ~ 1 / f**slope; 1 is the natural-image statistic and gives COCO's file sizes


@dataclass
class CocoLikeFiles:
    root: Path
    train_paths: list[str]  # relative to root, in the order written
    total_bytes: int  # of the training JPEGs


def photo_like(rng: np.random.Generator, width: int, height: int, gray: bool = False) -> Image.Image:
    """A ``width`` x ``height`` image with a natural photograph's 1/f spectrum, edges and noise (RGB, or L)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    amplitude = radius ** -SPECTRUM_SLOPE
    amplitude[0, 0] = 0.0

    def field() -> np.ndarray:
        spectrum = amplitude * rng.standard_normal(amplitude.shape) * np.exp(2j * np.pi * rng.random(amplitude.shape))
        values = np.fft.irfft2(spectrum, s=(height, width))
        return (values - values.mean()) / (values.std() + 1e-12)

    luma, red_green, blue_yellow = field(), field(), field()
    base = rng.uniform(90, 150, 3)
    pixels = np.stack([base[0] + 45 * luma + 15 * red_green,
                       base[1] + 45 * luma - 8 * red_green + 8 * blue_yellow,
                       base[2] + 45 * luma - 15 * blue_yellow], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # objects: flat-coloured shapes with sharp edges
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(width // 32 + 1, width // 2 + 2)),
               y0 + int(rng.integers(height // 32 + 1, height // 2 + 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    textured = np.asarray(image, dtype=np.float32) + 16 * luma[..., None] + rng.normal(0, 3.0, (height, width, 3))
    image = Image.fromarray(np.clip(textured, 0, 255).astype(np.uint8))
    return image.convert("L") if gray else image


def write_coco_like(root: Path, num_train: int, num_val: int = 1, seed: int = 0) -> CocoLikeFiles:
    """Write ``num_train`` training and ``num_val`` validation images with their instance files under ``root``."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"write_coco_like needs num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    sizes = list(COCO_SIZES)
    shares = np.asarray(list(COCO_SIZES.values()))
    ids = rng.choice(np.arange(1, 581_930), size=num_train + num_val, replace=False).tolist()
    categories = [{"supercategory": "object", "id": c, "name": f"category_{c}"} for c in CATEGORY_IDS]
    train_paths, total = [], 0
    for phase, phase_ids in (("train", ids[:num_train]), ("val", ids[num_train:])):
        (root / f"{phase}2014").mkdir(exist_ok=True)
        images, annotations = [], []
        for k, image_id in enumerate(phase_ids):
            width, height = sizes[int(rng.choice(len(sizes), p=shares / shares.sum()))]
            name = f"COCO_{phase}2014_{image_id:012d}.jpg"
            gray = (k + 1) % GRAYSCALE_EVERY == 0
            path = root / f"{phase}2014" / name
            photo_like(rng, width, height, gray).save(path, "JPEG", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for category in rng.choice(CATEGORY_IDS, size=int(rng.integers(1, 5))).tolist():
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "iscrowd": 0, "area": 1000.0, "bbox": [0.0, 0.0, 40.0, 30.0],
                                    "segmentation": [[0.0, 0.0, 40.0, 0.0, 40.0, 30.0]]})
            if phase == "train":
                train_paths.append(f"{phase}2014/{name}")
                total += path.stat().st_size
        document = {"info": {"description": "spml-bench COCO-like images (pipeline.tools.coco_like)"},
                    "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{phase}2014.json").write_text(json.dumps(document))
    return CocoLikeFiles(root, train_paths, total)
