"""The gradient-boosting reference (``mtl reference``): real LightGBM and HistGradientBoosting on
the default penguins data and on a small multilabel table, checked against a direct fit of the
same library (pandas categoricals, scikit-learn's metrics); the skip note; the reference's row in
compare, the report and the verdict."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import mean_absolute_error, roc_auc_score
from threadpoolctl import threadpool_limits

from mtl import paths
from mtl.config import load_params
from mtl.io import write_json
from mtl.stages import augment, compare, ingest, reference, split
from mtl.stages.verdict import verdict
from tests.helpers import REPO
from tests.test_bad_inputs import class_only_in_test, make_project
from tests.test_compare import write_metrics

VARIANTS = {"stl": {"arch": "stl"}, "hps": {"arch": "hps"}}
PENGUIN_TASKS = {"species": ("species", "multiclass"), "sex": ("sex", "binary"),
                 "body_mass": ("body_mass_g", "regression")}


def prepare(root: Path, overrides: list[str] | None = None) -> Path:
    with contextlib.chdir(root):
        params = load_params(Path("params.yaml"), overrides)
        for stage in (ingest, augment, split):
            stage.run(params)
    return root


@pytest.fixture(scope="module")
def penguins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default project's data stages run (penguins, one augmented copy per train row)."""
    root = tmp_path_factory.mktemp("penguins")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return prepare(root)


def run_reference(root: Path, overrides: list[str] | None = None) -> dict:
    with contextlib.chdir(root):
        reference.run(load_params(Path("params.yaml"), overrides))
    return json.loads((root / paths.REFERENCE_JSON).read_text())


