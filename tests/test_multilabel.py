"""The multilabel task kind: per-entry masking in encode, loss and metrics, training with every
architecture, ingest's schema and errors, and the params checks."""

import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score

from mtl.config import load_params
from mtl.engine import ARCHITECTURES, weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor, TabularPreprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit, predict
from mtl.errors import UserError
from tests.helpers import arch_options, run

LABELS = ("l0", "l1", "l2")
TAGS = Task("tags", "multilabel", LABELS, classes=LABELS)
TASKS = [TAGS, Task("size", "regression", "s", mean=10.0, std=2.0)]


def make_table(n: int = 160, seed: int = 0) -> pa.Table:
    """Three labels decided by the two features, each missing on a different share of rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    flags = [x[:, 0] > 0, x[:, 1] > 0, x.sum(1) > 0]
    return pa.table({
        "x0": x[:, 0].tolist(), "x1": x[:, 1].tolist(),
        **{name: [None if i % (3 + j) == 0 else int(v) for i, v in enumerate(flags[j].tolist())]
           for j, name in enumerate(LABELS)},
        "s": (10 + 2 * x[:, 0] - x[:, 1]).tolist(),
    })


def make_bundle(arch: str, table: pa.Table) -> Bundle:
    prep = Preprocessor(TabularPreprocessor.fit(table, ["x0", "x1"], [], indicators=[]))
    torch.manual_seed(0)
    return Bundle.create(arch, TASKS, prep, {"hidden": [16], "head_hidden": [8], "dropout": 0.0,
                                             "options": arch_options(arch, TASKS)}, {})


def test_encode_masks_each_entry_and_reads_booleans_and_integers():
    table = pa.table({"a": [1, 0, None], "b": [True, None, False]})
    y, mask = Task("t", "multilabel", ("a", "b"), classes=("a", "b")).encode(table["a"], table["b"])
    assert mask.tolist() == [[True, True], [True, False], [False, True]]
    assert y.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_the_loss_averages_over_labelled_entries_only():
    out = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.3]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])  # row 2: no label at all
    task = Task("t", "multilabel", ("a", "b"), classes=("a", "b"))
    loss = task.loss(out, y, mask)
    # BCE with logits: -log σ(x) for label 1, -log(1 - σ(x)) = log(1 + e^x) for label 0
    expected = (math.log(2) + math.log(1 + math.e) + math.log(1 + math.e ** 2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(loss, task.loss(out[:2], y[:2], mask[:2]))  # the unlabelled row adds nothing
    loss.backward()
    assert (out.grad[~mask] == 0).all() and (out.grad[mask] != 0).all()


def test_metrics_ignore_masked_entries():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(40, 3, generator=g)
    y = (torch.rand(40, 3, generator=g) > 0.5).float()
    mask = torch.rand(40, 3, generator=g) > 0.3
    values = TAGS.metrics(out, y, mask)
    assert values == TAGS.metrics(out, torch.where(mask, y, 1 - y), mask)
    p = out.sigmoid()
    for name, metric in [("accuracy", binary_accuracy), ("f1_macro", binary_f1_score), ("auroc", binary_auroc)]:
        per_label = [float(metric(p[mask[:, j], j], y[mask[:, j], j].long())) for j in range(3)]
        assert values[name] == pytest.approx(sum(per_label) / 3, abs=1e-6), name
    assert TAGS.metrics(out, y, torch.zeros_like(mask)) == {}


def test_the_task_state_survives_json():
    assert Task.from_state(json.loads(json.dumps(TAGS.state()))) == TAGS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gives_one_output_per_label(arch):
    table = make_table(n=24)
    bundle = make_bundle(arch, table)
    data = TaskData.from_table(table, bundle.preprocessor, TASKS)
    outputs = bundle.model(data.inputs)
    assert outputs["tags"].shape == (24, 3) and data.masks["tags"].shape == (24, 3)
    loss = TAGS.loss(outputs["tags"], data.targets["tags"], data.masks["tags"])
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_fit_learns_a_multilabel_task_beside_a_regression(method):
    train, val = make_table(), make_table(n=80, seed=1)
    bundle = make_bundle("hps", train)
    train_data, val_data = (TaskData.from_table(t, bundle.preprocessor, TASKS) for t in (train, val))
    logs = []
    fit(bundle.model, TASKS, weighting.build(method, [t.name for t in TASKS]), train_data, val_data,
        FitOptions(epochs=15, batch_size=16, lr=1e-2, seed=0), on_epoch=lambda epoch, log: logs.append(log))
    assert all(math.isfinite(v) for log in logs for v in log.values())
    assert logs[-1]["val/loss/tags"] < logs[0]["val/loss/tags"]
    metrics = TAGS.metrics(predict(bundle.model, val_data.inputs)["tags"], val_data.targets["tags"],
                           val_data.masks["tags"])
    assert metrics["accuracy"] > 0.8 and metrics["auroc"] > 0.9  # chance: 0.5


PARAMS = {"data": {"source": "data/raw/small.csv",
                   "tasks": {"tags": {"kind": "multilabel", "target": ["has_a", "has_b"]},
                             "y": {"kind": "regression", "target": "y"}}},
          "variants": {"stl": {"arch": "stl"}}}


def ingest(tmp_path: Path, csv: str) -> tuple[int, str]:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    (tmp_path / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "raw" / "small.csv").write_text(csv, encoding="utf-8")
    result = run([sys.executable, "-m", "mtl", "ingest"], cwd=tmp_path, check=False)
    return result.returncode, result.stderr


def test_ingest_records_labels_positives_and_missing_values(tmp_path):
    rows = ["1,0,true,1.5", "2,1,false,2.5", "3,,TRUE,0.5", "4,1,,1.0", "5,,,2.0"]
    code, err = ingest(tmp_path, "x,has_a,has_b,y\n" + "\n".join(rows) + "\n")
    assert code == 0, err
    schema = json.loads((tmp_path / "data" / "ingested" / "schema.json").read_text())
    assert schema["tasks"]["tags"] == {
        "kind": "multilabel", "target": ["has_a", "has_b"], "labels": ["has_a", "has_b"],
        "n_labelled": 4, "positives": {"has_a": 2, "has_b": 2}, "missing": {"has_a": 2, "has_b": 2}}
    assert list(schema["features"]) == ["x"]


def test_ingest_rejects_a_label_that_is_not_0_or_1(tmp_path):
    code, err = ingest(tmp_path, "x,has_a,has_b,y\n1,0,1,1.5\n2,3,0,2.5\n")
    assert code == 2
    assert err.strip() == ("error: data.tasks.tags.target: column 'has_a' holds 3, "
                           "a multilabel column holds 0/1, true/false or nothing")


@pytest.mark.parametrize(("task", "message"), [
    ({"kind": "multilabel", "target": "has_a"},
     "data.tasks.t.target: multilabel needs a list of at least 2 label columns"),
    ({"kind": "multilabel", "target": ["has_a"]},
     "data.tasks.t.target: multilabel needs a list of at least 2 label columns"),
    ({"kind": "multiclass", "target": ["has_a", "has_b"]},
     "data.tasks.t.target: a multiclass task has one target column, not a list"),
    ({"kind": "multilabel", "target": ["has_a", "has_a"]},
     "data.tasks.t.target: a label column is listed twice"),
])
def test_params_check_list_and_single_targets(tmp_path, task, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS | {"data": {"tasks": {"t": task}}}), encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: {message}"


def test_params_reject_interpolating_on_a_multilabel_task(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS | {"augment": {"interpolate_task": "tags"}}), encoding="utf-8")
    with pytest.raises(UserError, match="augment.interpolate_task: 'tags' is not a binary or multiclass task"):
        load_params(path)
