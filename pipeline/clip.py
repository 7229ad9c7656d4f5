"""CLIP image-text scores with open_clip, computed once per (dataset, CLIP-based method) by stage ``clip-scores``.

VLPL and AEVLP pseudo-label with a frozen CLIP model. Their official code runs CLIP online on every training
step, but CLIP is frozen and the only randomness of its input is a horizontal flip, so scoring every training
image once, unflipped and flipped, is exact up to the points docs/methods/{vlpl,aevlp}.md list (one resize
instead of two, fp32, the PIL resize). What this module computes per training image, for each view and its
mirror image (:mod:`pipeline.clip_scores` holds the table):

* the view: the whole image, and for AEVLP the g×g grid of tiles (row-major, ⌊W/g⌋×⌊H/g⌋ pixels each, the
  last W mod g columns and H mod g rows uncovered), each resized (squashed, bilinear) to ``image_size`` and
  normalised with ``normalize``'s mean and std (both official codes feed ImageNet-normalised tensors);
* the cosine between CLIP's L2-normalised image embedding and each class's text embedding, the class prompt
  ``prompt`` with the class name (``_`` read as a space) encoded by CLIP's text tower, optionally passed
  through AEVLP's frozen random label-graph residual (``text_gcn: random``, :func:`random_text_gcn`), then
  L2-normalised.

The method's official inputs (``official_inputs``, :func:`load_official_inputs`): the class names its prompts
use, the relation matrix of its label graph, or its shipped text features, each read from a local copy of the
official file (``file``, pinned by ``sha256``, never downloaded; a missing file is a one-line error naming the
key). An input whose ``file`` is null runs on this project's substitute (the prepared table's class names, the
text embeddings' cosine, the encoded prompt); the table records it (``substitutes``) and the reports mark the
rows that ran on one.

The weights never come from the network: ``weights`` (a local file) or open_clip's own cache for
``pretrained`` (a tag such as ``openai``), pinned by ``sha256``; a missing file is a one-line error naming the
params key. ``random_init_config`` builds a tiny randomly initialised open_clip model from a config dict
instead (seeded), for the CPU benchmark and the tests: its scores are noise, and the table says so
(``meaningful: false``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.config import Range, parse_dataclass, scoped
from pipeline.errors import SpmlError, bomb_error
from pipeline.io import sha256_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipParams:
    """``params.yaml: clip.<method>`` (scoped ``default`` -> ``<dataset>``); no defaults here."""

    model: str  # open_clip architecture name (ViT-B-16, ViT-L-14-336), or a label for random_init_config
    pretrained: str | None  # open_clip pretrained tag (openai) looked up in open_clip's cache, never downloaded
    weights: str | None  # a local weights file instead of the cache (OpenAI's .pt, or an open_clip checkpoint)
    sha256: str | None  # SHA-256 pin of the weights file (required for real weights)
    random_init_config: dict | None  # open_clip model config (embed_dim, vision_cfg, text_cfg): random weights
    seed: int  # of the random initialisation and of the random text GCN
    image_size: Annotated[int, Range(ge=8)]  # CLIP input side in pixels
    normalize: Literal["imagenet", "clip"]  # mean/std of the views (both official codes: imagenet)
    prompt: str  # class prompt, "{}" = the class name
    tiles: Annotated[int, Range(ge=0)]  # g: a g x g grid of tiles besides the whole image (0: none)
    text_gcn: Literal["random", "none"]  # AEVLP's frozen, never-trained label-graph residual on the text
    gcn_topk: Annotated[int, Range(ge=1)]  # s: entries kept per row of the relation matrix
    gcn_reweight: Annotated[float, Range(ge=0, le=1)]  # p: weight of the neighbours (self: 1 - p)
    gcn_hidden: Annotated[int, Range(ge=1)]  # width of the GCN's hidden layers (1024)
    batch_size: Annotated[int, Range(ge=1)]  # images per forward pass (each with its views, twice)
    num_workers: Annotated[int, Range(ge=0)]  # image decoding workers
    device: str  # auto | cpu | cuda
    # the official files the method reads ({name: {file, sha256}}, name in OFFICIAL_INPUTS); file null: substitute
    official_inputs: dict


# What each official input is; a listed input whose file is null runs on the substitute named here.
OFFICIAL_INPUTS = {
    "class_names": ("a text file, one class name per line in the dataset's class order",
                    "the prepared table's class names"),
    "relation": ("a .npy C x C label-relation matrix (the label graph of text_gcn)",
                 "the class text embeddings' cosine similarity, clipped at 0"),
    "text_features": ("a .npy C x d array of class text features (replaces the prompt and the text tower)",
                      "the prompt encoded by CLIP's text tower"),
}


def clip_params(params: dict[str, Any], dataset: str, method: str) -> ClipParams:
    """The resolved ``clip.<method>`` block for ``dataset``, checked."""
    section = (params.get("clip") or {}).get(method)
    where = f"clip.{method}"
    if section is None:
        raise SpmlError(f"params {where} is missing: method {method!r} has no CLIP settings; add a {where} block "
                        "to params.yaml (docs/methods/README.md)")
    p = parse_dataclass(ClipParams, scoped(section, dataset), where)
    if p.random_init_config is not None:
        if p.pretrained is not None or p.weights is not None:
            raise SpmlError(f"params {where}: random_init_config builds random weights; set pretrained and weights "
                            "to null, or random_init_config to null for real weights")
    elif p.pretrained is None and p.weights is None:
        raise SpmlError(f"params {where}: set pretrained (an open_clip tag, e.g. openai) or weights (a local "
                        "file), or random_init_config for random weights")
    if p.prompt.count("{}") != 1:
        raise SpmlError(f"params {where}.prompt must hold one {{}} for the class name, got {p.prompt!r}")
    for name, entry in p.official_inputs.items():
        key = f"{where}.official_inputs.{name}"
        if name not in OFFICIAL_INPUTS:
            raise SpmlError(f"unknown params {key}; valid: {', '.join(OFFICIAL_INPUTS)}")
        if not isinstance(entry, dict) or set(entry) != {"file", "sha256"}:
            raise SpmlError(f"params {key} must be a mapping with keys file and sha256 (null: the substitute), "
                            f"got {entry!r}")
        for field in ("file", "sha256"):
            if entry[field] is not None and not isinstance(entry[field], str):
                raise SpmlError(f"params {key}.{field} must be a string or null, got {entry[field]!r}")
    return p


# ------------------------------------------------------------------------------------------------- weights

def cached_weights(model: str, tag: str) -> tuple[Path | None, list[str]]:
    """The file open_clip would load for (model, tag) if it is in its cache already, and where it looked.

    Two caches, as open_clip downloads: the URL cache (``~/.cache/clip/<file>``, OpenAI's original files)
    and the Hugging Face hub cache. Nothing is fetched."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise SpmlError(f"open_clip has no pretrained weights {tag!r} for model {model!r} "
                        f"(its tags for it: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})")
    looked: list[str] = []
    if cfg.get("url"):
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        looked.append(str(path))
        if path.is_file():
            return path, looked
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" (default file names) or "org/model/file"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            looked.append(f"hf://{repo}/{name}")
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), looked
    return None, looked


