"""Stage ``download``: obtain a dataset's raw files into ``data/raw/<dataset>`` (or generate them)."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.config import load_params
from pipeline.datasets import dataset_params, get_dataset
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir


def run(dataset: str, source: Path | None = None, params_path: Path = Path("params.yaml")) -> Path:
    source_ds = get_dataset(dataset)
    data_params = dataset_params(source_ds, load_params(params_path))
    # data.<name>.source (the downloaded datasets' Params have it; generated and imported ones do not): a
    # local archive or folder, as --source, which wins over it
    configured = getattr(data_params, "source", None)
    given_as = "--source"
    if source is None and configured is not None:
        source, given_as = Path(configured).expanduser(), f"data.{dataset}.source"
    if source is not None and not Path(source).exists():
        raise SpmlError(f"{given_as} {source} does not exist; pass an archive or an extracted folder")
    target = paths.raw_dir(dataset)
    with atomic_dir(target) as tmp:
        try:
            source_ds.download(tmp, data_params, Path(source) if source is not None else None)
        except SpmlError as exc:
            # the user never sees our temporary folder: name what it mirrors (a linked --source folder) or becomes
            shown = source if source is not None and Path(source).is_dir() else target
            raise SpmlError(str(exc).replace(str(tmp), str(shown))) from None
    return target
