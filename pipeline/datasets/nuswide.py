"""NUS-WIDE (81 concepts) from the field's formatted files; its images cannot be downloaded.

Nobody distributes a formatter: the community uses ``formatted_{train,val}_{images,labels}.npy`` as
published (Cole et al.'s 2020 re-crawl, Zenodo record 10162606, 150,000 / ~60,260 rows; or the
"official image" variant of Zhou et al., also used by VLPL) with image paths relative to ``Flickr/``
(obtained from the NUS-WIDE authors on request). ``spml download nuswide --source DIR`` links those files
and ``DIR/Flickr`` (or ``data.nuswide.images``). Rows, order and labels are taken as they are, the
all-zero rows included (22% in Cole's files; the maintainers keep them). Missing images are counted and
reported, not fatal, because link rot makes every copy of Flickr/ slightly different.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.datasets import DatasetParams, OfficialSplits, check_path, register_dataset
from pipeline.datasets.formats import PHASES, formatted_names, read_formatted, report_missing_images
from pipeline.download import link_file, link_tree
from pipeline.errors import SpmlError

CLASS_NAMES = [
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle", "cat",
    "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish", "flags",
    "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants", "police", "protest",
    "railroad", "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer",
    "sports", "statue", "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town",
    "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra",
]
VARIANTS = {
    "cole": "Cole et al. 2020 re-crawl (Zenodo 10162606): 150,000 train / ~60,260 test",
    "official": "official NUS-WIDE images, Zhou et al. (AckTheUnknown) / VLPL formatted files",
}
HINT = ("NUS-WIDE cannot be downloaded: pass the folder with formatted_{train,val}_{images,labels}.npy "
        "(and Flickr/): `spml download nuswide --source DIR`")


def formatted_files() -> list[str]:
    return [name for phase in PHASES.values() for name in formatted_names(phase)]


@register_dataset("nuswide")
class NusWide:
    @dataclass
    class Params(DatasetParams):
        """``params.yaml: data.nuswide``; no defaults here, params.yaml holds every value."""

        source: str | None  # the folder of formatted .npy files (+ Flickr/); null: `--source` must give it; download
        images: str | None  # the Flickr/ folder when it is not inside `source`; download
        variant: Literal["cole", "official"]  # which formatted files `source` holds (VARIANTS): provenance only

        def check(self, where: str) -> None:
            check_path(self.source, f"{where}.source")
            check_path(self.images, f"{where}.images")

    def download(self, raw_dir: Path, params: Params, source: Path | None) -> None:
        if source is None:
            raise SpmlError(f"dataset 'nuswide' has no download; {HINT}")
        source = Path(source)
        if not source.is_dir():
            raise SpmlError(f"--source {source} must be a folder holding the formatted .npy files; {HINT}")
        for name in formatted_files():
            if not (source / name).is_file():
                raise SpmlError(f"{source / name} does not exist; {HINT}")
        read_formatted(source, HINT)  # validate before linking anything
        for name in formatted_files():
            link_file(source / name, raw_dir / name)
        images = Path(params.images) if params.images is not None else source / "Flickr"
        if images.is_dir():
            link_tree(images, raw_dir / "Flickr", "NUS-WIDE images")
        (raw_dir / "source.json").write_text(json.dumps({"formatted": str(source.resolve()),
                                                         "images": str(images.resolve())}) + "\n")

    def load_official(self, raw_dir: Path, params: Params) -> OfficialSplits:
        variant = params.variant
        rows, num_classes, dtype = read_formatted(raw_dir, HINT)
        if num_classes != len(CLASS_NAMES):
            raise SpmlError(f"{raw_dir / 'formatted_train_labels.npy'} has {num_classes} classes, expected the "
                            f"{len(CLASS_NAMES)} NUS-WIDE concepts")
        first = next((p for r in rows.values() for p in r.paths), "")
        image_root = "." if first.startswith("Flickr/") else "Flickr"
        report = {split: report_missing_images(raw_dir / image_root, rows[split].paths, f"nuswide {split}")
                  for split in rows}
        return OfficialSplits(
            class_names=list(CLASS_NAMES), image_root=image_root, train=rows["train"], test=rows["test"],
            provenance={"source": "formatted_{train,val}_{images,labels}.npy", "variant": variant,
                        "variant_description": VARIANTS[variant], "npy_label_dtype": dtype,
                        "images_check": report,
                        "procedure": "formatted files taken as published (file order, all-zero rows kept); "
                                     "official val -> test"},
        )