def resolve_weights(p: ClipParams, where: str) -> tuple[Path, str]:
    """The weights file and its SHA-256, checked against the pin; a missing file is an error naming the key."""
    if p.weights is not None:
        path = Path(p.weights).expanduser()
        if not path.is_file():
            raise SpmlError(f"CLIP weights file {path} (params {where}.weights) does not exist; copy the weights "
                            f"there or point {where}.weights at them (nothing is downloaded)")
    else:
        path, looked = cached_weights(p.model, p.pretrained)
        if path is None:
            pin = f" (SHA-256 {p.sha256})" if p.sha256 else ""
            raise SpmlError(f"CLIP weights {p.model}/{p.pretrained} are not in open_clip's cache "
                            f"({', '.join(looked)}) and are never downloaded here; set params {where}.weights "
                            f"(in its default or dataset block) to a local copy of the weights file{pin}")
    digest = sha256_file(path)
    if p.sha256 is None:
        raise SpmlError(f"CLIP weights {path} are not pinned: set params {where}.sha256 to {digest} if this is "
                        "the file you mean to use")
    if digest != p.sha256.lower():
        raise SpmlError(f"CLIP weights {path} have SHA-256 {digest}, but params {where}.sha256 pins {p.sha256}; "
                        "replace the file or update the pin")
    return path, digest


