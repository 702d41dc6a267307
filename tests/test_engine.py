"""The engine on small tensors: label masking, weightings, STL independence, checkpoints."""

import dataclasses
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from mtl.engine import ARCHITECTURES, WEIGHTINGS, gradients, weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor, TabularEncoder, TabularPreprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit, predict
from mtl.engine.weighting import Step
from tests.helpers import REPO, arch_options, env

TASKS = [Task("kind", "multiclass", "k", classes=("a", "b", "c")),
         Task("flag", "binary", "f", classes=("no", "yes")),
         Task("size", "regression", "s", mean=10.0, std=2.0)]


def make_table(n: int = 120, seed: int = 0) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    kind = (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()
    flag = x[:, 1] > 0
    size = 10 + 2 * x[:, 0] - x[:, 1]
    labels = ["a", "b", "c"]
    return pa.table({
        "x0": x[:, 0].tolist(), "x1": x[:, 1].tolist(),
        "colour": ["red" if i % 3 else "blue" for i in range(n)],
        "k": [labels[i] for i in kind.tolist()],
        "f": [None if i % 7 == 0 else ("yes" if v else "no") for i, v in enumerate(flag.tolist())],
        "s": size.tolist(),
    })


def make_bundle(arch: str, table: pa.Table, **layers) -> Bundle:
    prep = Preprocessor(TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[]))
    torch.manual_seed(0)
    return Bundle.create(arch, TASKS, prep, {"hidden": [16], "head_hidden": [8], "dropout": 0.0,
                                             "options": arch_options(arch, TASKS)} | layers, {})


def test_weighting_registry_matches_the_names_params_may_use():
    assert (*weighting.CLASSES, *weighting.GRADIENT_METHODS) == WEIGHTINGS
    assert tuple(gradients.CLASSES) == weighting.GRADIENT_METHODS


def test_only_a_gradient_method_imports_torchjd():
    """torchjd's import costs every training process a CPU-second: loss weightings skip it."""
    code = ("import sys; from mtl.engine import weighting; weighting.build('ew', ['a', 'b']); "
            "assert 'torchjd' not in sys.modules; weighting.build('mgda', ['a', 'b']); "
            "assert 'torchjd' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True)


def test_unlabelled_rows_add_nothing_to_the_loss():
    task = TASKS[1]
    out = torch.randn(6, 1, requires_grad=True)
    mask = torch.tensor([True, True, False, True, False, False])
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    y_changed = torch.where(mask, y, 1 - y)
    loss = task.loss(out, y, mask)
    assert torch.equal(loss, task.loss(out, y_changed, mask))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out[mask, 0], y[mask])
    assert torch.allclose(loss, expected)  # averaged over the 3 labelled rows only
    loss.backward()
    assert (out.grad[~mask] == 0).all()


@pytest.mark.parametrize("objective", ["mse", "l1"])
def test_a_regression_task_trains_on_its_own_loss(objective):
    """``data.tasks.<name>.loss``: squared or absolute error, over the labelled rows."""
    task = dataclasses.replace(TASKS[2], objective=objective)
    out, y = torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([1.0, -1.0, 0.0])
    mask = torch.tensor([True, True, False])
    errors = torch.tensor([1.0, 3.0])
    assert task.loss(out, y, mask).item() == (errors ** (2 if objective == "mse" else 1)).mean().item()
    assert Task.from_state(task.state()) == task


