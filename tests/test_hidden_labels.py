"""Methods never see the hidden labels: what a method gets holds none, what it reports is scored by the loop.

The loop's scores are checked against values computed by hand for a toy method that reports known entries,
and a spy method trained by ``fit`` checks every object a method is handed.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.methods
from pipeline.contracts import Batch, HiddenLabels, MethodContext, ModelOutput, StepOutput
from pipeline.data import MethodBatches, Normalizer
from pipeline.errors import SpmlError
from pipeline.hidden_scoring import FalseNegativeMeter, score_step
from pipeline.methods import Method, register_method
from pipeline.train import Training, train_one_epoch

# 4 training rows, 3 classes, served as two batches of two rows
OBSERVED = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
FULL = torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]])  # false negatives (0,1), (1,2), (2,0)
FLAGGED = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)  # (0,0) is observed
PICKED = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)  # (3,0) is observed
VALUES = torch.arange(12.0).view(4, 3)  # entry (r, c) holds 3r + c
# 2x2 instance maps; instance k+1 has class INSTANCE_CLASSES[row, k]
INSTANCES = torch.tensor([[[1, 1], [2, 0]], [[0, 1], [0, 0]], [[1, 2], [2, 2]], [[0, 0], [0, 0]]], dtype=torch.uint8)
INSTANCE_CLASSES = torch.tensor([[0, 1], [1, -1], [0, 2], [-1, -1]])
KEPT = torch.tensor([[[1.0, 0], [0, 1]], [[1, 0], [1, 1]], [[1, 0], [1, 0]], [[1, 1], [1, 1]]])


class Bias(torch.nn.Module):
    """Logits = a learnable bias, whatever the image (the loop needs something to optimise)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        logits = self.bias.expand(len(x), -1)
        return ModelOutput(logits, logits[:, :, None, None].expand(-1, -1, 2, 2))


def ctx(observed=OBSERVED) -> MethodContext:
    return MethodContext(dataset="toy", model="bias", num_classes=3, num_train=4, epochs=1, steps_per_epoch=2,
                         mean_positives=1.0, observed_train=observed, device=torch.device("cpu"))


class Reporter(Method):
    """Reports the fixed entries above for its rows, and records the batches it was handed."""

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.seen: list[Batch] = []

    def training_step(self, model, batch, epoch):
        self.seen.append(batch)
        i = batch.index
        loss = model(batch.image).logits.square().mean()
        return StepOutput(loss, flagged=FLAGGED[i], split_means={"score": VALUES[i]}, fn_share={"picked": PICKED[i]},
                          kept_region=KEPT[i])


class FullReporter(Reporter):
    label_source = "full"


def items(instances: bool = True) -> list[dict]:
    """What the training DataLoader yields: the hidden labels travel with the observed ones."""
    out = []
    for rows in ([0, 1], [2, 3]):
        i = torch.tensor(rows)
        item = {"index": i, "image": torch.full((2, 3, 2, 2), 128, dtype=torch.uint8), "observed": OBSERVED[i],
                "full": FULL[i]}
        if instances:
            item.update(instances=INSTANCES[i], instance_classes=INSTANCE_CLASSES[i])
        out.append(item)
    return out


def one_epoch(method: Method, loader: list[dict]) -> dict[str, float]:
    model = Bias(3)
    training = Training(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        scheduler=None, scaler=None, ema=None, amp=None, max_loss=None)
    return train_one_epoch(training, loader, Normalizer(torch.device("cpu")), 1)


def test_a_method_is_handed_no_hidden_labels():
    assert [f.name for f in dataclasses.fields(Batch)] == ["index", "image", "observed", "strong"]
    # a new context field is a deliberate decision: it must not carry the hidden labels either
    assert [f.name for f in dataclasses.fields(MethodContext)] == [
        "dataset", "model", "num_classes", "num_train", "epochs", "steps_per_epoch", "mean_positives",
        "observed_train", "device"]
    method = Reporter({}, ctx())
    assert not hasattr(method, "fn_meter")
    one_epoch(method, items())
    assert len(method.seen) == 2
    for batch, rows in zip(method.seen, ([0, 1], [2, 3])):
        assert type(batch) is Batch and not hasattr(batch, "full") and not hasattr(batch, "instances")
        assert torch.equal(batch.observed, OBSERVED[rows])


