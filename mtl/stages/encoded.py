"""The train and val splits encoded once for every training run on them.

The preprocessing (train-split statistics of the numeric columns, categorical vocabularies,
regression targets' mean and std) is fitted in one streaming pass over the train split; both
splits are then encoded chunk by chunk into memory-mapped arrays (``mtl.engine.store``) under
``.mtl/encoded/<hash>/``, the hash being that of everything the encoding depends on: the splits,
the schema, the task and encoder params and the engine's code. Every variant and seed reads the
same arrays, so memory stays bounded by a chunk while encoding and the OS page cache, not each
process, holds the rows while training. Concurrent runs wait for the one that encodes (a lock);
a new hash replaces the older encodings."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from mtl import paths
from mtl.config import Params
from mtl.engine.encoders import Moments, Preprocessor
from mtl.engine.store import encode_split, open_split
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData
from mtl.errors import UserError
from mtl.io import mismatch, read_json, scan_table, temp_dir, writing
from mtl.stages.common import check_types, require_columns

ENGINE_CODE = Path(__file__).resolve().parents[1] / "engine"
PREPROCESSING = "preprocessing.json"
FEATURE_KINDS = ("numeric", "categorical", "text", "image")


def file_digest(path: Path) -> bytes:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


def preprocessing(params: Params) -> dict:
    """The ``encoders`` settings that ``Preprocessor.fit`` reads (``finetune.max_length`` when
    fine-tuning: token ids are stored; the ``ple`` bins only where ``numeric`` is ``ple``); the
    rest (the widths ``encoders.dim``, ``hashing.dim`` and ``image_channels``, ``periodic``, the
    other ``finetune`` settings) shape only the model."""
    enc = params.encoders
    tokens = {"max_length": enc.finetune.max_length} if enc.finetune.layers else {}
    return {"text": enc.text, "hashing": enc.hashing.model_dump(exclude={"dim"}),
            "bins": enc.ple.bins if enc.numeric == "ple" else None} | tokens


def data_fingerprint(params: Params) -> str:
    """SHA-256 of what the encoded splits depend on (not the model's widths: a change of those
    trains again on the same encoded splits)."""
    digest = hashlib.sha256()
    config = {"encoders": preprocessing(params),
              "tasks": {k: v.model_dump() for k, v in params.data.tasks.items()}}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in [paths.split_path("train"), paths.split_path("val"), paths.SCHEMA, Path(__file__),
                 *sorted(ENGINE_CODE.glob("*.py"))]:
        digest.update(file_digest(path))
    return digest.hexdigest()


def load(params: Params, schema: dict, data_key: str) -> tuple[Preprocessor, list[Task], TaskData, TaskData]:
    """The fitted preprocessing, the tasks, and the train and val splits, memory-mapped;
    encoded first unless an earlier run encoded the same inputs (``data_key``:
    ``data_fingerprint(params)``)."""
    key = data_key[:16]
    root = paths.ENCODED_DIR / key
    with writing(paths.ENCODED_DIR):
        paths.ENCODED_DIR.mkdir(parents=True, exist_ok=True)
    with open(paths.ENCODED_DIR / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for stale in paths.ENCODED_DIR.glob(".*.tmp"):  # what killed runs left half-encoded
            shutil.rmtree(stale, ignore_errors=True)
        if not (root / PREPROCESSING).is_file():
            with writing(root):
                _encode(*_fit(params, schema), root)
            for other in paths.ENCODED_DIR.iterdir():
                if other.is_dir() and other.name != key:
                    shutil.rmtree(other, ignore_errors=True)
        try:
            state = read_json(root / PREPROCESSING)
            return (Preprocessor.from_state(state["preprocessor"]),
                    [Task.from_state(t) for t in state["tasks"]],
                    open_split(root / "train"), open_split(root / "val"))
        except (UserError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{root}: damaged encoded splits ({str(exc)[:200]}); delete the folder "
                            "to encode them again") from None


def _fit(params: Params, schema: dict) -> tuple[Preprocessor, list[Task]]:
    """The preprocessing and the tasks, fitted on the train split in one pass."""
    train = scan_table(paths.split_path("train"))
    targets = {spec["target"]: Moments() for spec in schema["tasks"].values()
               if spec["kind"] == "regression"}

    def chunks():
        for batch in train.batches():
            for column, moments in targets.items():
                moments.update(batch[column].to_numpy(zero_copy_only=False).astype("float64"))
            yield batch

    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        preprocessor = Preprocessor.fit(chunks(), schema["features"], **preprocessing(params))
    p = preprocessor.tabular
    moments = [*zip(p.numeric, p.means, p.stds), *((c, m.mean, m.std) for c, m in targets.items())]
    for column, mean, std in moments:
        if not (math.isfinite(mean) and math.isfinite(std)):
            raise UserError(f"{paths.split_path('train')}: column '{column}' holds values so large "
                            "that their mean or standard deviation overflows; rescale the column")
    return preprocessor, [task_from_schema(name, schema, targets, spec.loss)
                          for name, spec in params.data.tasks.items()]


def _encode(preprocessor: Preprocessor, tasks: list[Task], root: Path) -> None:
    """Encode the train and val splits into the folder ``root``, which appears whole or not at
    all (a killed run leaves a ``.<key>.*.tmp`` folder, which the next one removes)."""
    work = temp_dir(root.parent, root.name)
    try:
        for split in ("train", "val"):
            encode_split(scan_table(paths.split_path(split)).batches(), preprocessor, tasks, work / split)
        (work / PREPROCESSING).write_text(json.dumps({"preprocessor": preprocessor.state(),
                                                      "tasks": [t.state() for t in tasks]}),
                                          encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)  # what an older version left half done
        os.replace(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_inputs(params: Params, splits: tuple[str, ...]) -> dict:
    """schema.json, checked against the params and the ``splits`` (their columns and types)."""
    schema = read_json(paths.SCHEMA)
    check_schema(schema, params)
    kinds = {name: feature["kind"] for name, feature in schema["features"].items()}
    kinds |= {column: task.kind for task in params.data.tasks.values() for column in task.columns}
    for split in splits:
        columns = scan_table(paths.split_path(split)).schema
        require_columns(columns, paths.split_path(split), params)
        missing = [f for f in schema["features"] if f not in columns.names]
        if missing:
            raise UserError(f"{paths.split_path(split)}: feature column '{missing[0]}' from "
                            f"{paths.SCHEMA} is missing (re-run the pipeline from ingest)")
        check_types(columns, paths.split_path(split), kinds)
    return schema


def check_schema(schema: object, params: Params) -> None:
    """Fail unless schema.json has the structure ingest writes and records each task as the
    params declare it (say, a task's kind changed without re-running ingest)."""
    if problem := _schema_problem(schema, params):
        raise UserError(f"{paths.SCHEMA}: {problem} (re-run the pipeline from ingest)")


def _schema_problem(schema: object, params: Params) -> str | None:
    if problem := mismatch(schema, {"features": {str: {"kind": str, "n_missing": int}}, "tasks": dict}):
        return problem
    for name, feature in schema["features"].items():
        if feature["kind"] not in FEATURE_KINDS:
            return f"field 'features.{name}.kind': unknown kind {feature['kind']!r}"
        if feature["kind"] == "image" and (problem := mismatch(feature, {"shape": [int]}, f"features.{name}")):
            return problem
    labels = {"binary": "classes", "multiclass": "classes", "multilabel": "labels"}
    for name, task in params.data.tasks.items():
        if name not in schema["tasks"]:
            return f"field 'tasks.{name}' is missing"
        spec = schema["tasks"][name]
        listed = {labels[task.kind]: [str]} if task.kind in labels else {}
        if problem := mismatch(spec, {"kind": str, "target": (str, list)} | listed, f"tasks.{name}"):
            return problem
        if (spec["kind"], spec["target"]) != (task.kind, task.target):
            return (f"task '{name}' is {spec['kind']} of {spec['target']!r} there, "
                    f"{task.kind} of {task.target!r} in the params")
    return None


def task_from_schema(name: str, schema: dict, targets: dict[str, Moments],
                     loss: str | None = None) -> Task:
    """The engine's task; a regression target is standardised with train-split statistics
    (``targets``: the moments of each regression target column) and trains on ``loss``
    (``data.tasks.<name>.loss``, default mse)."""
    spec = schema["tasks"][name]
    if spec["kind"] == "multilabel":
        return Task(name, "multilabel", tuple(spec["target"]), classes=tuple(spec["labels"]))
    if spec["kind"] != "regression":
        return Task(name, spec["kind"], spec["target"], classes=tuple(spec["classes"]))
    moments = targets[spec["target"]]
    if moments.count == 0:
        raise UserError(f"data.tasks.{name}.target: no labelled row in the train split")
    return Task(name, "regression", spec["target"], mean=moments.mean,
                std=moments.std if moments.std > 0 else 1.0, objective=loss or "mse")
