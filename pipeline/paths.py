"""Where each stage reads and writes, relative to the repository root (DVC runs stages from there)."""

from pathlib import Path

DATA = Path("data")
RUNS = Path("runs")
REPORTS = Path("reports")
# the trunk weights stage `pretrain` writes into pretrained_dir(model); here, not in pipeline.pretrain, so a
# model reads the name without importing a stage's module
TRUNK_FILE = "trunk.pt"


def raw_dir(dataset: str) -> Path:
    return DATA / "raw" / dataset


def label_table(dataset: str) -> Path:
    return DATA / "prepared" / f"{dataset}.parquet"


def observed_table(dataset: str) -> Path:
    return DATA / "sampled" / f"{dataset}.parquet"


def run_dir(dataset: str, method: str, seed: int) -> Path:
    return RUNS / dataset / method / str(seed)


def pretrained_dir(model: str) -> Path:
    """Stage ``pretrain``'s output for ``model``: trunk.pt and metrics.json."""
    return DATA / "pretrained" / model


def clip_scores_dir(dataset: str, method: str) -> Path:
    """Stage ``clip-scores``'s output for ``method`` on ``dataset``: the CLIP cosines of the training images."""
    return DATA / "clip" / dataset / method