def build_clip(p: ClipParams, where: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, provenance) for the params: random tiny weights or a pinned file."""
    import open_clip

    if p.random_init_config is not None:
        config = dict(p.random_init_config)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)
                model = open_clip.CLIP(**config)
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise SpmlError(f"params {where}.random_init_config is not an open_clip model config "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        context = int((config.get("text_cfg") or {}).get("context_length", 77))
        tokenizer = open_clip.SimpleTokenizer(context_length=context)
        info = {"weights_file": None, "weights_sha256": None, "random_init": True, "meaningful": False}
    else:
        path, digest = resolve_weights(p, where)
        try:
            if p.pretrained == "openai" and not path.name.endswith(".safetensors"):
                model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")  # OpenAI's own file
            else:
                cfg = open_clip.get_pretrained_cfg(p.model, p.pretrained) if p.pretrained else {}
                model = open_clip.create_model(p.model, pretrained=str(path), precision="fp32",
                                               force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        except Exception as exc:  # noqa: BLE001 - a pinned but wrong file fails in torch.load, safetensors or
            # load_state_dict, each with its own type; all mean "these bytes are not this model's weights"
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            raise SpmlError(f"CLIP weights {path} match the pinned SHA-256 but are not {p.model} weights "
                            f"({type(exc).__name__}{': ' + first if first else ''}); put the real file there and "
                            f"pin its SHA-256 in params {where}.sha256") from None
        tokenizer = open_clip.get_tokenizer(p.model)
        info = {"weights_file": str(path), "weights_sha256": digest, "random_init": False, "meaningful": True}
    return model.eval().float(), tokenizer, info


# ------------------------------------------------------------------------------------------------- official inputs

@dataclass
class OfficialInputs:
    """The official files of ``official_inputs`` that are set, read and checked (None: not set or not listed)."""

    class_names: list[str] | None
    relation: torch.Tensor | None  # (C, C) float32
    text_features: torch.Tensor | None  # (C, d) float32
    files: dict[str, dict[str, str]]  # name -> {file, sha256} of every file read
    substitutes: list[str]  # the listed inputs whose file is null: they run on the substitute


def pinned_file(entry: dict[str, str | None], key: str) -> tuple[Path, str]:
    """A local official file and its SHA-256, checked against the pin; missing or unpinned: an error naming
    the key (nothing is ever downloaded)."""
    path = Path(entry["file"]).expanduser()
    if not path.is_file():
        raise SpmlError(f"official file {path} (params {key}.file) does not exist; copy it there from the "
                        f"official repository or set {key}.file to null to run on the substitute (reported)")
    digest = sha256_file(path)
    if entry["sha256"] is None:
        raise SpmlError(f"official file {path} is not pinned: set params {key}.sha256 to {digest} if this is the "
                        "file you mean to use")
    if digest != entry["sha256"].lower():
        raise SpmlError(f"official file {path} has SHA-256 {digest}, but params {key}.sha256 pins "
                        f"{entry['sha256']}; replace the file or update the pin")
    return path, digest


def _load_array(path: Path, key: str, rows: int) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SpmlError(f"official file {path} (params {key}.file) is not a .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[0] != rows or not np.issubdtype(array.dtype, np.number) \
            or not np.isfinite(array).all():
        raise SpmlError(f"official file {path} (params {key}.file) must hold a finite {rows}-row matrix (one row "
                        f"per class), got shape {array.shape} of {array.dtype}")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def load_official_inputs(p: ClipParams, where: str, num_classes: int) -> OfficialInputs:
    """Read and check the official files of ``p.official_inputs`` for a dataset of ``num_classes`` classes."""
    out = OfficialInputs(None, None, None, {}, [])
    for name, entry in p.official_inputs.items():
        key = f"{where}.official_inputs.{name}"
        if entry["file"] is None:
            out.substitutes.append(name)
            continue
        path, digest = pinned_file(entry, key)
        out.files[name] = {"file": str(path), "sha256": digest}
        if name == "class_names":
            try:
                lines = path.read_text(encoding="utf-8").strip().split("\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise SpmlError(f"official file {path} (params {key}.file) is not UTF-8 text ({exc})") from None
            names = [line.strip() for line in lines]
            if len(names) != num_classes or not all(names):
                raise SpmlError(f"official file {path} (params {key}.file) must hold {num_classes} non-empty lines "
                                f"(one class name per class), got {len(lines)} lines")
            out.class_names = names
        elif name == "relation":
            out.relation = _load_array(path, key, num_classes)
            if out.relation.shape[1] != num_classes:
                raise SpmlError(f"official file {path} (params {key}.file) must be {num_classes} x {num_classes}, "
                                f"got {tuple(out.relation.shape)}")
        else:
            out.text_features = _load_array(path, key, num_classes)
    return out


# ------------------------------------------------------------------------------------------------- text

def label_graph(relation: torch.Tensor, topk: int, reweight: float) -> torch.Tensor:
    """AEVLP's adjacency Â from an L×L relation matrix: keep the ``topk`` largest entries of each row, zero
    the diagonal, scale each row to sum to p = ``reweight``, then set the diagonal to 1 − p."""
    n = relation.shape[0]
    keep = relation.topk(min(topk, n), dim=1).indices
    adj = torch.zeros_like(relation).scatter_(1, keep, relation.gather(1, keep))
    adj.fill_diagonal_(0)
    sums = adj.sum(dim=1, keepdim=True)
    adj = torch.where(sums > 0, adj / sums.clamp_min(1e-12), adj) * reweight
    adj.fill_diagonal_(1 - reweight)
    return adj


def substitute_relation(text: torch.Tensor) -> torch.Tensor:
    """The substitute for an official relation matrix: the text embeddings' cosine similarity, clipped at 0."""
    unit = F.normalize(text.float(), dim=-1)
    return (unit @ unit.T).clamp_min(0)


