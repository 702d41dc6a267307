"""Δm on inputs with known answers, and the comparison outputs."""

import json

import pytest

from mtl import paths
from mtl.config import load_params
from mtl.io import write_json
from mtl.stages import compare
from tests.helpers import REPO

BASE = {"cls": {"accuracy": 0.8, "auroc": 0.9}, "reg": {"mae": 2.0, "r2": 0.5}}


@pytest.mark.parametrize("variant,expected", [
    (BASE, 0.0),
    # cls: +10% accuracy, 0% auroc -> +5%; reg: mae 2.0 -> 1.8 is 10% better -> +10%; mean 7.5%
    ({"cls": {"accuracy": 0.88, "auroc": 0.9}, "reg": {"mae": 1.8, "r2": 0.5}}, 7.5),
    # lower-is-better flips the sign: a higher mae is worse
    ({"cls": {"accuracy": 0.8, "auroc": 0.9}, "reg": {"mae": 2.2, "r2": 0.5}}, -5.0),
])
def test_delta_m_known_values(variant, expected):
    assert compare.delta_m(variant, BASE, exclude=["r2"]) == pytest.approx(expected)


def test_delta_m_counts_each_task_once_whatever_its_number_of_metrics():
    base = {"a": {"accuracy": 0.5, "f1_macro": 0.5, "auroc": 0.5}, "b": {"mae": 1.0}}
    variant = {"a": {"accuracy": 0.6, "f1_macro": 0.6, "auroc": 0.6}, "b": {"mae": 1.0}}
    assert compare.delta_m(variant, base) == pytest.approx(10.0)  # (20% + 0%) / 2 tasks


def test_delta_m_skips_excluded_metrics_and_zero_baselines():
    base = {"a": {"accuracy": 0.0, "r2": 0.1}, "b": {"mae": 1.0}}
    variant = {"a": {"accuracy": 0.5, "r2": 0.9}, "b": {"mae": 0.5}}
    assert compare.delta_m(variant, base, exclude=["r2"]) == pytest.approx(50.0)
    assert compare.delta_m(variant, base) == pytest.approx((800.0 + 50.0) / 2)


def test_compare_stage_writes_json_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    metrics = {"species": {"accuracy": 0.9, "f1_macro": 0.9, "auroc": 0.95, "n_test": 50},
               "sex": {"accuracy": 0.8, "f1_macro": 0.8, "auroc": 0.85, "n_test": 48},
               "body_mass": {"mae": 300.0, "rmse": 400.0, "r2": 0.7, "n_test": 50}}
    better = json.loads(json.dumps(metrics))
    better["sex"]["accuracy"] = 0.88
    for variant in params.variants:
        write_json(better if variant == "hps-ew" else metrics, paths.variant_metrics(variant))
    compare.run(params)
    result = json.loads(paths.COMPARE_JSON.read_text())
    assert set(result) == set(params.variants)
    assert result["stl"]["delta_m"] == 0.0
    assert result["hps-static"]["delta_m"] == 0.0
    assert result["hps-ew"]["delta_m"] == pytest.approx(100 / 3 * (0.1 / 3), abs=1e-4)
    assert "n_test" not in result["stl"]["tasks"]["species"]
    report = paths.REPORT.read_text()
    assert "| `hps-ew` | +1.11 |" in report
    assert "**0.8800**" in report  # the best value of its column is bold
