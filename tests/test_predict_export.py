"""``mtl predict`` and ``mtl export`` on a small model trained by the real stages on penguins:
predictions for rows the model never saw, agreement with evaluate's path, exported files that
give the model's outputs, the int8 metric change, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.engine.checkpoint import Bundle
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData, predict
from mtl.stages import export
from mtl.stages import predict as predict_stage
from tests.helpers import REPO, train_project
from tests.test_faults import read_only

VARIANT = "hps-ew"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with penguins ingested, augmented, split and hps-ew trained for seed 0."""
    root = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seeds"] = [0]
    raw["train"] |= {"epochs": 8, "batch_size": 64, "patience": 0}
    raw["encoders"]["numeric"] = "standard"  # ple and periodic: tests/test_numeric_encoders.py
    return train_project(root, raw, VARIANT)


@pytest.fixture
def bundle(project: Path) -> Bundle:
    return Bundle.load(project / paths.model_dir(VARIANT, 0) / "model.pt")


def mtl(project: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.chdir(project)
    return CliRunner().invoke(app, list(args))


def new_rows(project: Path) -> pa.Table:
    """Test rows as a user would bring them: no targets, an unseen island, missing values."""
    table = pq.read_table(project / paths.split_path("test")).slice(0, 6)
    table = table.drop_columns(["species", "sex", "body_mass_g", "_source_id", "_augmented"])
    island = ["Atlantis", None] + table["island"].to_pylist()[2:]
    bill = [None] + table["bill_length_mm"].to_pylist()[1:]
    table = table.set_column(table.schema.get_field_index("island"), "island", pa.array(island))
    return table.set_column(table.schema.get_field_index("bill_length_mm"), "bill_length_mm",
                            pa.array(bill, pa.float64()))


def test_predict_new_rows_with_unseen_category_and_missing_values(project, bundle, monkeypatch):
    rows = new_rows(project)
    pacsv.write_csv(rows, project / "new.csv")
    result = mtl(project, monkeypatch, "predict", "--variant", VARIANT, "--input", "new.csv",
                 "--output", "out/pred.parquet")
    assert result.exit_code == 0, result.output
    out = pq.read_table(project / "out" / "pred.parquet")
    assert out.num_rows == rows.num_rows
    assert out.column_names == [
        "_id", "species", "species:p:Adelie", "species:p:Chinstrap", "species:p:Gentoo",
        "sex", "sex:p:female", "sex:p:male", "body_mass"]
    assert out["_id"].to_pylist() == rows["_id"].to_pylist()
    for task in ("species", "sex"):
        task_ = next(t for t in bundle.tasks if t.name == task)
        probs = np.stack([out[f"{task}:p:{c}"].to_numpy() for c in task_.classes], axis=1)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert out[task].to_pylist() == [task_.classes[i] for i in probs.argmax(axis=1)]
    assert np.isfinite(out["body_mass"].to_numpy()).all()
    # An unseen island is treated as a missing one: the reserved index 0, as in training.
    inputs = bundle.preprocessor.transform(rows)
    assert inputs["cat"][:2, 0].tolist() == [0, 0]


def test_predictions_on_the_test_split_equal_evaluates(project, bundle, monkeypatch):
    test = pq.read_table(project / paths.split_path("test"))
    monkeypatch.setattr(predict_stage, "CHUNK_ROWS", 10)  # several chunks
    result = mtl(project, monkeypatch, "predict", "-v", VARIANT, "--seed", "0",
                 "-i", str(paths.split_path("test")), "-o", "out/test.parquet")
    assert result.exit_code == 0, result.output
    out = pq.read_table(project / "out" / "test.parquet")
    data = TaskData.from_table(test, bundle.preprocessor, bundle.tasks)
    outputs = predict(bundle.model, data.inputs)
    assert out["_id"].to_pylist() == test["_id"].to_pylist()
    for task in bundle.tasks:
        p = task.decode(outputs[task.name]).numpy()
        if task.kind == "regression":
            np.testing.assert_allclose(out[task.name].to_numpy(), p, rtol=1e-6)
            continue
        if task.kind == "binary":
            p = np.stack([1 - p, p], axis=1)
        got = np.stack([out[f"{task.name}:p:{c}"].to_numpy() for c in task.classes], axis=1)
        np.testing.assert_allclose(got, p, atol=1e-6)
        assert out[task.name].to_pylist() == [task.classes[i] for i in p.argmax(axis=1)]


def exported_outputs(path: Path, fmt: str, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    if fmt == "torchscript":
        return [o.detach().numpy() for o in torch.jit.load(str(path))(*inputs.values())]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"input_{k}": v.numpy() for k, v in inputs.items()})