def random_text_gcn(text: torch.Tensor, hidden: int, topk: int, reweight: float, seed: int,
                    relation: torch.Tensor | None = None) -> torch.Tensor:
    """t' = t + Â·φ(Â·φ(Â·t·W₁)·W₂)·W₃, φ = LeakyReLU(0.2), with W₁ (d×h), W₂ (h×h), W₃ (h×d) drawn
    U(−1/√d_out, 1/√d_out) from ``seed`` and never trained (AEVLP's released code: an untrained, unseeded
    GCN; here seeded, so the perturbation is the same in every run).

    Â comes from ``relation`` (AEVLP's ``relation+<dataset>.npy``), or from :func:`substitute_relation` when
    it is None."""
    text = text.float()
    adj = label_graph(substitute_relation(text) if relation is None else relation.float(), topk, reweight)
    generator = torch.Generator().manual_seed(seed)
    dim = text.shape[1]

    def weight(rows: int, cols: int) -> torch.Tensor:
        bound = 1 / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1).float() * bound

    w1, w2, w3 = weight(dim, hidden), weight(hidden, hidden), weight(hidden, dim)
    h = F.leaky_relu(adj @ (text @ w1), 0.2)
    h = F.leaky_relu(adj @ (h @ w2), 0.2)
    return text + adj @ (h @ w3)


