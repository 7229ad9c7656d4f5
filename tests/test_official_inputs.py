"""The CLIP methods' official inputs (params ``clip.<method>.official_inputs``): AEVLP's class names and
relation matrix, VLPL's text features, read from local copies pinned by SHA-256; a null file runs on the
substitute, which the tables mark. The fixtures are tiny files in the official files' layout (AEVLP:
``data/classnames/<dataset>_labels.txt``, one name per line, and ``data/relation/relation+<dataset>.npy``, a
C x C matrix; VLPL: ``<DATASET><C>text_feature.npy``, C x d), written here: the test carries its own data."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.clip import class_prompts, clip_params, label_graph, load_official_inputs, random_text_gcn, text_features
from pipeline.config import deep_merge, load_params
from pipeline.errors import SpmlError
from tests.conftest import REPO

# three CUB attributes as our prepared table names them, and the official file's names for them
PREPARED = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::dagger", "has_wing_color::blue"]
OFFICIAL = ["curved bill", "dagger bill", "blue wing"]
RELATION = np.array([[1.0, 0.6, 0.2], [0.6, 1.0, 0.3], [0.2, 0.3, 1.0]], dtype=np.float32)


def sha(path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.fixture
def aevlp_files(tmp_path):
    """A copy of AEVLP's data/ folder for a three-class CUB."""
    names = tmp_path / "data" / "classnames" / "cub_labels.txt"
    relation = tmp_path / "data" / "relation" / "relation+cub.npy"
    names.parent.mkdir(parents=True)
    relation.parent.mkdir(parents=True)
    names.write_text("\n".join(OFFICIAL) + "\n")
    np.save(relation, RELATION)
    return names, relation


def aevlp_params(names_file, relation_file, **entries):
    official = {"class_names": {"file": str(names_file), "sha256": sha(names_file)},
                "relation": {"file": str(relation_file), "sha256": sha(relation_file)}}
    params = load_params(REPO / "params.yaml")
    block = {"official_inputs": deep_merge(official, entries)}
    params["clip"]["aevlp"]["cub"] = deep_merge(params["clip"]["aevlp"]["cub"], block)
    return clip_params(params, "cub", "aevlp")


class StubClip:
    """encode_text: a fixed vector per prompt (its characters' codes), recording the prompts it saw."""

    def __init__(self, dim=8):
        self.dim, self.seen = dim, []

    def encode_text(self, prompts):
        self.seen += prompts
        return torch.stack([torch.tensor([float(sum(map(ord, p)) % (k + 7)) for k in range(self.dim)])
                            for p in prompts])


def test_aevlp_prompts_and_relation_matrix_come_from_the_official_files(aevlp_files):
    names, relation = aevlp_files
    p = aevlp_params(names, relation)
    official = load_official_inputs(p, "clip.aevlp", 3)
    assert official.substitutes == [] and official.class_names == OFFICIAL
    assert official.files["relation"] == {"file": str(relation), "sha256": sha(relation)}
    # the CUB prompt of "has_bill_shape::curved (up or down)" is the official name's
    assert class_prompts(PREPARED, p, official)[0] == "a photo of a curved bill."
    assert class_prompts(PREPARED, p)[0] == "a photo of a has bill shape::curved (up or down)."
    # the label graph from the official matrix (s = 312 keeps every entry of 3): row 0 without the diagonal
    # is [0, 0.6, 0.2], scaled to sum to p = 0.2: [0, 0.15, 0.05]; the diagonal 1 - p = 0.8
    adj = label_graph(official.relation, p.gcn_topk, p.gcn_reweight)
    assert torch.allclose(adj[0], torch.tensor([0.8, 0.15, 0.05]))
    assert torch.allclose(adj[2], torch.tensor([0.2 * 0.2 / 0.5, 0.2 * 0.3 / 0.5, 0.8]))
    # the text features: the official prompts through the text tower, then the GCN over the official matrix
    clip = StubClip()
    got = text_features(clip, lambda prompts: list(prompts), PREPARED, p, official)
    assert clip.seen == ["a photo of a curved bill.", "a photo of a dagger bill.", "a photo of a blue wing."]
    raw = StubClip().encode_text(clip.seen)
    want = F.normalize(random_text_gcn(raw, p.gcn_hidden, p.gcn_topk, p.gcn_reweight, p.seed,
                                       torch.from_numpy(RELATION)), dim=-1)
    assert torch.equal(got, want)
    substitute = text_features(StubClip(), lambda prompts: list(prompts), PREPARED, p)
    assert not torch.allclose(got, substitute)