def assert_export_and_predict_match(project: Path, monkeypatch: pytest.MonkeyPatch, variant: str,
                                    fmt: str, bundle: Bundle) -> None:
    """``mtl export`` to ``fmt`` gives the eager model's outputs on the test split (within 1e-5),
    and ``mtl predict`` writes its body mass."""
    inputs = bundle.preprocessor.transform(pq.read_table(project / paths.split_path("test")))
    reference = predict(bundle.model, inputs)
    path = project / "out" / f"model.{fmt}"
    result = mtl(project, monkeypatch, "export", "-v", variant, "-f", fmt, "-o", str(path))
    assert result.exit_code == 0, result.output
    for task, out in zip(bundle.tasks, exported_outputs(path, fmt, inputs)):
        np.testing.assert_allclose(out, reference[task.name].numpy(), atol=1e-5)
    result = mtl(project, monkeypatch, "predict", "-v", variant, "-i", str(paths.split_path("test")),
                 "-o", "out/test.parquet")
    assert result.exit_code == 0, result.output
    mass = pq.read_table(project / "out" / "test.parquet")["body_mass"].to_numpy()
    task = bundle.tasks[2]
    np.testing.assert_allclose(mass, task.decode(reference[task.name]).numpy(), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_the_models_outputs(project, bundle, monkeypatch, fmt):
    path = project / "out" / f"model.{fmt}"
    result = mtl(project, monkeypatch, "export", "-v", VARIANT, "--format", fmt, "-o", str(path))
    assert result.exit_code == 0, result.output
    test = pq.read_table(project / paths.split_path("test"))
    inputs = bundle.preprocessor.transform(test)
    reference = predict(bundle.model, inputs)
    got = exported_outputs(path, fmt, inputs)
    for task, out in zip(bundle.tasks, got):
        np.testing.assert_allclose(out, reference[task.name].numpy(), atol=1e-5)
    spec = json.loads(Path(f"{path}.json").read_text())
    assert [i["name"] for i in spec["inputs"]] == ["input_num", "input_cat"]
    assert [o["name"] for o in spec["outputs"]] == ["output_species", "output_sex", "output_body_mass"]
    assert spec["outputs"][0]["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert spec["outputs"][2]["mean"] == bundle.tasks[2].mean
    assert spec["preprocessing"]["tabular"]["vocabularies"] == [["Biscoe", "Dream", "Torgersen"]]
    report = json.loads(Path(f"{path}.metrics.json").read_text())
    for task, changes in report["change"].items():
        assert all(abs(v) < 1e-4 for v in changes.values() if v is not None), (task, changes)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_int8_export_reports_a_small_metric_change(project, monkeypatch, fmt):
    path = project / "out" / f"int8.{fmt}"
    result = mtl(project, monkeypatch, "export", "-v", VARIANT, "-f", fmt, "--int8", "-o", str(path))
    assert result.exit_code == 0, result.output
    assert "change" in result.output and "species" in result.output
    report = json.loads(Path(f"{path}.metrics.json").read_text())
    assert set(report) >= {"float", "exported", "change"}
    for task in ("species", "sex"):
        assert abs(report["change"][task]["accuracy"]) <= 0.05
    assert abs(report["change"]["body_mass"]["mae"]) <= 0.05 * report["float"]["body_mass"]["mae"]
    assert max(report["max_abs_output_diff"].values()) > 0  # the weights did change


def test_pruning_zeroes_the_smallest_linear_weights_over_all_layers_for_good(bundle):
    model = bundle.model
    pruned = export.pruned(model, 0.5)
    linears = [(m, p) for m, p in zip(model.modules(), pruned.modules()) if isinstance(m, torch.nn.Linear)]
    before = torch.cat([m.weight.detach().flatten() for m, _ in linears])
    after = torch.cat([p.weight.detach().flatten() for _, p in linears])
    zero = after == 0
    assert zero.sum().item() == round(0.5 * before.numel())  # half of all Linear weights...
    assert before[zero].abs().max() <= before[~zero].abs().min()  # ...those of smallest magnitude
    assert len({(p.weight == 0).float().mean().item() for _, p in linears}) > 1  # ranked globally
    assert torch.equal(after[~zero], before[~zero]) and not (before == 0).all()  # the rest kept
    assert all(not hasattr(p, "weight_orig") and not p._forward_pre_hooks for _, p in linears)
    assert all(torch.equal(b.bias, a.bias) for b, a in linears)
    assert (torch.cat([m.weight.detach().flatten() for m, _ in linears]) == before).all()  # a copy


def test_prune_export_zeroes_weights_and_reports_the_metric_change_also_with_int8(project, monkeypatch):
    path = project / "out" / "pruned.pt"
    result = mtl(project, monkeypatch, "export", "-v", VARIANT, "-f", "torchscript", "--prune", "0.6",
                 "-o", str(path))
    assert result.exit_code == 0, result.output
    assert "pruned 0.6" in result.output and "change" in result.output
    weights = [p for n, p in torch.jit.load(str(path)).named_parameters() if n.endswith("weight") and p.dim() == 2]
    assert (torch.cat([w.flatten() for w in weights]) == 0).float().mean() > 0.5
    report = json.loads(Path(f"{path}.metrics.json").read_text())
    assert max(report["max_abs_output_diff"].values()) > 1e-3  # the outputs did change
    assert json.loads(Path(f"{path}.json").read_text())["prune"] == 0.6
    both = project / "out" / "pruned-int8.onnx"
    result = mtl(project, monkeypatch, "export", "-v", VARIANT, "-f", "onnx", "--prune", "0.6", "--int8",
                 "-o", str(both))
    assert result.exit_code == 0, result.output
    assert "onnx int8 pruned 0.6" in result.output
    spec = json.loads(Path(f"{both}.json").read_text())
    assert (spec["prune"], spec["int8"]) == (0.6, True)
    assert set(json.loads(Path(f"{both}.metrics.json").read_text())) >= {"float", "exported", "change"}


@pytest.mark.parametrize("args,names", [
    (["predict", "-v", VARIANT, "-i", "no-bill.csv", "-o", "p.parquet"], ["no-bill.csv", "bill_length_mm"]),
    (["predict", "-v", VARIANT, "-i", "data/split/test.parquet", "-o", "p.csv"], ["--output", ".parquet"]),
    (["predict", "-v", "hps-static", "-i", "data/split/test.parquet", "-o", "p.parquet"],
     ["models/hps-static/seed-0/model.pt", "mtl train --variant hps-static"]),
    (["predict", "-v", VARIANT, "--seed", "7", "-i", "data/split/test.parquet", "-o", "p.parquet"], ["--seed", "7"]),
    (["export", "-v", VARIANT, "-f", "tflite", "-o", "m.tflite"], ["--format", "tflite"]),
    (["export", "-v", "hps-static", "-f", "onnx", "-o", "m.onnx"], ["models/hps-static/seed-0/model.pt"]),
])
def test_bad_input_is_one_line_and_exit_2(project, monkeypatch, args, names):
    pacsv.write_csv(new_rows(project).drop_columns(["bill_length_mm"]), project / "no-bill.csv")
    before = sorted(p.name for p in project.iterdir())
    result = mtl(project, monkeypatch, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(name in lines[0] for name in names), lines[0]
    assert sorted(p.name for p in project.iterdir()) == before  # nothing written


@pytest.mark.parametrize("args", [
    ["predict", "-v", VARIANT, "-i", "data/split/test.parquet", "-o", "read-only/p.parquet"],
    ["export", "-v", VARIANT, "-f", "torchscript", "-o", "read-only/m.pt"],
])
def test_an_output_in_a_read_only_folder_is_one_line(project, monkeypatch, args):
    with read_only(project / "read-only") as folder:
        result = mtl(project, monkeypatch, *args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {args[-1]}: cannot be written: "), result.stderr
        assert list(folder.iterdir()) == []
    folder.rmdir()


def test_multilabel_tasks_get_one_probability_column_per_label():
    task = Task("tags", "multilabel", ("a", "b"), classes=("a", "b"))
    columns = predict_stage.task_columns(task, torch.tensor([[0.0, 2.0], [-1.0, 0.0]]))
    assert list(columns) == ["tags:a", "tags:b"]
    np.testing.assert_allclose(columns["tags:b"], torch.tensor([2.0, 0.0]).sigmoid().numpy(), rtol=1e-6)
