"""``encoders.numeric``: ``ple`` and ``periodic`` each train on penguins through the real stages,
predict, serve and export (TorchScript, ONNX, int8) with the eager model's outputs (``standard`` in
tests/test_predict_export.py); the ``ple`` bins come from the train split only and
the streamed (reservoir) bins match the in-memory ones."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from rtdl_num_embeddings import PeriodicEmbeddings, PiecewiseLinearEncoding

from mtl import paths
from mtl.engine import encoders
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor, quantile_bins
from tests.helpers import REPO, train_project
from tests.test_predict_export import assert_export_and_predict_match, mtl, new_rows
from tests.test_serve import predict_threads, predicted, request_rows, serving

VARIANT = "hps-ew"
MODULES = {"ple": PiecewiseLinearEncoding, "periodic": PeriodicEmbeddings}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")


@pytest.fixture(scope="module", params=list(MODULES))
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Penguins ingested, augmented, split, and hps-ew trained for seed 0 with one encoding."""
    root = tmp_path_factory.mktemp(request.param)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seeds"] = [0]
    raw["train"] |= {"epochs": 4, "batch_size": 64, "patience": 0}
    raw["encoders"] |= {"numeric": request.param, "ple": {"bins": 8}}
    return train_project(root, raw, VARIANT)


def load_bundle(project: Path) -> Bundle:
    return Bundle.load(project / paths.model_dir(VARIANT, 0) / "model.pt")


def test_the_model_reads_its_numeric_encoding(project):
    kind = project.name.rstrip("0123456789")
    bundle = load_bundle(project)
    assert type(bundle.model.encoder.tabular.numeric) is MODULES[kind]
    assert bool(bundle.preprocessor.tabular.bins) == (kind == "ple")
    assert bundle.encoder["numeric"] == kind


@pytest.mark.parametrize("project", ["ple"], indirect=True)
def test_ple_bins_come_from_the_train_split_only(project):
    p = load_bundle(project).preprocessor.tabular
    train_rows = pq.read_table(project / paths.split_path("train"))
    for name, mean, std, edges in zip(p.numeric, p.means, p.stds, p.bins):
        values = train_rows[name].to_numpy(zero_copy_only=False).astype("float64")
        values = values[np.isfinite(values)]
        np.testing.assert_allclose(edges, quantile_bins((values - mean) / std, 8), rtol=1e-12)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_and_predict_give_the_models_outputs(project, monkeypatch, fmt):
    assert_export_and_predict_match(project, monkeypatch, VARIANT, fmt, load_bundle(project))


def test_int8_onnx_export_keeps_the_metrics_close(project, monkeypatch):
    path = project / "out" / "int8.onnx"
    result = mtl(project, monkeypatch, "export", "-v", VARIANT, "-f", "onnx", "--int8", "-o", str(path))
    assert result.exit_code == 0, result.output
    change = json.loads(Path(f"{path}.metrics.json").read_text())["change"]
    assert all(abs(change[task]["accuracy"]) <= 0.05 for task in ("species", "sex")), change


def test_serve_answers_what_mtl_predict_writes(project, monkeypatch):
    rows = new_rows(project)  # an unseen island, a missing one, a missing number
    with serving(project, "--threads", predict_threads(project)) as (url, _):
        response = httpx.post(f"{url}/predict", json={"rows": request_rows(rows)})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == predicted(project, rows, monkeypatch)


FEATURES = {"x": {"kind": "numeric", "n_missing": 1}}


def column(values: np.ndarray) -> pa.Table:
    return pa.table({"x": pa.array(values, pa.float64())})


def test_streamed_bins_equal_the_in_memory_ones_below_the_sample_size():
    values = np.random.default_rng(0).lognormal(size=3000)
    values[5] = np.nan
    whole = Preprocessor.fit(column(values), FEATURES, bins=16).tabular
    streamed = Preprocessor.fit(column(values).to_batches(max_chunksize=97), FEATURES, bins=16).tabular
    np.testing.assert_allclose(streamed.bins, whole.bins, rtol=1e-12, atol=1e-12)
    finite = values[np.isfinite(values)]
    standardised = (finite - finite.mean()) / finite.std()
    expected = np.quantile(standardised, np.linspace(0, 1, 17))
    np.testing.assert_allclose(whole.bins[0], expected, rtol=1e-9, atol=1e-12)


def test_streamed_bins_from_a_reservoir_sample_stay_close_in_rank(monkeypatch):
    monkeypatch.setattr(encoders, "BIN_SAMPLE", 4000)
    values = np.random.default_rng(1).lognormal(size=200_000)
    p = Preprocessor.fit(column(values).to_batches(max_chunksize=5000), FEATURES, bins=16).tabular
    edges = np.array(p.bins[0]) * p.stds[0] + p.means[0]
    ranks = np.searchsorted(np.sort(values), edges[1:-1]) / len(values)
    np.testing.assert_allclose(ranks, np.linspace(0, 1, 17)[1:-1], atol=0.03)


@pytest.mark.parametrize("values,edges", [
    ([3.0] * 10, (-1.0, 1.0)),  # constant: nothing to bin
    ([np.nan] * 3, (-1.0, 1.0)),  # no value at all
    ([1.0, 3.0, np.nan], (-1.0, 1.0)),  # two values: one bin between them (standardised)
])
def test_columns_with_few_values_get_one_bin_and_encode(values, edges):
    p = Preprocessor.fit(column(np.array(values)), FEATURES, bins=8)
    assert p.tabular.bins == (edges,)
    encoder = encoders.FeatureEncoder(p, numeric="ple")
    assert torch.isfinite(encoder(p.transform(column(np.array(values))))).all()