def test_a_batch_without_labels_gives_zero_loss_and_gradient():
    out = torch.randn(4, 3, requires_grad=True)
    loss = TASKS[0].loss(out, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (out.grad == 0).all()


def test_encoding_masks_missing_labels_and_standardises_regression():
    table = make_table()
    y, mask = TASKS[1].encode(table["f"])
    assert int((~mask).sum()) == len(range(0, 120, 7))
    y, mask = TASKS[2].encode(table["s"])
    assert mask.all()
    assert torch.allclose(y * 2 + 10, torch.tensor(table["s"].to_pylist()), atol=1e-5)


def test_unseen_category_maps_to_the_reserved_index():
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0"], ["colour"], indicators=["x0"])
    new = pa.table({"x0": [None, 1.0], "colour": ["green", "red"]})
    inputs = prep.transform(new)
    assert inputs["cat"][:, 0].tolist() == [0, 2]  # vocabulary: blue=1, red=2; unseen -> 0
    assert inputs["num"][0].tolist() == [0.0, 1.0]  # missing: train mean (0 standardised) + indicator
    assert TabularEncoder(prep.num_dim, prep.cardinalities)(inputs).shape[0] == 2


@pytest.mark.parametrize("name,weights,expected", [
    ("ew", None, [1.0, 1.0, 1.0]),
    ("static", {"kind": 2.0, "flag": 0.5, "size": 0.0}, [2.0, 0.5, 0.0]),
])
def test_weightings_scale_the_task_gradients(name, weights, expected):
    params = torch.ones(3, requires_grad=True)
    losses = params * torch.tensor([1.0, 2.0, 3.0])
    used = weighting.build(name, [t.name for t in TASKS], weights).backward(losses, Step([params]))
    assert used.tolist() == expected
    assert params.grad.tolist() == [w * c for w, c in zip(expected, [1.0, 2.0, 3.0])]


def fit_options(**kw) -> FitOptions:
    return FitOptions(**({"epochs": 15, "batch_size": 16, "lr": 1e-2, "seed": 0} | kw))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_reduces_the_loss_on_every_task(arch):
    table = make_table()
    bundle = make_bundle(arch, table)
    data = TaskData.from_table(table, bundle.preprocessor, TASKS)
    logs = []
    fit(bundle.model, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data,
        fit_options(), on_epoch=lambda epoch, log: logs.append(log))
    for t in TASKS:
        assert logs[-1][f"val/loss/{t.name}"] < 0.5 * logs[0][f"val/loss/{t.name}"]
    assert logs[-1]["val/kind/accuracy"] > 0.8


def test_stl_members_train_exactly_as_if_alone():
    """The STL baseline trains its networks in one loop; each must end as if trained alone."""
    table = make_table()
    data = TaskData.from_table(table, make_bundle("stl", table).preprocessor, TASKS)
    together = make_bundle("stl", table).model
    fit(together, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data, fit_options())
    for t in TASKS:
        alone = make_bundle("stl", table).model.members[t.name]  # same initial weights
        fit(alone, [t], weighting.build("ew", [t.name]), data, data, fit_options())
        for (name, a), b in zip(alone.state_dict().items(), together.members[t.name].state_dict().values()):
            assert torch.equal(a, b), f"{t.name}: {name} differs"


def test_stl_members_with_their_own_settings_train_as_if_alone_with_them(tmp_path):
    """The tuned baseline's per-task settings: each member its own widths, and its own optimizer
    group (learning rate and weight decay), and it ends as if trained alone with them."""
    table = make_table()
    own = {"kind": {"hidden": [8, 8], "lr_factor": 3.0, "weight_decay": 0.05},
           "size": {"head_hidden": [4], "dropout": 0.2, "lr_factor": 0.5}}
    data = TaskData.from_table(table, make_bundle("stl", table).preprocessor, TASKS)
    bundle = make_bundle("stl", table, per_task=own)
    together = bundle.model
    assert [m.p for m in together.members["size"].modules() if isinstance(m, torch.nn.Dropout)]
    options = fit_options()
    fit(together, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data, options)
    decays = {"kind": 0.05, "flag": options.weight_decay}
    for t in [TASKS[0], TASKS[1]]:  # size: dropout draws from the one random stream
        alone = make_bundle("stl", table, per_task=own).model.members[t.name]
        settings = {"lr": options.lr * own.get(t.name, {}).get("lr_factor", 1.0),
                    "weight_decay": decays[t.name]}
        fit(alone, [t], weighting.build("ew", [t.name]), data, data, fit_options(**settings))
        for (name, a), b in zip(alone.state_dict().items(), together.members[t.name].state_dict().values()):
            assert torch.equal(a, b), f"{t.name}: {name} differs"
    bundle.save(tmp_path / "model.pt")
    widths = [m.out_features for m in Bundle.load(tmp_path / "model.pt").model.members["kind"].trunk
              if isinstance(m, torch.nn.Linear)]
    assert widths == [8, 8]


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    table = make_table()
    bundle = make_bundle("hps", table)
    bundle.save(tmp_path / "model.pt")
    loaded = Bundle.load(tmp_path / "model.pt")
    inputs = bundle.preprocessor.transform(table)
    assert loaded.tasks == TASKS
    for name, out in predict(bundle.model, inputs).items():
        assert torch.equal(out, predict(loaded.model, loaded.preprocessor.transform(table))[name])


def test_metrics_are_computed_on_labelled_rows_in_original_units():
    task = TASKS[2]
    y = torch.tensor([0.0, 1.0, -1.0])  # standardised: 10, 12, 8
    out = torch.tensor([[0.5], [1.0], [100.0]])  # predictions 11, 12, (masked)
    metrics = task.metrics(out, y, torch.tensor([True, True, False]))
    assert metrics["mae"] == pytest.approx(0.5)
    assert metrics["rmse"] == pytest.approx((1 / 2) ** 0.5)
