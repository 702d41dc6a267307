"""``train.ensemble``: k weight-sharing members per network (TabM-mini, ``mtl.engine.ensemble``):
members' outputs while training, their mean prediction in evaluation, the mean of their losses,
TabM's adapter initialisation, and a penguins model that trains through the real stage, resumes,
predicts and exports (TorchScript, ONNX, int8) with the eager model's outputs; that model's
regression task also trains on ``data.tasks.<name>.loss: l1``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tabm
import torch
import yaml

from mtl import paths
from mtl.engine import ARCHITECTURES, archs, weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import FeatureEncoder, Preprocessor, TabularEncoder
from mtl.engine.ensemble import MemberInputs, MemberOutput
from mtl.engine.trainer import FitOptions, fit
from tests.helpers import REPO, train_project
from tests.test_archs import GROUPS, TASKS
from tests.test_engine import make_table
from tests.test_predict_export import assert_export_and_predict_match, mtl

K = 4
VARIANT = "hps-ew"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")


def setup(arch: str, k: int = K):
    from mtl.engine.encoders import TabularPreprocessor
    from mtl.engine.trainer import TaskData

    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    torch.manual_seed(0)
    model = archs.build(arch, lambda: TabularEncoder(prep.num_dim, prep.cardinalities), TASKS,
                        [16, 8], [8], 0.0, GROUPS if arch == "groups" else None, ensemble=k)
    return model, TaskData.from_table(table, prep, TASKS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_evaluation_returns_the_members_mean_prediction(arch):
    model, data = setup(arch)
    members = model.train()(data.inputs)
    mean = model.eval()(data.inputs)
    for t in TASKS:
        assert members[t.name].shape == (len(data), K, t.out_dim)
        assert mean[t.name].shape == (len(data), t.out_dim)
        if t.kind == "regression":
            torch.testing.assert_close(mean[t.name], members[t.name].mean(1))
        else:  # the members' mean probability, whatever the kind
            torch.testing.assert_close(t.decode(mean[t.name]), t.decode(members[t.name].flatten(0, 1))
                                       .unflatten(0, (-1, K)).mean(1))


def test_the_members_differ_and_share_all_but_the_adapter_and_output_layers():
    model, data = setup("hps")
    out = model.train()(data.inputs)["size"]
    assert not torch.allclose(out[:, 0], out[:, 1])
    own = {n for n, p in model.named_parameters() if p.shape[0] == K}
    assert own == {"encoder.adapter.weight"} | {f"heads.{t.name}.1.layer.{w}" for t in TASKS
                                                 for w in ("weight", "bias")}
    assert sum(isinstance(m, MemberOutput) for m in model.modules()) == len(TASKS)


def test_the_loss_is_the_mean_of_the_members_losses_over_labelled_rows():
    model, data = setup("hps")
    out = model.train()(data.inputs)
    for t in TASKS:
        y, mask = data.targets[t.name], data.masks[t.name].clone()
        mask[::3] = False  # missing labels
        each = torch.stack([t.loss(out[t.name][:, j], y, mask) for j in range(K)])
        torch.testing.assert_close(t.loss(out[t.name], y, mask), each.mean())


@pytest.mark.parametrize("arch,method", [("hps", "uw"), ("hps", "pcgrad"), ("hps", "gradnorm"),
                                         ("mmoe", "mgda"), ("stl", "ew")])
def test_an_ensemble_trains_with_weightings_and_gradient_methods(arch, method):
    """Loss- and gradient-level methods see the members' mean losses (and, at the
    representation level, k rows per input row); the validation losses fall."""
    model, data = setup(arch)
    logs = []
    fit(model, TASKS, weighting.build(method, [t.name for t in TASKS]), data, data,
        FitOptions(epochs=8, batch_size=16, lr=1e-2, seed=0), on_epoch=lambda e, log: logs.append(log))
    for t in TASKS:
        assert logs[-1][f"val/loss/{t.name}"] < 0.7 * logs[0][f"val/loss/{t.name}"], (t.name, method)


def test_one_member_builds_the_plain_network():
    plain, _ = setup("hps", k=1)
    assert not any(isinstance(m, (MemberInputs, MemberOutput)) for m in plain.modules())
    with pytest.raises(ValueError, match="ensemble: 0 members"):
        setup("hps", k=0)


@pytest.mark.parametrize("numeric,init", [("standard", {-1.0, 1.0}), ("ple", None)])
def test_the_adapter_starts_equal_within_each_feature(numeric, init):
    """TabM's chunks: one value per member and feature (random signs over plain numbers)."""
    table = make_table()
    features = {"x0": {"kind": "numeric", "n_missing": 0}, "x1": {"kind": "numeric", "n_missing": 0},
                "colour": {"kind": "categorical", "n_missing": 0}}
    prep = Preprocessor.fit(table, features, bins=4 if numeric == "ple" else None)
    encoder = MemberInputs(FeatureEncoder(prep, numeric=numeric), K)
    weight, start = encoder.adapter.weight.detach(), 0
    assert sum(encoder.encoder.chunks) == encoder.out_dim == weight.shape[1]
    for width in encoder.encoder.chunks:
        block = weight[:, start:start + width]
        assert torch.equal(block, block[:, :1].expand_as(block))
        start += width
    values = set(weight.unique().tolist())
    assert values <= init if init else len(values) > 2  # normal over embedded numbers


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Penguins with ple numbers, hps-ew trained for seed 0 as an ensemble of K members, body
    mass on absolute error."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["tasks"]["body_mass"]["loss"] = "l1"
    raw["seeds"] = [0]
    raw["train"] |= {"epochs": 4, "batch_size": 64, "patience": 0, "ensemble": K}
    raw["encoders"] |= {"numeric": "ple", "ple": {"bins": 8}}
    return train_project(tmp_path_factory.mktemp("ensemble"), raw, VARIANT)


def load_bundle(project: Path) -> Bundle:
    return Bundle.load(project / paths.model_dir(VARIANT, 0) / "model.pt")


def test_the_saved_model_is_the_ensemble(project):
    bundle = load_bundle(project)
    assert bundle.layers["ensemble"] == K
    assert isinstance(bundle.model.encoder, MemberInputs)
    assert isinstance(bundle.model.heads["species"][-1].layer, tabm.LinearEnsemble)
    assert [t.objective for t in bundle.tasks] == ["mse", "mse", "l1"]  # body mass: its own loss
    train_json = json.loads((project / paths.model_dir(VARIANT, 0) / "train.json").read_text())
    assert train_json["train"]["ensemble"] == K


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_and_predict_give_the_models_outputs(project, monkeypatch, fmt):
    assert_export_and_predict_match(project, monkeypatch, VARIANT, fmt, load_bundle(project))


def test_int8_exports_keep_the_metrics_close(project, monkeypatch):
    for fmt in ("onnx", "torchscript"):
        path = project / "out" / f"int8.{fmt}"
        result = mtl(project, monkeypatch, "export", "-v", VARIANT, "-f", fmt, "--int8", "-o", str(path))
        assert result.exit_code == 0, result.output
        change = json.loads(Path(f"{path}.metrics.json").read_text())["change"]
        assert all(abs(change[task]["accuracy"]) <= 0.05 for task in ("species", "sex")), change
