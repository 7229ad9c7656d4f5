"""Stage ``pretrain``: the smallcnn trunk pretrained on the disjoint source task (pipeline/pretrain.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import paths
from pipeline.config import load_params
from pipeline.errors import SpmlError
from pipeline.io import atomic_dir, write_json
from pipeline.pretrain import OUTPUT_FILES, parse_params, pretrain


def run(params_path: Path = Path("params.yaml")) -> Path:
    p, model_params = parse_params(load_params(params_path))
    trunk, metrics = pretrain(p, model_params)
    out = paths.pretrained_dir("smallcnn")
    if out.is_dir() and not {e.name for e in out.iterdir()} <= set(OUTPUT_FILES):
        raise SpmlError(f"{out} holds files that are not the pretrain stage's ({', '.join(OUTPUT_FILES)}); "
                        "move them away, the stage replaces the folder as a whole")
    with atomic_dir(out) as tmp:
        torch.save({"trunk": trunk, "width": model_params["width"], "source_classes": metrics["source_classes"]},
                   tmp / paths.TRUNK_FILE)
        write_json(tmp / "metrics.json", metrics)
    return out
