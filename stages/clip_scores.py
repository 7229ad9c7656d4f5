"""Stage ``clip-scores``: CLIP cosines of every training image of a dataset for a CLIP-based method
(pipeline/clip.py computes them, pipeline/clip_scores.py holds the table) into ``data/clip/<dataset>/<method>/``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline import paths
from pipeline.clip import OFFICIAL_INPUTS, ViewSet, build_clip, clip_params, load_official_inputs, score_images, \
    text_features
from pipeline.clip_scores import ClipScores, write_clip_scores
from pipeline.config import load_params
from pipeline.errors import SpmlError
from pipeline.progress import progress_bar
from pipeline.runtime.host import torch_threads
from pipeline.tables import read_label_table


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SpmlError(f"params clip device {name!r} is not a torch device; use auto, cpu or cuda") from None


def methods_to_score(params: dict, method: str | None) -> list[str]:
    """``method``, or every method of params ``vl_methods`` (dvc.yaml's clip-scores cells). A name without a
    ``clip.<method>`` block is refused by :func:`pipeline.clip.clip_params` (no method module is imported here:
    the stage's numbers depend on its own dependencies only)."""
    if method is not None:
        return [method]
    listed = params.get("vl_methods")
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise SpmlError(f"params vl_methods must be a list of method names, got {listed!r}")
    if not listed:
        raise SpmlError("params vl_methods is empty: name a method (spml clip-scores DATASET METHOD) or set "
                        "vl_methods, e.g. [vlpl, aevlp]")
    return listed


def score(dataset: str, method: str, params: dict) -> Path:
    p = clip_params(params, dataset, method)
    table = read_label_table(paths.label_table(dataset))
    rows = table.rows("train")
    where = f"clip.{method}"
    official = load_official_inputs(p, where, len(table.class_names))  # before the model: fail fast
    torch.set_num_threads(torch_threads(None))
    device = pick_device(p.device)
    model, tokenizer, info = build_clip(p, where)
    model = model.to(device)
    text = text_features(model, tokenizer, table.class_names, p, official)
    width = getattr(model.visual, "output_dim", None)
    if official.text_features is not None and width is not None and text.shape[1] != width:
        raise SpmlError(f"official text features {official.files['text_features']['file']} (params "
                        f"{where}.official_inputs.text_features.file) are {text.shape[1]}-d, but CLIP {p.model}'s "
                        f"image embedding is {width}-d; use the features made with this CLIP model")
    for name in official.substitutes:  # explicit, and recorded in the table (the reports mark these rows)
        print(f"note: {where}.official_inputs.{name}.file is null: {method} on {dataset} runs on a substitute "
              f"({OFFICIAL_INPUTS[name][1]}), not the official file", file=sys.stderr)
    views = ViewSet(Path(table.meta["image_root"]), [table.path[i] for i in rows], p.image_size, p.tiles)
    with progress_bar() as bar:
        task = bar.add_task(f"CLIP scores {dataset}/{method}", total=len(rows))
        global_cos, tile_cos = score_images(model, text, views, p, device, lambda n: bar.advance(task, n))
    import open_clip

    meta = {"dataset": dataset, "method": method, "split": "train",
            "labels_sha256": table.meta["provenance"]["labels_sha256"], "class_names": table.class_names,
            "model": p.model, "pretrained": p.pretrained, **info, "prompt": p.prompt, "image_size": p.image_size,
            "normalize": p.normalize, "text_gcn": p.text_gcn, "seed": p.seed, "precision": "fp32",
            "official_inputs": official.files, "substitutes": official.substitutes,
            "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
            "versions": {"open_clip": open_clip.__version__, "torch": torch.__version__}}
    return write_clip_scores(paths.clip_scores_dir(dataset, method), ClipScores(global_cos, tile_cos, meta))


def run(dataset: str, method: str | None = None, params_path: Path = Path("params.yaml")) -> list[Path]:
    params = load_params(params_path)
    return [score(dataset, m, params) for m in methods_to_score(params, method)]