def test_vlpl_reads_its_shipped_text_features_instead_of_the_text_tower(tmp_path):
    features = np.eye(3, 8, dtype=np.float32) * 2 + 0.5
    path = tmp_path / "CUB312text_feature.npy"
    np.save(path, features)
    params = load_params(REPO / "params.yaml")
    params["clip"]["vlpl"]["cub"] = {"official_inputs": {"text_features": {"file": str(path), "sha256": sha(path)}}}
    p = clip_params(params, "cub", "vlpl")
    official = load_official_inputs(p, "clip.vlpl", 3)
    clip = StubClip()
    got = text_features(clip, lambda prompts: list(prompts), PREPARED, p, official)
    assert clip.seen == []  # no prompt was encoded
    assert torch.allclose(got, F.normalize(torch.from_numpy(features), dim=-1))
    # null: the substitute, listed as such
    params["clip"]["vlpl"]["cub"] = {}
    p = clip_params(params, "cub", "vlpl")
    assert load_official_inputs(p, "clip.vlpl", 3).substitutes == ["text_features"]


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_official_files_are_pinned_and_a_missing_one_is_a_one_line_error_naming_the_key(aevlp_files, tmp_path):
    names, relation = aevlp_files
    key = "clip.aevlp.official_inputs"
    with pytest.raises(SpmlError) as info:
        load_official_inputs(aevlp_params(tmp_path / "gone.txt", relation), "clip.aevlp", 3)
    assert f"(params {key}.class_names.file) does not exist" in _one_line(info)
    with pytest.raises(SpmlError) as info:
        load_official_inputs(aevlp_params(names, relation, relation={"sha256": None}), "clip.aevlp", 3)
    assert f"not pinned: set params {key}.relation.sha256 to {sha(relation)}" in _one_line(info)
    with pytest.raises(SpmlError) as info:
        load_official_inputs(aevlp_params(names, relation, class_names={"sha256": "0" * 64}), "clip.aevlp", 3)
    assert f"has SHA-256 {sha(names)}, but params {key}.class_names.sha256 pins {'0' * 64}" in _one_line(info)
    # a file of another dataset (4 classes) is refused, naming the key
    with pytest.raises(SpmlError) as info:
        load_official_inputs(aevlp_params(names, relation), "clip.aevlp", 4)
    assert f"(params {key}.class_names.file) must hold 4 non-empty lines" in _one_line(info)
    names.write_text("\n".join(OFFICIAL + ["red eye"]))
    np.save(relation, np.ones((4, 3), dtype=np.float32))
    with pytest.raises(SpmlError) as info:
        load_official_inputs(aevlp_params(names, relation), "clip.aevlp", 4)
    assert f"(params {key}.relation.file) must be 4 x 4, got (4, 3)" in _one_line(info)


@pytest.mark.parametrize("entries,fragment", [
    ({"labels": {"file": None, "sha256": None}}, "unknown params clip.aevlp.official_inputs.labels"),
    ({"relation": {"file": None}}, "clip.aevlp.official_inputs.relation must be a mapping with keys file and sha256"),
    ({"relation": {"file": 3, "sha256": None}}, "clip.aevlp.official_inputs.relation.file must be a string or null"),
])
def test_bad_official_inputs_params_are_one_line_errors(entries, fragment):
    params = load_params(REPO / "params.yaml")
    params["clip"]["aevlp"]["default"]["official_inputs"] = entries
    with pytest.raises(SpmlError) as info:
        clip_params(params, "cub", "aevlp")
    assert fragment in _one_line(info)


