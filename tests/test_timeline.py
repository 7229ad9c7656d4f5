"""The one timeline rule (pipeline/timeline.py): every schedule-type param of every method, and the loop's own,
passes through it; hand-computed values from the rule's formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from pipeline.errors import SpmlError
from pipeline.methods import get_method_class, method_names
from pipeline.timeline import UNITS, Reference, Timeline, timeline_for
from pipeline.run_config import apply_timeline, block_owner, resolve_run_config
from tests.conftest import REPO

# Every schedule-type param of every method, with its unit: a new one must be added here *and* declared in its
# method's `schedules`, so no per-epoch or per-step quantity escapes the rule.
SCHEDULES = {
    "ignore": {"warmup_epochs": "epochs", "gap_decay": "step_decay", "avg_decay": "step_decay"},
    "ignore-gap": {"warmup_epochs": "epochs", "gap_decay": "step_decay", "avg_decay": "step_decay"},
    "an-cons": {"warmup_epochs": "epochs", "gap_decay": "step_decay", "avg_decay": "step_decay"},
    "em-apl": {"warmup": "epochs", "quota_epochs": "epochs"},
    "ll-r": {"delta_percent": "per_epoch"},
    "ll-ct": {"delta_percent": "per_epoch"},
    "ll-cp": {"delta_percent": "per_epoch"},
    "boostlu": {"delta_percent": "per_epoch"},
    "plc-lac": {"stage1_epochs": "epochs"},
    "vlpl": {"warmup_epochs": "epochs"},
    "gr-loss": {"k_weight": "progress", "k_bias": "progress", "v_mean": "progress", "v_std": "progress"},
    "aevlp": {"k_weight": "progress", "k_bias": "progress", "v_mean": "progress", "v_std": "progress"},
}
# a param whose name says it counts epochs or steps, or decays, is a schedule unless listed here with why
SCHEDULE_WORDS = ("epoch", "warmup", "decay", "delta", "quota", "ema", "step")
NOT_SCHEDULES: dict[str, str] = {
    "warmup_mode": "IGNORE's choice of loss during its warm-up (code | an), not a length",
}


def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_rule_hand_computed():
    # IGNORE's reference: 25 epochs of ceil(4574 / 16) = 286 steps; the run: 6 epochs of 100 steps
    t = Timeline(6, 100, 25, 286, "test")
    assert t.map(3, "epochs", "w") == 1  # 3 x 6 / 25 = 0.72 -> 1
    assert t.map(13, "epochs", "w") == 3  # 3.12 -> 3
    assert t.map(0, "epochs", "w") == 0
    assert t.map(8.0, "epochs", "w") == 2.0 and isinstance(t.map(8.0, "epochs", "w"), float)  # 1.92
    assert t.map(0.5, "per_epoch", "d") == pytest.approx(0.5 * 25 / 6)
    assert t.map(0.999, "step_decay", "l") == pytest.approx(0.999 ** (25 * 286 / 600), rel=1e-12)
    assert t.map([0.0, 2.0], "progress", "k") == [0.0, 2.0]
    # halves round up: 5 epochs of 10 on a 3-epoch run is 1.5 -> 2
    assert Timeline(3, 10, 10, 10, "t").map(5, "epochs", "w") == 2
    # the EMA keeps its weight over any share of training: lambda_run ** (p T_run) == lambda_ref ** (p T_ref)
    lam = t.map(0.999, "step_decay", "l")
    assert lam ** 300 == pytest.approx(0.999 ** 3575, rel=1e-9)


def test_rule_is_the_identity_on_the_reference_itself():
    t = Timeline(25, 286, 25, 286, "same")
    assert t.identity
    for value, unit in ((3, "epochs"), (0.5, "per_epoch"), (0.999, "step_decay")):
        assert t.map(value, unit, "x") == value
    ref = Reference("r", 25, 16, False, None)  # the run's own training set
    assert timeline_for(ref, 25, 286, 4574).identity
    assert timeline_for(Reference("none", None, None, False, None), 6, 100, 3200).identity


def test_rule_refuses_what_it_cannot_map():
    t = Timeline(6, 100, 25, 286, "test")
    with pytest.raises(SpmlError, match="x.k is an EMA decay per step"):
        t.map(1.5, "step_decay", "x.k")
    with pytest.raises(SpmlError, match="must be a number"):
        t.map("3", "epochs", "x.k")
    with pytest.raises(SpmlError, match="unknown schedule unit"):
        t.map(3, "weeks", "x.k")


def test_every_declared_schedule_is_a_param_with_a_known_unit():
    for name in method_names():
        cls = get_method_class(name)
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        assert set(cls.schedules) <= fields, (name, set(cls.schedules) - fields)
        assert set(cls.schedules.values()) <= set(UNITS), name
        assert cls.schedules == SCHEDULES.get(name, {}), f"{name}: declared schedules differ from this test's list"
        looks_like = {f for f in fields if any(word in f for word in SCHEDULE_WORDS)}
        undeclared = looks_like - set(cls.schedules) - set(NOT_SCHEDULES)
        assert not undeclared, f"{name}: {undeclared} look like schedules; declare them in {name}.schedules"


def expected(value, unit: str, run_epochs: int, run_steps: int, ref_epochs: int, ref_steps: int):
    """The rule written out once more, independently of pipeline/timeline.py."""
    if unit == "epochs":
        return math.floor(value * run_epochs / ref_epochs + 0.5)
    if unit == "per_epoch":
        return value * ref_epochs / run_epochs
    if unit == "step_decay":
        return value ** ((ref_epochs * ref_steps) / (run_epochs * run_steps))
    return value


TEST_VALUES = {"epochs": 5, "per_epoch": 0.5, "step_decay": 0.999}


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_every_schedule_param_passes_through_the_rule(method):
    """On synthetic (6 epochs of 3200 / 32 = 100 steps, reference: the method's VOC protocol), each declared
    param comes out of apply_timeline as the rule says; progress-type params come out unchanged."""
    p = params()
    owner = block_owner(method)  # an ablation reads its method's block
    block = p["method_params"][owner]["default"]
    for key, unit in SCHEDULES[method].items():
        if unit in TEST_VALUES:
            block[key] = TEST_VALUES[unit]
    run = resolve_run_config(p, "synthetic", method, 0)
    original = p["method_params"][owner]["original"]
    proto = {**original["default"], **original.get("voc2012", {})}
    ref_steps = -(-4574 // proto["batch_size"]) if not proto["drop_last"] else 4574 // proto["batch_size"]
    mapped = apply_timeline(run, 3200)
    assert mapped.timeline == {"reference": f"method_params.{owner}.original on voc2012 (4574 training images)",
                               "reference_epochs": proto["epochs"], "reference_steps_per_epoch": ref_steps,
                               "epochs": 6, "steps_per_epoch": 100}
    for key, unit in SCHEDULES[method].items():
        want = expected(run.method_params[key], unit, 6, 100, proto["epochs"], ref_steps)
        assert mapped.method_params[key] == pytest.approx(want), (method, key)
    assert apply_timeline(mapped, 3200) is mapped  # applied once
    others = {k: v for k, v in run.method_params.items() if k not in SCHEDULES[method]}
    assert others == {k: v for k, v in mapped.method_params.items() if k not in SCHEDULES[method]}


def test_the_loops_own_schedules_pass_through_the_rule():
    """plc under `protocol: original` on synthetic: 40 epochs as on VOC, but 100 steps of 32 against VOC's
    4574 // 32 = 142 (their loader drops the last batch), so the per-step weight EMA gets 0.9997 ** (142 / 100);
    the patience (8 epochs) keeps its epochs."""
    p = params()
    p["protocol"] = "original"
    run = resolve_run_config(p, "synthetic", "plc", 0)
    assert run.train.epochs == 40 and run.train.early_stop == "patience" and run.train.drop_last
    mapped = apply_timeline(run, 3200)
    assert mapped.train.weight_ema == pytest.approx(0.9997 ** (40 * 142 / (40 * 100)), rel=1e-12)
    assert mapped.train.early_stop_value == 8.0
    # the same under the unified protocol's 6 epochs: patience 8 of 40 -> 1.2 -> 1
    p["protocol"] = "unified"
    p["train"]["default"].update(early_stop="patience", early_stop_value=8.0, weight_ema=0.9997)
    mapped = apply_timeline(resolve_run_config(p, "synthetic", "plc", 0), 3200)
    assert mapped.train.early_stop_value == 1.0
    assert mapped.train.weight_ema == pytest.approx(0.9997 ** (40 * 142 / (6 * 100)), rel=1e-12)


def test_real_dataset_reference_is_the_dataset_itself():
    """On voc2012 under `protocol: original` the rule is the identity: the published values run as written."""
    p = params()
    p["protocol"] = "original"
    run = resolve_run_config(p, "voc2012", "ignore", 0)
    mapped = apply_timeline(run, 4574)
    assert mapped.timeline["reference"] == "method_params.ignore.original on voc2012"
    assert mapped.method_params == run.method_params and mapped.train == run.train


def test_no_hand_converted_schedule_left_in_params():
    """Schedules are set once, for the reference protocol: no dataset block of an embedded set overrides one."""
    p = params()
    for method, block in p["method_params"].items():
        for scope in ("synthetic", "synthetic-dense"):
            overridden = set((block or {}).get(scope) or {}) & set(SCHEDULES.get(method, {}))
            assert not overridden, f"method_params.{method}.{scope} sets schedules {overridden} by hand"