def test_the_loop_scores_the_report_against_the_hidden_labels():
    row = one_epoch(Reporter({}, ctx()), items())
    # 8 unannotated entries, 3 false negatives; flagged unannotated: (0,1) FN, (1,0) and (2,1) TN
    assert row["fn_flagged"] == 3
    assert row["fn_precision"] == pytest.approx(1 / 3) and row["fn_recall"] == pytest.approx(1 / 3)
    assert row["fn_f1"] == pytest.approx(1 / 3) and row["fn_tn_ratio"] == pytest.approx(1 / 2)
    assert row["fn_base_rate"] == pytest.approx(3 / 8)
    # VALUES at the observed positives (0, 4, 8, 9), true negatives (2, 3, 7, 10, 11), false negatives (1, 5, 6)
    assert row["score_sp"] == pytest.approx(21 / 4)
    assert row["score_tn"] == pytest.approx(33 / 5)
    assert row["score_fn"] == pytest.approx(4.0)
    # picked unannotated (0,2) TN, (1,2) FN, (3,1) TN
    assert row["picked"] == pytest.approx(1 / 3)
    # positive's object kept: row 0 1 of 2 pixels, row 1 0 of 1, row 2 1 of 3 (row 3 has no objects);
    # other objects removed: row 0 1 of 1, row 2 0 of 1
    assert row["mask_pos_kept"] == pytest.approx(2 / 6)
    assert row["mask_other_removed"] == pytest.approx(1 / 2)


def test_without_instance_maps_the_kept_region_is_not_scored():
    row = one_epoch(Reporter({}, ctx()), items(instances=False))
    assert "mask_pos_kept" not in row and row["fn_flagged"] == 3


def test_a_method_that_reports_nothing_gets_no_diagnostic_columns():
    class Quiet(Method):
        def training_step(self, model, batch, epoch):
            return StepOutput(model(batch.image).logits.square().mean())

    row = one_epoch(Quiet({}, ctx()), items())
    assert sorted(row) == ["train_loss"]


def test_scoring_draws_no_random_numbers_and_changes_nothing():
    batch = Batch(index=torch.arange(4), image=torch.zeros(4, 3, 2, 2), observed=OBSERVED.clone())
    out = StepOutput(torch.zeros(()), flagged=FLAGGED.clone(), split_means={"score": VALUES.clone()},
                     fn_share={"picked": PICKED.clone()}, kept_region=KEPT.clone())
    hidden = HiddenLabels(FULL.clone(), INSTANCES.clone(), INSTANCE_CLASSES.clone())
    rng = torch.get_rng_state()
    meter = FalseNegativeMeter()
    score_step(meter, batch, out, hidden)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(out.flagged, FLAGGED) and torch.equal(out.kept_region, KEPT)
    assert torch.equal(batch.observed, OBSERVED) and torch.equal(hidden.full, FULL)
    assert meter.summary()["fn_flagged"] == 3
    assert not meter.active  # the summary resets the meter


def test_full_label_method_gets_the_full_labels_as_observed():
    method = FullReporter({}, ctx(FULL))
    row = one_epoch(method, items())
    for batch, rows in zip(method.seen, ([0, 1], [2, 3])):
        assert torch.equal(batch.observed, FULL[rows])
    # scored as what it trains on: every entry it did not observe is a true negative
    assert row["fn_base_rate"] == 0.0


def test_method_batches_are_lazy_and_hide_the_hidden_labels():
    class CountingLoader(list):
        passes = 0

        def __iter__(self):
            CountingLoader.passes += 1
            return super().__iter__()

    loader = CountingLoader(items())
    normalize = Normalizer(torch.device("cpu"))
    batches = MethodBatches(loader, normalize)
    assert CountingLoader.passes == 0 and len(batches) == 2  # creating the view iterates nothing
    seen = list(batches)
    assert CountingLoader.passes == 1
    assert [type(b) for b in seen] == [Batch, Batch] and torch.equal(seen[1].observed, OBSERVED[[2, 3]])
    full = list(MethodBatches(loader, normalize, "full"))
    assert torch.equal(full[0].observed, FULL[[0, 1]])
    hidden = normalize.hidden(loader[0])
    assert torch.equal(hidden.full, FULL[[0, 1]]) and torch.equal(hidden.instances, INSTANCES[[0, 1]])