def test_runs_on_substitutes_are_marked_in_the_tables(tmp_path, monkeypatch):
    """A run whose history says official inputs ran on substitutes (clip_substitutes > 0) is marked ‡ with a
    footnote, flagged in summary.json and runs.csv; unlike random weights it keeps its gap closed."""
    from pipeline.report import SUBSTITUTE_CLIP, collect_runs, dataset_scores, results_markdown, summary_metrics
    from tests.test_report_scores import _runs

    monkeypatch.chdir(tmp_path)
    maps = {"an": 80.0, "full": 90.0, "vlpl": 88.0, "aevlp": 85.0}
    for method, test_map in maps.items():
        folder = tmp_path / "runs" / "voc2012" / method / "0"
        folder.mkdir(parents=True)
        metrics = _runs([("voc2012", method, 0, test_map)]).iloc[0].to_dict() | {"versions": {"torch": "x"}}
        (folder / "metrics.json").write_text(pd.Series(metrics).to_json())
        if method in ("vlpl", "aevlp"):  # vlpl: its text features substituted; aevlp: the official files
            pd.DataFrame({"epoch": [1], "clip_meaningful": [1.0],
                          "clip_substitutes": [1.0 if method == "vlpl" else 0.0]}).to_csv(folder / "history.csv")
    runs = collect_runs(["voc2012"], list(maps), [0])
    assert dict(zip(runs.method, runs[SUBSTITUTE_CLIP])) == {m: m == "vlpl" for m in maps}
    md = results_markdown(runs, list(maps), ["voc2012"])
    assert "| vlpl | 88.00 ‡ | 1 |" in md and "| aevlp | 85.00 | 1 |" in md
    assert "| vlpl‡ | 88.00‡ | – | +80.0 |" in md
    assert md.count("‡ ran on substitutes for official inputs") == 3
    assert dataset_scores(runs, "voc2012")["gap_closed"]["vlpl"] == pytest.approx(80.0)
    summary = summary_metrics(runs)["voc2012"]
    assert summary["vlpl"][SUBSTITUTE_CLIP] is True and SUBSTITUTE_CLIP not in summary["aevlp"]


def test_the_clip_scores_stage_reads_the_official_files_and_records_them(tiny_workspace):
    """Stage clip-scores on the tiny data with AEVLP's official files set: the table records them (path and
    SHA-256) and no substitute; the scores are those of the official names and matrix, not the substitutes'.
    A missing file stops the stage before any scoring, naming the key, and writes nothing."""
    from pipeline.clip_scores import read_clip_scores
    from pipeline.tables import read_label_table
    from stages import clip_scores
    from tests.test_post_ignore_methods import vl_params

    table = read_label_table("data/prepared/synthetic.parquet")
    n, c = len(table.rows("train")), table.num_classes
    names = tiny_workspace / "official" / "data" / "classnames" / "synthetic_labels.txt"
    relation = tiny_workspace / "official" / "data" / "relation" / "relation+synthetic.npy"
    names.parent.mkdir(parents=True)
    relation.parent.mkdir(parents=True)
    names.write_text("".join(f"shape number {k}\n" for k in range(c)))
    matrix = np.random.default_rng(0).random((c, c)).astype(np.float32)
    np.save(relation, (matrix + matrix.T) / 2)
    official = {"class_names": {"file": str(names), "sha256": sha(names)},
                "relation": {"file": str(relation), "sha256": sha(relation)}}

    clip_scores.run("synthetic", "aevlp", vl_params(tiny_workspace))
    substitute = read_clip_scores("synthetic", "aevlp", n, c)
    assert substitute.substitutes == ["class_names", "relation"] and substitute.meta["official_inputs"] == {}

    clip_scores.run("synthetic", "aevlp",
                    vl_params(tiny_workspace, clip={"aevlp": {"synthetic": {"official_inputs": official}}}))
    scores = read_clip_scores("synthetic", "aevlp", n, c)
    assert scores.substitutes == [] and scores.diagnostics()["clip_substitutes"] == 0.0
    assert scores.meta["official_inputs"] == {"class_names": {"file": str(names), "sha256": sha(names)},
                                              "relation": {"file": str(relation), "sha256": sha(relation)}}
    assert not np.array_equal(scores.global_cos, substitute.global_cos)

    missing = {**official, "relation": {"file": str(tiny_workspace / "gone.npy"), "sha256": None}}
    folder = tiny_workspace / "data/clip/synthetic/aevlp"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SpmlError) as info:
        clip_scores.run("synthetic", "aevlp",
                        vl_params(tiny_workspace, clip={"aevlp": {"synthetic": {"official_inputs": missing}}}))
    assert "(params clip.aevlp.official_inputs.relation.file) does not exist" in _one_line(info)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the last table stays as it was
