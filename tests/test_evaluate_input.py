"""``mtl evaluate --input FILE --output OUT.json``: a labelled file scored with exactly
``evaluate``'s metrics, for every variant and seed at once or for one of each. A small project
(two variants, two seeds) is trained once; its bad inputs are cases of
``tests/test_bad_inputs.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtl import paths
from mtl.config import load_params
from mtl.engine.checkpoint import Bundle
from mtl.engine.tasks import Task
from mtl.stages import augment, evaluate, ingest, split, train
from mtl.stages.trained import as_labelled
from tests.test_bad_inputs import PARAMS, invoke, make_project, rows, to_csv

VARIANTS, SEEDS = ("stl", "hps"), (0, 1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage up to evaluate run, for variants stl and hps on seeds 0 and 1."""
    root = make_project(tmp_path_factory.mktemp("project"), seeds=list(SEEDS),
                        variants={v: {"arch": v} for v in VARIANTS}, compare={"baseline": "stl"},
                        train=PARAMS["train"] | {"affinity_batches": 0})
    with contextlib.chdir(root):
        params = load_params()
        for stage in (ingest, augment, split):
            stage.run(params)
        for variant in VARIANTS:
            for seed in SEEDS:
                train.run(params, variant, seed, resume=False)
                evaluate.run(params, variant, seed)
    return root


def score(root: Path, *args: str) -> dict:
    result = invoke(root, ["evaluate", *args, "--output", "out/scores.json"])
    assert result.returncode == 0, result.stderr
    return json.loads((root / "out/scores.json").read_text())


def evaluated(root: Path, variant: str, seed: int) -> dict:
    return json.loads((root / paths.variant_metrics(variant, seed)).read_text())


def test_the_test_split_scores_exactly_as_evaluate_for_every_variant_and_seed(project):
    scores = score(project, "--input", str(paths.split_path("test")))
    assert list(scores) == list(VARIANTS)
    for variant in VARIANTS:
        assert list(scores[variant]) == [str(s) for s in SEEDS]
        for seed in SEEDS:
            assert scores[variant][str(seed)] == evaluated(project, variant, seed)
    assert scores["hps"]["0"] != scores["hps"]["1"]  # each seed's own model


def test_one_variant_and_one_seed(project):
    scores = score(project, "--input", str(paths.split_path("test")), "--variant", "hps", "--seed", "1")
    assert scores == {"hps": {"1": evaluated(project, "hps", 1)}}


def test_a_raw_csv_goes_through_the_models_preprocessing(project):
    """The test rows as the user's raw CSV holds them (integers where ingest wrote floats, no
    pipeline columns) score as the test split does."""
    test_ids = set(pq.read_table(project / paths.split_path("test"))["_id"].to_pylist())
    (project / "held.csv").write_text(to_csv([r for r in rows() if r["id"] in test_ids]))
    assert pacsv.read_csv(project / "held.csv").schema.field("b").type == pa.int64()
    scores = score(project, "--input", "held.csv", "--variant", "stl")
    assert scores == {"stl": {str(s): evaluated(project, "stl", s) for s in SEEDS}}


def test_targets_are_converted_as_ingest_converts_them(project):
    """Class labels as text (a float 1.0 is the class '1', NaN a missing label), regression values
    as floats, multilabel 0/1 or true/false as booleans; features stay as they are."""
    bundle = Bundle.load(project / paths.model_dir("hps", 0) / "model.pt")
    tasks = [Task("flag", "binary", "f", classes=("0", "1")), Task("score", "regression", "r"),
             Task("tags", "multilabel", ("t1", "t2"), classes=("t1", "t2"))]
    table = pa.table({"a": [1.5, 2.0, 3.0], "b": [1, 2, 3], "cat": ["p", "q", None],
                      "f": [1.0, float("nan"), 0.0], "r": [3, None, 5],
                      "t1": ["true", "0", None], "t2": [1, 0, 1]})
    out = as_labelled(table, Path("held.parquet"), dataclasses.replace(bundle, tasks=tasks))
    assert out["f"].to_pylist() == ["1", None, "0"]
    assert out["r"].type == pa.float64() and out["r"].to_pylist() == [3.0, None, 5.0]
    assert out["t1"].to_pylist() == [True, False, None] and out["t2"].to_pylist() == [True, False, True]
    assert out.select(["a", "b", "cat"]) == table.select(["a", "b", "cat"])
