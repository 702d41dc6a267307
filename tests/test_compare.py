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


ALL_BUT_R2 = {"cls": ["accuracy", "auroc"], "reg": ["mae"]}


@pytest.mark.parametrize("variant,expected", [
    (BASE, 0.0),
    # cls: +10% accuracy, 0% auroc -> +5%; reg: mae 2.0 -> 1.8 is 10% better -> +10%; mean 7.5%
    ({"cls": {"accuracy": 0.88, "auroc": 0.9}, "reg": {"mae": 1.8, "r2": 0.5}}, 7.5),
    # lower-is-better flips the sign: a higher mae is worse
    ({"cls": {"accuracy": 0.8, "auroc": 0.9}, "reg": {"mae": 2.2, "r2": 0.5}}, -5.0),
])
def test_delta_m_known_values(variant, expected):
    assert compare.delta_m(variant, BASE, ALL_BUT_R2) == pytest.approx(expected)


def test_delta_m_counts_each_task_once_whatever_its_number_of_metrics():
    base = {"a": {"accuracy": 0.5, "f1_macro": 0.5, "auroc": 0.5}, "b": {"mae": 1.0}}
    variant = {"a": {"accuracy": 0.6, "f1_macro": 0.6, "auroc": 0.6}, "b": {"mae": 1.0}}
    used = {"a": ["accuracy", "f1_macro", "auroc"], "b": ["mae"]}
    assert compare.delta_m(variant, base, used) == pytest.approx(10.0)  # (20% + 0%) / 2 tasks


def test_delta_m_averages_only_the_metrics_used_and_skips_zero_baselines():
    base = {"a": {"accuracy": 0.0, "r2": 0.1}, "b": {"mae": 1.0}}
    variant = {"a": {"accuracy": 0.5, "r2": 0.9}, "b": {"mae": 0.5}}
    assert compare.delta_m(variant, base, {"a": ["accuracy"], "b": ["mae"]}) == pytest.approx(50.0)
    assert compare.delta_m(variant, base, {"a": ["accuracy", "r2"], "b": ["mae"]}) == pytest.approx(
        (800.0 + 50.0) / 2)
    assert compare.delta_m(variant, base, {"b": ["mae"]}) == pytest.approx(50.0)  # a: no metric


PENGUIN_METRICS = {"species": ["accuracy", "f1_macro", "auroc"], "sex": ["accuracy", "f1_macro", "auroc"],
                   "body_mass": ["mae", "rmse", "r2"]}


@pytest.mark.parametrize("overrides,expected", [
    ([], {"species": ["auroc"], "sex": ["auroc"], "body_mass": ["mae"]}),  # the default: primary
    (["compare.delta_m=all"], {"species": ["accuracy", "f1_macro", "auroc"],
                               "sex": ["accuracy", "f1_macro", "auroc"], "body_mass": ["mae", "rmse"]}),
    (["compare.delta_m=all", "compare.exclude=[r2, f1_macro]"],
     {"species": ["accuracy", "auroc"], "sex": ["accuracy", "auroc"], "body_mass": ["mae", "rmse"]}),
    (["compare.exclude=[mae]"], {"species": ["auroc"], "sex": ["auroc"], "body_mass": []}),
])
def test_delta_m_metrics_primary_per_task_kind_or_all_less_excluded(overrides, expected):
    params = load_params(REPO / "params.yaml", overrides)
    assert compare.delta_m_metrics(params, PENGUIN_METRICS) == expected


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
    params = load_params(REPO / "params.yaml", ["compare.reference=none", "seeds=[0, 1, 2]", "compare.delta_m=all"])
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


