"""Datasets imported from the field's formatted files (``spml import-npy``).

``spml import-npy DIR --name NAME [--images ROOT]`` validates ``DIR/formatted_{train,val}_{images,labels}.npy``
and records NAME in the local registry ``data/imported.json`` (absolute paths, so it is machine-local
state like ``data/raw`` and not committed). From then on NAME behaves like any dataset: ``spml download
NAME`` links the four files into ``data/raw/NAME``; ``prepare``, ``sample`` and ``train`` work as usual.
Rows keep the files' order; the official "val" files become the test split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.datasets import DatasetParams, OfficialSplits
from pipeline.datasets.formats import formatted_names, read_formatted, report_missing_images
from pipeline.download import link_file
from pipeline.errors import SpmlError
from pipeline.io import write_json

REGISTRY = Path("data") / "imported.json"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
FILES = [name for phase in ("train", "val") for name in formatted_names(phase)]


def read_registry(path: Path = REGISTRY) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpmlError(f"registry {path} is not valid JSON ({exc.msg}); fix or delete it and rerun "
                        "`spml import-npy`") from None
    if not isinstance(data, dict):
        raise SpmlError(f"registry {path} must hold a mapping of dataset names; fix or delete it")
    return data


def register(name: str, entry: dict[str, Any], path: Path = REGISTRY) -> None:
    registry = read_registry(path)
    registry[name] = entry
    write_json(path, registry)


def imported_source(name: str) -> ImportedNpy | None:
    entry = read_registry().get(name)
    return ImportedNpy(name, entry) if entry is not None else None


class ImportedNpy:
    """A dataset given as formatted .npy files; ``entry`` is its registry record."""

    @dataclass
    class Params(DatasetParams):
        """``params.yaml: data.NAME``, empty (``data.NAME: {}`` or absent): what an import needs is machine-local
        and lives in its registry record, not in params.yaml."""

    def __init__(self, name: str, entry: dict[str, Any]):
        self.name, self.entry = name, entry

    @property
    def hint(self) -> str:
        return f"rerun `spml import-npy DIR --name {self.name}` with the folder of formatted .npy files"

    def download(self, raw_dir: Path, params: Params, source: Path | None) -> None:
        folder = Path(source) if source is not None else Path(self.entry["dir"])
        read_formatted(folder, self.hint)  # validate before linking
        for name in FILES:
            link_file(folder / name, raw_dir / name)
        images = self.entry.get("images") or str(folder.resolve())
        (raw_dir / "source.json").write_text(json.dumps({"dir": str(folder.resolve()), "images": images}) + "\n")

    def load_official(self, raw_dir: Path, params: Params) -> OfficialSplits:
        rows, num_classes, dtype = read_formatted(raw_dir, self.hint)
        info_file = raw_dir / "source.json"
        if not info_file.exists():
            raise SpmlError(f"{info_file} does not exist; run `spml download {self.name}`")
        images = json.loads(info_file.read_text())["images"]
        names = self.entry.get("class_names") or [f"class_{k:03d}" for k in range(num_classes)]
        if len(names) != num_classes:
            raise SpmlError(f"registry {REGISTRY} gives {len(names)} class names for {self.name}, but its label "
                            f"files have {num_classes} classes; {self.hint}")
        report = {split: report_missing_images(Path(images), rows[split].paths, f"{self.name} {split}")
                  for split in rows}
        return OfficialSplits(
            class_names=list(names), image_root=images, train=rows["train"], test=rows["test"],
            provenance={"source": f"formatted .npy files imported from {self.entry['dir']}",
                        "npy_label_dtype": dtype, "images_check": report,
                        "procedure": "formatted files taken as given (file order); official val -> test"},
        )
