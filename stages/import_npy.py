"""``spml import-npy``: register a dataset given as the field's formatted .npy files, then link it in."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.datasets.formats import read_formatted
from pipeline.datasets.imported import FILES, NAME_PATTERN, REGISTRY, ImportedNpy, register
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir
from pipeline.registry import DATASETS


def run(directory: Path, name: str, images: Path | None = None, classes: Path | None = None) -> Path:
    directory = Path(directory)
    if not NAME_PATTERN.match(name):
        raise SpmlError(f"--name {name!r} must be lower-case letters, digits and underscores, starting with a letter")
    if name in DATASETS:
        raise SpmlError(f"--name {name!r} is a built-in dataset; choose another name")
    if not directory.is_dir():
        raise SpmlError(f"{directory} is not a folder; pass the folder holding {', '.join(FILES)}")
    hint = f"the folder must hold {', '.join(FILES)}"
    _rows, num_classes, _dtype = read_formatted(directory, hint)
    images_root = Path(images) if images is not None else directory
    if not images_root.is_dir():
        raise SpmlError(f"--images {images_root} is not a folder; pass the root the image paths are relative to")
    class_names = None
    if classes is not None:
        if not Path(classes).is_file():
            raise SpmlError(f"--classes {classes} does not exist; pass a text file with one class name per line")
        class_names = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
        if len(class_names) != num_classes:
            raise SpmlError(f"--classes {classes} has {len(class_names)} names, but the label files have "
                            f"{num_classes} classes")
    entry = {"dir": str(directory.resolve()), "images": str(images_root.resolve()), "class_names": class_names,
             "format": "formatted-npy"}
    target = paths.raw_dir(name)
    with atomic_dir(target) as tmp:
        ImportedNpy(name, entry).download(tmp, ImportedNpy.Params(), None)
        register(name, entry, REGISTRY)  # last: a failed import leaves no registry entry
    return target