def test_summary_holds_delta_m_and_the_metrics_it_counts(tmp_path, monkeypatch):
    """metrics/summary.json, the DVC metrics file: per variant Δm, its p-value and the mean of
    each metric Δm counts; nothing per seed."""
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["compare.reference=none", "seeds=[0, 1, 2]"])
    wobble = {0: -0.01, 1: 0.0, 2: 0.01}
    write_metrics(params, lambda v, s, m: m["sex"].update(auroc=m["sex"]["auroc"] + wobble[s]))
    compare.run(params)
    result, summary = (json.loads(p.read_text()) for p in (paths.COMPARE_JSON, paths.SUMMARY_JSON))
    assert summary["hps-ew"] == {
        "delta_m": result["hps-ew"]["delta_m"]["mean"], "p": result["hps-ew"]["delta_m"]["p"],
        "species": {"auroc": result["hps-ew"]["tasks"]["species"]["auroc"]["mean"]},
        "sex": {"auroc": result["hps-ew"]["tasks"]["sex"]["auroc"]["mean"]},
        "body_mass": {"mae": result["hps-ew"]["tasks"]["body_mass"]["mae"]["mean"]}}
    assert set(summary) == set(params.variants)


def test_compare_with_one_seed_makes_no_noise_claim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["compare.reference=none", "seeds=[0]"])
    write_metrics(params, lambda v, s, m: None)
    compare.run(params)
    result = json.loads(paths.COMPARE_JSON.read_text())
    assert result["hps-ew"]["delta_m"] == {"mean": 0.0, "std": None, "p": None, "within_noise": None,
                                           "per_seed": [0.0]}
    assert "nothing can be said about noise" in paths.REPORT.read_text()


def test_compare_names_the_missing_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["compare.reference=none", "seeds=[0, 1]"])
    write_metrics(params, lambda v, s, m: None)
    paths.variant_metrics("hps-ew", 1).unlink()
    with pytest.raises(UserError, match=r"hps-ew/seed-1.json: file not found .*--seed 1"):
        compare.run(params)


def test_delta_m_on_a_rare_class_counts_auroc_not_the_threshold_metrics(tmp_path, monkeypatch):
    """A binary task with few positives: hps-ew ranks as well as stl (AUROC within noise) but
    predicts fewer positives at 0.5, so accuracy and F1 fall. By default (primary) Δm counts AUROC
    and says 'within noise'; with ``compare.delta_m: all`` the threshold metrics make it
    significantly worse. compare.md names the metrics Δm counts."""
    monkeypatch.chdir(tmp_path)
    wobble = {0: -0.001, 1: 0.0, 2: 0.001}

    def change(variant, seed, metrics):
        metrics["sex"] = {"accuracy": 0.94, "f1_macro": 0.70, "auroc": 0.85 + wobble[seed]}
        if variant == "hps-ew":
            metrics["sex"] |= {"accuracy": 0.93 + wobble[seed], "f1_macro": 0.55 + wobble[seed],
                               "auroc": 0.85 - wobble[seed]}

    results = {}
    for mode in ("primary", "all"):
        params = load_params(REPO / "params.yaml", ["compare.reference=none", "seeds=[0, 1, 2]", f"compare.delta_m={mode}"])
        write_metrics(params, change)
        compare.run(params)
        results[mode] = json.loads(paths.COMPARE_JSON.read_text())["hps-ew"]["delta_m"]
        report = paths.REPORT.read_text()
        if mode == "primary":
            assert "Δm counts species auroc, sex auroc, body_mass mae (`compare.delta_m: primary`" in report
        else:
            assert ("Δm counts species accuracy and f1_macro and auroc, sex accuracy and f1_macro "
                    "and auroc, body_mass mae and rmse (`compare.delta_m: all`") in report
    assert results["primary"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert results["primary"]["within_noise"] is True
    # sex: accuracy -1.06%, f1 -21.4%, auroc 0% -> -7.5% over its 3 metrics, / 3 tasks = -2.5%
    assert results["all"]["mean"] == pytest.approx(100 * (-0.01 / 0.94 - 0.15 / 0.70) / 3 / 3, abs=1e-3)
    assert results["all"]["within_noise"] is False