def splits(root: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The three splits as pandas frames, categorical features as pandas categories of the train
    split's values (the libraries' documented way), and the feature names."""
    schema = json.loads((root / paths.SCHEMA).read_text())
    features = list(schema["features"])
    frames = {s: pd.read_parquet(root / paths.split_path(s)) for s in paths.SPLITS}
    for name in features:
        if schema["features"][name]["kind"] == "categorical":
            categories = sorted(frames["train"][name].dropna().unique())
            for frame in frames.values():
                frame[name] = pd.Categorical(frame[name], categories=categories)
    return frames, features


def labelled(frames: dict, features: list[str], target: str, kind: str) -> dict:
    """Per split the features and the target of the rows where it is present, classes as
    indices of the sorted labels."""
    classes = sorted(frames["train"][target].dropna().unique())
    out = {}
    for split_name, frame in frames.items():
        rows = frame[frame[target].notna()]
        y = rows[target] if kind == "regression" else rows[target].map({c: i for i, c in enumerate(classes)})
        out[split_name] = (rows[features], np.asarray(y, dtype=float))
    return out


def direct_lightgbm(data: dict, kind: str, classes: int) -> np.ndarray:
    config = {"objective": kind, "seed": 0, "deterministic": True, "force_row_wise": True,
              "num_threads": 1, "verbosity": -1} | ({"num_class": classes} if kind == "multiclass" else {})
    train = lgb.Dataset(*data["train"])
    booster = lgb.train(config, train, 2000, valid_sets=[lgb.Dataset(*data["val"], reference=train)],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    return booster.predict(data["test"][0], num_iteration=booster.best_iteration)


def direct_hgb(data: dict, kind: str, classes: int) -> np.ndarray:
    options = {"max_iter": 2000, "early_stopping": True, "n_iter_no_change": 50, "scoring": "loss",
               "categorical_features": "from_dtype", "random_state": 0}
    regression = kind.startswith("regression")
    model = (HistGradientBoostingRegressor(
        loss="absolute_error" if kind == "regression_l1" else "squared_error", **options)
        if regression else HistGradientBoostingClassifier(**options))
    with threadpool_limits(1):  # OpenMP threads on a busy machine: 60x slower
        model.fit(*data["train"], X_val=data["val"][0], y_val=data["val"][1])
    if regression:
        return model.predict(data["test"][0])
    prob = model.predict_proba(data["test"][0])
    return prob[:, 1] if kind == "binary" else prob


def score(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if kind.startswith("regression"):
        return {"mae": mean_absolute_error(y, pred)}
    return {"auroc": roc_auc_score(y, pred, multi_class="ovr") if kind == "multiclass"
            else roc_auc_score(y, pred)}


@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("method,direct", [("lightgbm", direct_lightgbm), ("hgb", direct_hgb)])
def test_every_task_scores_as_a_direct_fit_of_the_library(penguins, method, direct, loss):
    """Each task's AUROC / MAE equals that of the library fitted directly on the labelled train
    rows (augmented copies included), early-stopped on the val split, with its own categorical
    handling, scored by scikit-learn on the labelled test rows; a regression task minimises its
    own loss (``data.tasks.<name>.loss``: squared or absolute error); the same params give the
    same file twice."""
    overrides = [f"compare.reference={method}", f"data.tasks.body_mass.loss={loss}"]
    metrics = run_reference(penguins, overrides)
    assert run_reference(penguins, overrides) == metrics  # deterministic
    frames, features = splits(penguins)
    assert frames["train"][paths.AUGMENTED_FLAG].any()  # the copies are trained on
    assert set(metrics) == set(PENGUIN_TASKS)
    assert metrics["sex"]["n_test"] < len(frames["test"])  # 11 penguins have no sex
    for task, (target, kind) in PENGUIN_TASKS.items():
        data = labelled(frames, features, target, kind)
        kind = "regression_l1" if kind == "regression" and loss == "l1" else kind
        classes = frames["train"][target].nunique()
        expected = score(kind, data["test"][1], direct(data, kind, classes))
        assert metrics[task]["n_test"] == len(data["test"][1])
        for name, value in expected.items():
            assert metrics[task][name] == pytest.approx(value, rel=1e-5), (task, name)


def test_a_multilabel_task_trains_one_model_per_label_on_its_labelled_rows(tmp_path):
    """Two labels, each missing on its own rows: the task's AUROC is the mean over the labels of
    a direct LightGBM fit per label, each on the rows where that label is present."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(300):
        a, b, cat = rng.normal(), rng.normal(), "pqrs"[i % 4]
        one = int(a + rng.normal(0, 0.3) > 0) if i % 5 else ""
        two = int((b > 0) != (rng.random() < 0.1)) if i % 7 else ""
        records.append({"id": f"r{i}", "a": round(a, 4), "b": round(b, 4), "cat": cat,
                        "one": one, "two": two, "r": round(2 * a + rng.normal(), 4)})
    data = {"source": "data/raw/table.csv", "id_column": "id",
            "tasks": {"flags": {"kind": "multilabel", "target": ["one", "two"]},
                      "score": {"kind": "regression", "target": "r"}}}
    root = prepare(make_project(tmp_path, records, data=data, augment={"copies": 0}, variants=VARIANTS))
    metrics = run_reference(root)
    frames, features = splits(root)
    aurocs = []
    for label in ("one", "two"):
        rows = labelled(frames, features, label, "binary")
        aurocs.append(roc_auc_score(rows["test"][1], direct_lightgbm(rows, "binary", 2)))
    assert metrics["flags"]["auroc"] == pytest.approx(np.mean(aurocs), rel=1e-5)
    assert 0.8 < metrics["flags"]["auroc"] < 1.0
    assert metrics["flags"]["n_test"] == int(frames["test"][["one", "two"]].notna().any(axis=1).sum())


@pytest.mark.parametrize("method", ["lightgbm", "hgb"])
def test_a_class_no_train_row_has_gets_probability_zero_and_is_scored(tmp_path, method):
    """Class 'w' of task label is in two test rows only: both libraries score it (LightGBM
    with its own output for the class, HistGradientBoosting with -1e9), as evaluate would."""
    root = prepare(make_project(tmp_path, class_only_in_test(), variants=VARIANTS))
    metrics = run_reference(root, [f"compare.reference={method}"])
    frames, _ = splits(root)
    assert metrics["label"]["n_test"] == len(frames["test"]) and (frames["test"]["y"] == "w").sum() == 2
    assert 0.0 < metrics["label"]["auroc"] < 1.0 and metrics["label"]["accuracy"] < 1.0


def test_a_text_column_skips_the_reference_with_a_note(tmp_path):
    records = [{"id": f"r{i}", "a": i % 10, "words": f"word{i % 3} other", "y": "xy"[i % 2]}
               for i in range(60)]
    data = {"source": "data/raw/table.csv", "id_column": "id", "text": ["words"],
            "tasks": {"label": {"kind": "binary", "target": "y"}}}
    root = prepare(make_project(tmp_path, records, data=data, variants=VARIANTS))
    note = ("reference skipped: text column 'words' cannot be used by LightGBM, which takes "
            "numeric and categorical columns only")
    assert run_reference(root) == {"_skipped": note}
    assert run_reference(root, ["compare.reference=none"]) == {
        "_skipped": "reference skipped: compare.reference is none"}


def compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: dict | None,
             overrides: list[str] = ()) -> tuple[dict, dict, str]:
    """compare run on planted metrics (hps-ew: sex AUROC +0.05; hps-static: -0.05) and the
    planted reference file ``written``: compare.json, summary.json and compare.md."""
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", ["seeds=[0, 1, 2]", *overrides])
    wobble = {0: -0.01, 1: 0.0, 2: 0.01}
    shift = {"stl": 0.0, "hps-ew": 0.05, "hps-static": -0.05}
    write_metrics(params, lambda v, s, m: m["sex"].update(auroc=m["sex"]["auroc"] + shift[v] + wobble[s]))
    if written is not None:
        write_json(written, paths.REFERENCE_JSON)
    compare.run(params)
    return (json.loads(paths.COMPARE_JSON.read_text()), json.loads(paths.SUMMARY_JSON.read_text()),
            paths.REPORT.read_text())


TREES = {"species": {"accuracy": 0.95, "f1_macro": 0.95, "auroc": 0.95, "n_test": 50},
         "sex": {"accuracy": 0.9, "f1_macro": 0.9, "auroc": 0.85 * 1.03, "n_test": 48},
         "body_mass": {"mae": 300.0, "rmse": 400.0, "r2": 0.7, "n_test": 50}}


def test_compare_shows_the_reference_as_its_own_row(tmp_path, monkeypatch):
    """The trees' row: Δm against the baseline's mean (sex AUROC +3 % -> +1 %), no spread, not
    bold though better than the baseline, not the baseline; a row of summary.json."""
    table, summary, report = compared(tmp_path, monkeypatch, TREES)
    ref = table["_reference"]
    assert ref["method"] == "lightgbm"
    assert ref["delta_m"] == {"mean": pytest.approx(1.0, abs=1e-3), "std": None, "p": None,
                              "within_noise": None}
    assert ref["tasks"]["sex"]["auroc"]["mean"] == pytest.approx(0.8755)
    assert table["hps-ew"]["delta_m"]["mean"] == pytest.approx(100 * 0.05 / 0.85 / 3, abs=1e-3)
    assert summary["_reference"]["delta_m"] == ref["delta_m"]["mean"]
    row = next(line for line in report.splitlines() if line.startswith("| LightGBM (reference)"))
    assert row == ("| LightGBM (reference) | +1.00 | 0.9500 | 0.9500 | 0.9500 | 0.9000 | 0.9000 | "
                   "0.8755 | 300.0 | 400.0 | 0.7000 |")
    assert "**" not in row and "≈" not in row and "±" not in row
    assert "never the baseline" in report


def test_compare_shows_the_skip_note_and_nothing_with_none(tmp_path, monkeypatch):
    note = "reference skipped: text column 'words' cannot be used by LightGBM, which takes numeric"
    table, summary, report = compared(tmp_path, monkeypatch, {"_skipped": note})
    assert table["_reference"] == {"method": "lightgbm", "skipped": note}
    assert "_reference" not in summary
    assert report.endswith("\n\nReference skipped: text column 'words' cannot be used by LightGBM, "
                           "which takes numeric.\n")
    table, summary, report = compared(tmp_path, monkeypatch, None, ["compare.reference=none"])
    assert "_reference" not in table and "reference" not in report


@pytest.mark.parametrize("sex_auroc,where", [
    (0.85 * 1.15, "better than every network: on this data the networks have yet to match the trees"),
    (0.85 * 1.03, "better than `stl`, `hps-static`, worse than `hps-ew`"),
    (0.85 * 0.8, "worse than every network"),
])
def test_the_verdict_says_where_the_reference_stands_without_ranking_it(tmp_path, monkeypatch,
                                                                         sex_auroc, where):
    trees = json.loads(json.dumps(TREES))
    trees["sex"]["auroc"] = sex_auroc
    table, _, _ = compared(tmp_path, monkeypatch, trees)
    ref = table.pop("_reference")
    lines = verdict(table, "stl", {}, ref=ref)
    assert lines[0] == verdict(table, "stl", {})[0]  # the verdict on the networks is unchanged
    assert lines[1] == (f"LightGBM reference (one tree model per task, one seed, not a variant): "
                        f"Δm {ref['delta_m']['mean']:+.2f} %, {where}.")
