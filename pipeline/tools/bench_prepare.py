"""Benchmark of ``prepare`` on COCO-2014-sized instance files: ours vs. the community's approach.

``run("coco2014")`` writes seeded, COCO-2014-shaped ``instances_{train,val}2014.json`` into a temporary
folder (82,783 + 40,504 images of which 82,081 + 40,137 are annotated, 604,907 + 291,875 annotations with
short polygons, ~1% crowd RLEs: about 180 MB of JSON) and runs, each in a fresh child process:

* **ours**: the ``prepare`` stage, run by the ``spml`` command in the child (``spml prepare coco2014`` in a
  temporary workspace whose params are the given params.yaml with the ``arrow`` loader: label table built,
  Parquet written);
* **community**: a straightforward re-implementation of the community's formatting, written for this
  benchmark: pycocotools ``COCO()`` per split, Python loops over the annotations, ids sorted as strings,
  float64 label matrices saved with ``np.save``.

Reported per implementation: wall time of the whole child process (interpreter start and imports
included) and of the formatting call alone, and the peak resident memory of the child process
(``VmHWM`` in ``/proc/self/status``, read by the child at its end: the real process peak, interpreter and
libraries included; not ``ru_maxrss``, which Linux carries over from the parent across fork + exec, so a
child of ``spml bench`` (torch imported) would report the parent's RSS). The rows, paths and labels of both outputs are asserted identical.

``spml bench prepare coco2014`` calls :func:`run`, which prints the table and returns the prepared label
table; the bench then trains on its first training rows (``pipeline.tools.bench.prepared_data``: true labels,
community-sampled observed labels, random images), so the training-step benchmark that follows runs at
COCO's label statistics. This module does not import the bench (the bench imports it, for ``bench prepare``
only). Standalone: ``python -m pipeline.tools.bench_prepare``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import SpmlError

if TYPE_CHECKING:
    from pipeline.tables import LabelTable

CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SHAPES = {  # phase: (images, annotated images, annotations), as in COCO 2014
    "train": (82_783, 82_081, 604_907),
    "val": (40_504, 40_137, 291_875),
}

PEAK_MB = r"""
import resource
def peak_mb():
    # VmHWM: this process's own high-water RSS. ru_maxrss is not used: Linux carries it over from the parent
    # across fork + exec, so a child of a large parent (spml bench imports torch) would report the parent's RSS.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

# argv: the params file; cwd: a workspace holding data/raw/coco2014. The libraries the stage reads with
# (pyarrow through pipeline.tables, the dataset's module) are imported before the clock starts, as the
# community's child imports pycocotools before its own.
OURS = PEAK_MB + r"""
import json, sys, time
t0 = time.perf_counter()
import pipeline.tables
from pipeline.datasets import get_dataset
from pipeline.cli import app
get_dataset("coco2014")
t1 = time.perf_counter()
code = app(["prepare", "coco2014", "--params", sys.argv[1]], standalone_mode=False)
if code:
    sys.exit(code)
t2 = time.perf_counter()
print(json.dumps({"call_s": t2 - t1, "import_s": t1 - t0, "peak_mb": peak_mb()}))
"""

# argv: the raw folder, the output folder
COMMUNITY = PEAK_MB + r"""
import json, sys, time, io, contextlib
t0 = time.perf_counter()
import numpy as np
from pycocotools.coco import COCO
raw, out = sys.argv[1], sys.argv[2]
t1 = time.perf_counter()
previous = None
for phase in ("train", "val"):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(f"{raw}/annotations/instances_{phase}2014.json")
    categories = coco.dataset["categories"]
    if previous is not None:
        assert categories == previous
    previous = categories
    index_of = {}
    for position, category in enumerate(categories):
        index_of[category["id"]] = position
    annotated = set()
    for annotation in coco.dataset["annotations"]:
        annotated.add(str(annotation["image_id"]))
    ids = [int(text) for text in sorted(annotated)]
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(categories)))
    for annotation in coco.dataset["annotations"]:
        labels[row_of[annotation["image_id"]], index_of[annotation["category_id"]]] = 1.0
    paths = [f"{phase}2014/COCO_{phase}2014_{image_id:012d}.jpg" for image_id in ids]
    np.save(f"{out}/formatted_{phase}_labels.npy", labels)
    np.save(f"{out}/formatted_{phase}_images.npy", np.array(paths))
t2 = time.perf_counter()
print(json.dumps({"call_s": t2 - t1, "import_s": t1 - t0, "peak_mb": peak_mb()}))
"""


def _polygon(rng: np.random.Generator) -> str:
    coords = np.round(rng.uniform(0, 640, size=2 * int(rng.integers(3, 8))), 2)
    return "[[" + ",".join(f"{c:.2f}" for c in coords) + "]]"


