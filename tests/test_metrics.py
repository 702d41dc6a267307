"""``Task.metrics`` (``mtl.engine.metrics``) gives torchmetrics' values bit for bit: random
outputs with tied scores, classes absent from the labels, one-class targets, unlabelled entries."""

import math

import pytest
import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multilabel_accuracy,
    multilabel_auroc,
    multilabel_f1_score,
)

from mtl.engine.tasks import Task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics on one-class targets


def reference(task: Task, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``Task.metrics`` as it was written with torchmetrics 1.9."""
    if task.kind == "multilabel":
        n, p, labels = len(task.classes), out.float().sigmoid(), torch.where(mask, y.long(), -1)
        return {"accuracy": multilabel_accuracy(p, labels, n, average="macro", ignore_index=-1),
                "f1_macro": multilabel_f1_score(p, labels, n, average="macro", ignore_index=-1),
                "auroc": multilabel_auroc(p, labels, n, average="macro", ignore_index=-1)}
    out, y = out[mask].float(), y[mask]
    if task.kind == "multiclass":
        n, probs = len(task.classes), out.softmax(dim=1)
        return {"accuracy": multiclass_accuracy(probs, y, n, average="micro"),
                "f1_macro": multiclass_f1_score(probs, y, n, average="macro"),
                "auroc": multiclass_auroc(probs, y, n, average="macro")}
    if task.kind == "binary":
        p, labels = out[:, 0].sigmoid(), y.long()
        return {"accuracy": binary_accuracy(p, labels),
                "f1_macro": multiclass_f1_score(torch.stack([1 - p, p], 1), labels, 2, average="macro"),
                "auroc": binary_auroc(p, labels)}
    pred, true = task.decode(out), y * task.std + task.mean
    return {"mae": mean_absolute_error(pred, true),
            "rmse": mean_squared_error(pred, true, squared=False),
            "r2": r2_score(pred, true) if len(y) > 1 else torch.tensor(math.nan)}


def case(kind: str, rows: int, seed: int) -> tuple[Task, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs rounded to one decimal (many ties), labels drawn from fewer classes than the task
    has on some seeds, a few rows unlabelled."""
    g = torch.Generator().manual_seed(seed)
    classes = {"binary": 2, "multiclass": 4, "multilabel": 3, "regression": 1}[kind]
    task = Task("t", kind, "t", classes=tuple(f"c{i}" for i in range(classes))
                if kind != "regression" else (), mean=3.0, std=2.0)
    out = (torch.randn(rows, classes, generator=g) * 2).round(decimals=1)
    drawn = classes - seed % 2 if kind == "multiclass" else max(classes, 2)
    if kind == "regression":
        y = out[:, 0] * (seed % 3 > 0) + torch.randn(rows, generator=g)
    elif kind == "multilabel":
        y = torch.randint(0, 2, (rows, classes), generator=g).float()
    else:
        y = torch.randint(0, drawn, (rows,), generator=g)
        y = y.float() if kind == "binary" else y
    mask = torch.rand(y.shape, generator=g) > 0.1
    return task, out, y, mask


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "regression"])
def test_the_metrics_are_torchmetrics_values(kind):
    for seed in range(40):
        for rows in (2, 3, 7, 50, 400):
            task, out, y, mask = case(kind, rows, seed)
            if not mask.any() or (kind == "multilabel" and not mask.any(0).all()):
                continue  # torchmetrics has no value (or fails) there; see the next test
            ours, theirs = task.metrics(out, y, mask), reference(task, out, y, mask)
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():  # bit for bit
                value = float(value)
                assert ours[key] == value or math.isnan(ours[key]) and math.isnan(value), (
                    kind, seed, rows, key)


def test_perfect_predictions_constant_targets_one_class_and_an_unlabelled_label():
    size = Task("s", "regression", "s", mean=3.0, std=2.0)
    every = torch.ones(4, dtype=torch.bool)
    v = torch.tensor([0.5, 1.0, -2.0, 0.0])
    for out, y, r2 in ((v[:, None] + 0.002, v, 1.0),  # RSS about 0: perfect
                       (v[:, None], 0.25 + v / 1000, 0.0)):  # TSS about 0: constant targets
        ours, theirs = size.metrics(out, y, every), reference(size, out, y, every)
        assert ours == {key: float(value) for key, value in theirs.items()} and ours["r2"] == r2
    binary = Task("b", "binary", "b", classes=("no", "yes"))
    out, y, mask = torch.tensor([[0.3], [-1.0], [2.0]]), torch.ones(3), torch.ones(3, dtype=torch.bool)
    assert binary.metrics(out, y, mask)["auroc"] == 0.0  # torchmetrics' value: no negative row
    labels = Task("m", "multilabel", ("a", "b"), classes=("a", "b"))
    out, y = torch.tensor([[1.0, 0.5], [-1.0, 2.0], [0.5, -3.0]]), torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    mask = torch.tensor([[True, False], [True, False], [True, False]])  # label b: no labelled row
    assert labels.metrics(out, y, mask)["auroc"] == 1.0  # label a alone; torchmetrics fails
