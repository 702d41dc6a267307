"""Δm on inputs with known answers, and the comparison outputs."""

import json

import pytest

from mtl import paths
from mtl.config import load_params
from mtl.errors import UserError
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


@pytest.mark.parametrize("a,b,expected", [
    # Welch's t-test by hand: means 2 and 5, variances 1 and 1, n = 3 each: t = -3/sqrt(2/3)
    # = -3.674, df = 4; two-sided p = 0.02131 (t-distribution table, 4 degrees of freedom).
    ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 0.02131),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1.0),  # the same sample
    ([2.0, 2.0], [2.0, 2.0], 1.0),  # constant and equal: no difference
    ([2.0, 2.0], [3.0, 3.0], 0.0),  # constant and different: certainly different
    ([1.0], [1.0, 2.0], None),  # one seed: no test
])
def test_welch_p_known_values(a, b, expected):
    p = compare.welch_p(a, b)
    assert p == (None if expected is None else pytest.approx(expected, abs=1e-4))


def test_summary_marks_noise_with_alpha():
    close = compare.summarise([0.80, 0.82, 0.81], [0.79, 0.83, 0.80], alpha=0.05)
    assert close["within_noise"] is True and close["mean"] == pytest.approx(0.81)
    assert close["std"] == pytest.approx(0.01)
    far = compare.summarise([0.90, 0.91, 0.92], [0.79, 0.80, 0.81], alpha=0.05)
    assert far["within_noise"] is False and far["p"] < 0.001
    assert compare.summarise([0.9], [0.8], alpha=0.05) == {"mean": 0.9, "std": None, "p": None,
                                                           "within_noise": None}


METRICS = {"species": {"accuracy": 0.9, "f1_macro": 0.9, "auroc": 0.95, "n_test": 50},
           "sex": {"accuracy": 0.8, "f1_macro": 0.8, "auroc": 0.85, "n_test": 48},
           "body_mass": {"mae": 300.0, "rmse": 400.0, "r2": 0.7, "n_test": 50}}


def write_metrics(params, change) -> None:
    """Metrics of every variant and seed: METRICS, with ``change(variant, seed, metrics)`` applied."""
    for variant in params.variants:
        for seed in params.seeds:
            metrics = json.loads(json.dumps(METRICS))
            change(variant, seed, metrics)
            write_json(metrics, paths.variant_metrics(variant, seed))


def test_compare_stage_writes_json_and_report_over_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["seeds=[0, 1, 2]"])
    wobble = {0: -0.01, 1: 0.0, 2: 0.01}  # seed noise on sex accuracy, the same for every variant

    def change(variant, seed, metrics):
        metrics["sex"]["accuracy"] += wobble[seed] + (0.08 if variant == "hps-ew" else 0.0)
        metrics["species"]["accuracy"] += wobble[seed] / 10 if variant == "hps-static" else 0.0

    write_metrics(params, change)
    compare.run(params)
    result = json.loads(paths.COMPARE_JSON.read_text())
    assert set(result) == set(params.variants)
    assert result["stl"]["delta_m"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # hps-ew: sex accuracy +10% (0.88 against 0.8) -> (10% / 3 metrics) / 3 tasks = +1.11%
    ew = result["hps-ew"]
    assert ew["delta_m"]["mean"] == pytest.approx(100 / 3 * (0.1 / 3), abs=1e-4)
    assert ew["tasks"]["sex"]["accuracy"]["mean"] == pytest.approx(0.88)
    assert ew["tasks"]["sex"]["accuracy"]["std"] == pytest.approx(0.01)
    assert ew["tasks"]["sex"]["accuracy"]["within_noise"] is False
    assert ew["tasks"]["species"]["accuracy"]["within_noise"] is True  # identical values
    static = result["hps-static"]["tasks"]["species"]["accuracy"]
    assert static["within_noise"] is True and static["std"] == pytest.approx(0.001)
    assert "n_test" not in result["stl"]["tasks"]["species"]
    report = paths.REPORT.read_text()
    assert "| `hps-ew` | +1.11 ± " in report
    assert "**0.8800 ± 0.0100**" in report  # the best mean of its column is bold
    assert "| **0.9000 ± 0.0010** ≈ |" in report  # within noise of the baseline
    assert "Welch" in report


def test_compare_with_one_seed_makes_no_noise_claim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["seeds=[0]"])
    write_metrics(params, lambda v, s, m: None)
    compare.run(params)
    result = json.loads(paths.COMPARE_JSON.read_text())
    assert result["hps-ew"]["delta_m"] == {"mean": 0.0, "std": None, "p": None, "within_noise": None,
                                           "per_seed": [0.0]}
    assert "nothing can be said about noise" in paths.REPORT.read_text()


def test_compare_names_the_missing_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["seeds=[0, 1]"])
    write_metrics(params, lambda v, s, m: None)
    paths.variant_metrics("hps-ew", 1).unlink()
    with pytest.raises(UserError, match=r"hps-ew/seed-1.json: file not found .*--seed 1"):
        compare.run(params)