def class_prompts(class_names: list[str], p: ClipParams, official: OfficialInputs | None = None) -> list[str]:
    """The prompt per class: ``p.prompt`` with the official class name where one is read, else the prepared
    table's, ``_`` read as a space."""
    names = official.class_names if official is not None and official.class_names is not None else class_names
    return [p.prompt.format(name.replace("_", " ")) for name in names]


@torch.no_grad()
def text_features(model, tokenizer, class_names: list[str], p: ClipParams,
                  official: OfficialInputs | None = None) -> torch.Tensor:
    """(C, d) L2-normalised class text embeddings: the official text features, or the prompt per class through
    CLIP's text tower; then the GCN if set (over the official relation matrix if one is read)."""
    if official is not None and official.text_features is not None:
        text = official.text_features.float()
    else:
        text = model.encode_text(tokenizer(class_prompts(class_names, p, official))).float()
    if p.text_gcn == "random":
        relation = official.relation if official is not None else None
        text = random_text_gcn(text, p.gcn_hidden, p.gcn_topk, p.gcn_reweight, p.seed, relation)
    return F.normalize(text, dim=-1)


# ------------------------------------------------------------------------------------------------- images

def image_views(image: Image.Image, size: int, tiles: int) -> np.ndarray:
    """(1 + g², 3, size, size) uint8: the whole image, then the g×g tiles in row-major order, each squashed
    to size × size (PIL bilinear)."""
    width, height = image.size
    boxes = [(0, 0, width, height)]
    if tiles:
        tw, th = width // tiles, height // tiles
        if tw < 1 or th < 1:
            raise SpmlError(f"an image of {width}x{height} px has no {tiles}x{tiles} tiles; lower clip tiles")
        boxes += [(k * tw, r * th, (k + 1) * tw, (r + 1) * th) for r in range(tiles) for k in range(tiles)]
    views = [np.asarray(image.crop(box).resize((size, size), Image.BILINEAR)) for box in boxes]
    return np.stack(views).transpose(0, 3, 1, 2)


class ViewSet(torch.utils.data.Dataset):
    def __init__(self, root: Path, rel_paths: list[str], size: int, tiles: int):
        self.root, self.rel_paths, self.size, self.tiles = root, rel_paths, size, tiles

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.root / self.rel_paths[i]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise bomb_error(path, exc) from None
        except FileNotFoundError:
            raise SpmlError(f"image {path} is listed in the label table but missing; restore it or rerun "
                            "`spml download` and `spml prepare`") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SpmlError(f"image {path} is corrupt or not an image ({exc}); replace the file") from None
        return torch.from_numpy(np.ascontiguousarray(image_views(image, self.size, self.tiles)))


@torch.no_grad()
def score_images(model, text: torch.Tensor, views: ViewSet, p: ClipParams, device: torch.device,
                 progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of every image's views, unflipped and flipped, with the class embeddings ``text``:
    (N, 2, C) for the whole image and (N, g², 2, C) for the tiles."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if p.normalize == "imagenet" else (CLIP_MEAN, CLIP_STD)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(views, batch_size=p.batch_size, num_workers=p.num_workers)
    text = text.to(device)
    out = []
    for batch in loader:  # (B, V, 3, S, S) uint8
        b, v = batch.shape[:2]
        x = (batch.to(device).flatten(0, 1).float() / 255 - mean) / std
        cos = [F.normalize(model.encode_image(view).float(), dim=-1) @ text.T for view in (x, x.flip(-1))]
        out.append(torch.stack(cos, dim=1).view(b, v, 2, -1).cpu())
        if progress is not None:
            progress(b)
    scores = torch.cat(out).numpy().astype(np.float32)  # (N, V, 2, C)
    return scores[:, 0], scores[:, 1:]