def generate_coco(directory: Path, seed: int = 0, scale: float = 1.0) -> dict[str, int]:
    """Write COCO-2014-shaped instance files into ``directory/annotations``; returns the bytes per file."""
    rng = np.random.default_rng(seed)
    (directory / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": f"super{c // 10}", "id": c, "name": f"category_{c}"} for c in CATEGORY_IDS]
    all_ids = rng.choice(np.arange(1, 581_930), size=sum(int(s[0] * scale) for s in SHAPES.values()),
                         replace=False)
    sizes, start = {}, 0
    for phase, (num_images, num_annotated, num_annotations) in SHAPES.items():
        num_images, num_annotated = int(num_images * scale), int(num_annotated * scale)
        num_annotations = int(num_annotations * scale)
        ids = all_ids[start:start + num_images]
        start += num_images
        # every annotated image gets one annotation, the rest go to random annotated images
        owners = np.concatenate([ids[:num_annotated], rng.choice(ids[:num_annotated], num_annotations - num_annotated)])
        rng.shuffle(owners)
        frequency = rng.dirichlet(np.full(len(CATEGORY_IDS), 0.5))
        classes = rng.choice(CATEGORY_IDS, size=num_annotations, p=frequency)
        crowd = rng.random(num_annotations) < 0.01
        path = directory / "annotations" / f"instances_{phase}2014.json"
        with open(path, "w") as out:
            out.write('{"info":{"description":"spml-bench synthetic COCO-2014-sized instances","year":2014},'
                      '"licenses":[{"url":"http://example.org","id":1,"name":"bench"}],"images":[')
            out.write(",".join(
                f'{{"license":1,"file_name":"COCO_{phase}2014_{i:012d}.jpg","coco_url":"http://example.org/{i}.jpg",'
                f'"height":480,"width":640,"date_captured":"2013-11-14 16:28:13","id":{i}}}' for i in ids.tolist()))
            out.write('],"annotations":[')
            chunk = []
            for k in range(num_annotations):
                if crowd[k]:
                    segmentation = '{"counts":[' + ",".join(map(str, rng.integers(1, 900, 12))) + '],"size":[480,640]}'
                else:
                    segmentation = _polygon(rng)
                chunk.append(f'{{"segmentation":{segmentation},"area":{1000 + k % 5000}.5,"iscrowd":{int(crowd[k])},'
                             f'"image_id":{int(owners[k])},"bbox":[10.5,20.25,100.0,80.0],'
                             f'"category_id":{int(classes[k])},"id":{k + 1}}}')
                if len(chunk) == 50_000:
                    out.write(("," if k + 1 > 50_000 else "") + ",".join(chunk))
                    chunk = []
            if chunk:
                out.write(("," if num_annotations > len(chunk) else "") + ",".join(chunk))
            out.write('],"categories":' + json.dumps(categories, separators=(",", ":")) + "}")
        sizes[path.name] = path.stat().st_size
    return sizes


def _child(code: str, args: list[Path], cwd: Path) -> dict[str, float]:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SPML_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          check=False, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _check_identical(ours_table: Path, community_dir: Path) -> LabelTable:
    from pipeline.tables import read_label_table

    table = read_label_table(ours_table)
    for phase, split in (("train", "train"), ("val", "test")):
        rows = table.official_rows(split)
        labels = np.load(community_dir / f"formatted_{phase}_labels.npy")
        images = np.load(community_dir / f"formatted_{phase}_images.npy")
        if list(table.path[rows]) != images.tolist():
            raise AssertionError(f"{phase}: row order or paths differ between ours and the community's")
        if not np.array_equal(table.labels[rows], labels.astype(np.int8)):
            raise AssertionError(f"{phase}: labels differ between ours and the community's")
    return table


def run(dataset: str = "coco2014", seed: int = 0, scale: float = 1.0, workdir: str | None = None,
        quiet: bool = False, params_path: Path = Path("params.yaml")) -> LabelTable:
    """Benchmark ``prepare`` on generated files; print the table; return our prepared label table.
    ``params_path``: the params ``spml prepare`` runs with (its ``split`` and ``data.coco2014``; loader arrow)."""
    import yaml

    from pipeline.config import deep_merge, load_params

    if dataset != "coco2014":
        raise SpmlError(f"bench prepare supports coco2014 only (the large instance files), got {dataset!r}")
    # the generated files have no images: nothing to check
    coco = {"images": False, "loader": "arrow", "check_images": False}
    params = deep_merge(load_params(params_path), {"data": {"coco2014": coco}})
    with tempfile.TemporaryDirectory(prefix="spml-bench-prepare-", dir=workdir) as tmp:
        tmp = Path(tmp)
        work, community_out = tmp / "ours", tmp / "community"  # work: the stage's workspace (data/ and params)
        raw = work / "data" / "raw" / "coco2014"
        community_out.mkdir(parents=True)
        start = time.perf_counter()
        sizes = generate_coco(raw, seed, scale)
        generated_s = time.perf_counter() - start
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        community = _child(COMMUNITY, [raw, community_out], tmp)
        ours = _child(OURS, [work / "params.yaml"], work)
        table = _check_identical(work / "data" / "prepared" / "coco2014.parquet", community_out)
        lines = [
            (f"prepare benchmark: coco2014-sized instance files ({sum(sizes.values()) / 1e6:.0f} MB JSON, "
            f"{len(table):,} annotated images; generated in {generated_s:.0f} s, seed {seed}, scale {scale})"),
            f"{'implementation':<50} {'process s':>9} {'format s':>9} {'peak RSS MB':>12}",
        ]
        for name, result in (("community (pycocotools + Python loops, .npy)", community),
                             ("ours (spml prepare: arrow JSON + numpy, Parquet)", ours)):
            lines.append(f"{name:<50} {result['wall_s']:>9.2f} {result['call_s']:>9.2f} {result['peak_mb']:>12.0f}")
        lines.append("rows, paths and labels identical: yes (asserted); peak RSS = VmHWM of each child process")
        if not quiet:
            print("\n".join(lines), flush=True)
        return table


if __name__ == "__main__":  # pragma: no cover
    run()