def test_no_method_module_names_the_hidden_labels_or_their_scorer():
    """The import contracts (pyproject.toml) keep pipeline.data and pipeline.hidden_scoring out of every method
    module; HiddenLabels itself is on the ground floor (pipeline.contracts), so its name is checked here."""
    package = Path(pipeline.methods.__file__).parent
    for path in sorted(package.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                names |= {node.module or "", *(alias.name for alias in node.names)}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        assert "HiddenLabels" not in names, path.name
        assert not any("hidden_scoring" in name for name in names), path.name


def test_register_method_refuses_an_unknown_label_source():
    class Cheat(Method):
        label_source = "hidden"

    with pytest.raises(SpmlError, match="label_source"):
        register_method("cheat")(Cheat)


# ----------------------------------------------------------------------------------- through fit
SEEN: dict[str, list] = {}


class Spy(Method):
    """Records everything fit hands it; flags every unannotated entry (recall 1, precision = base rate)."""

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        SEEN[self.name] = [("ctx", ctx.observed_train.clone())]

    def training_step(self, model, batch, epoch):
        SEEN[self.name].append(("step", batch))
        logits = model(batch.image).logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.positives)
        return StepOutput(loss, flagged=batch.observed == 0)

    def after_optimizer_step(self, batch, epoch):
        SEEN[self.name].append(("after", batch))

    def on_epoch_end(self, epoch, model, batches):
        SEEN[self.name].extend(("end", batch) for batch in batches)


class FullSpy(Spy):
    label_source = "full"


@pytest.mark.parametrize("name,cls", [("spy-observed", Spy), ("spy-full", FullSpy)])
def test_fit_hands_a_method_only_its_label_source(name, cls, tiny_data_dir, tmp_path, monkeypatch):
    import pandas as pd

    from pipeline import paths
    from pipeline.config import deep_merge
    from pipeline.registry import METHODS
    from pipeline.tables import read_label_table, read_observed_table
    from stages import train
    from tests.conftest import tiny_params, write_params

    monkeypatch.chdir(tiny_data_dir)
    register_method(name)(cls)
    try:
        params = write_params(tmp_path, deep_merge(tiny_params(), {"train": {"default": {"epochs": 1}}}))
        train.run("synthetic", name, 0, params, tmp_path / "run")
    finally:
        METHODS.unregister(name)
    table = read_label_table(paths.label_table("synthetic"))
    rows = table.rows("train")
    full = torch.from_numpy(table.labels[rows].astype(np.float32))
    observed = torch.from_numpy(read_observed_table(paths.observed_table("synthetic")).labels[rows].astype(np.float32))
    assert not torch.equal(full, observed)  # else this test could not tell them apart
    expected = full if cls.label_source == "full" else observed
    (kind, observed_train), *handed = SEEN.pop(name)
    assert kind == "ctx" and torch.equal(observed_train, expected)
    assert {kind for kind, _ in handed} == {"step", "after", "end"}
    for _, batch in handed:
        assert type(batch) is Batch and [f.name for f in dataclasses.fields(batch)] == [
            "index", "image", "observed", "strong"]
        assert torch.equal(batch.observed, expected[batch.index])
    # the spy flags every entry it was not given as positive: all false negatives, if it has any
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    unannotated = sum(int((batch.observed == 0).sum()) for kind, batch in handed if kind == "step")
    assert history.fn_flagged[0] == unannotated
    assert history.fn_precision[0] == pytest.approx(history.fn_base_rate[0], abs=1e-5)
    if cls.label_source == "observed":
        assert history.fn_recall[0] == 1.0 and history.fn_base_rate[0] > 0
    else:  # trained on the full labels: nothing it was not given is positive
        assert history.fn_recall[0] == 0.0 and history.fn_base_rate[0] == 0.0
