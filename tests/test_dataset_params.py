"""Typed dataset params (issue 25, point 4): every ``data.<name>`` key is declared by its source's ``Params``
dataclass, with no code default; a missing, unknown, mistyped or out-of-range key is a one-line error naming
``data.<name>.<key>``, at ``download`` and at ``prepare``, before anything is read or written. That no Params
field has a default is checked with every other parsed dataclass (tests/test_registry.py)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.datasets import DatasetParams, dataset_params, get_dataset
from pipeline.datasets.imported import ImportedNpy
from pipeline.datasets.nuswide import VARIANTS, NusWide
from pipeline.errors import SpmlError
from pipeline.registry import DATASETS
from tests.conftest import REPO, tiny_params, write_params
from tests.test_hostile_inputs import DELETE, assert_refused, invoke, set_param

REPO_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
BUILT_IN = sorted(REPO_PARAMS["data"])

# one value per dataset that its Params refuses: (key, value, what the message says it must be)
BAD_VALUES = {
    "synthetic": ("image_size", 8, "must be >= 16, got 8"),
    "synthetic-dense": ("cooccurrence_prob", 1.5, "must be >= 0 and <= 1, got 1.5"),
    "voc2012": ("check_images", 1, "must be bool, got 1"),
    "coco2014": ("loader", "json", "must be one of arrow, pycocotools, got 'json'"),
    "cub": ("url", "ftp://mirror/CUB_200_2011.tgz", "must be an http:// or https:// URL or null"),
    "nuswide": ("variant", "zhou", "must be one of cole, official, got 'zhou'"),
}
STAGES = ["download", "prepare"]


def test_every_registered_dataset_has_a_block_and_typed_params():
    """A new dataset module comes with its data.<name> block, and the repository's blocks all parse."""
    assert DATASETS.names() == BUILT_IN == sorted(BAD_VALUES)
    for name in BUILT_IN:
        cls = get_dataset(name).Params
        assert dataclasses.is_dataclass(cls) and issubclass(cls, DatasetParams), name
        parsed = dataset_params(get_dataset(name), REPO_PARAMS)
        assert dataclasses.asdict(parsed) == REPO_PARAMS["data"][name], name  # every key typed, none dropped


def test_nuswide_variants_are_the_params_choices():
    assert set(typing.get_args(typing.get_type_hints(NusWide.Params)["variant"])) == set(VARIANTS)


def _refused(workspace: Path, stage: str, name: str, dotted: str, value, *fragments: str) -> None:
    params = tiny_params()
    write_params(workspace, set_param(params, dotted, value))
    assert_refused(invoke(stage, name), *fragments)
    assert not Path("data").exists()  # refused before anything is read or written


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", BUILT_IN)
def test_missing_key_is_named(workspace, stage, name):
    key = next(iter(REPO_PARAMS["data"][name]))
    _refused(workspace, stage, name, f"data.{name}.{key}", DELETE,
             f"params data.{name}.{key} is missing; add it to params.yaml")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", BUILT_IN)
def test_unknown_key_is_named(workspace, stage, name):
    _refused(workspace, stage, name, f"data.{name}.chek_images", True,
             f"unknown params data.{name}.chek_images; valid: ")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", BUILT_IN)
def test_bad_value_is_named(workspace, stage, name):
    key, value, must = BAD_VALUES[name]
    _refused(workspace, stage, name, f"data.{name}.{key}", value, f"params data.{name}.{key} {must}")


@pytest.mark.parametrize("dotted, value, fragment", [
    ("data.voc2012.url", "", "params data.voc2012.url must be an http:// or https:// URL or null, got ''"),
    ("data.coco2014.source", " ", "params data.coco2014.source must be a path or null, got an empty string"),
    ("data.nuswide.images", 3, "params data.nuswide.images must be str or null, got 3"),
    ("data.coco2014.images", None, "params data.coco2014.images must be bool, got None"),
    ("data.synthetic.object_size", [0.5, 0.2], "params data.synthetic.object_size must be [min, max]"),
])
def test_value_checks_beyond_the_type(workspace, dotted, value, fragment):
    _refused(workspace, "download", dotted.split(".")[1], dotted, value, fragment)


def test_a_missing_block_names_its_keys(workspace):
    params = tiny_params()
    del params["data"]["voc2012"]
    write_params(workspace, params)
    assert_refused(invoke("prepare", "voc2012"),
                   "params data.voc2012.source, data.voc2012.url, data.voc2012.check_images are missing")


def test_imported_dataset_takes_an_empty_or_absent_block():
    source = ImportedNpy("mine", {"dir": "unused"})
    assert dataset_params(source, {"data": {}}) == ImportedNpy.Params()
    assert dataset_params(source, {"data": {"mine": {}}}) == ImportedNpy.Params()
    with pytest.raises(SpmlError, match=r"^unknown params data\.mine\.images; valid: $"):
        dataset_params(source, {"data": {"mine": {"images": "/x"}}})


def test_download_and_prepare_track_the_data_block():
    """prepare reads data.<name> (check_images, COCO's loader, NUS-WIDE's variant), so dvc.yaml tracks it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        assert "data.${item}" in stages[stage]["do"]["params"], stage
