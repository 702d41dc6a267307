"""``mtl predict``: new rows (CSV or Parquet) -> one row of predictions each, in Parquet.

The trained model's own preprocessing turns the rows into inputs, so a category unseen in
training and a missing feature value are handled exactly as in training (the reserved index 0;
the train mean plus a missing-indicator). Rows go through the model in chunks of
``CHUNK_ROWS``, and each chunk's predictions are appended to the output file, so memory stays
bounded however large the input is.

Output columns: the id column, if the input has one (``data.id_column``, else ``_id``); then per
task ``<task>`` (the predicted class label, or the value in the target's units for regression)
and, for classification, ``<task>:p:<class>``, the probability of each class; for multilabel,
``<task>:<label>``, the probability of each label."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from mtl import paths
from mtl.config import Params
from mtl.engine.checkpoint import Bundle
from mtl.engine.tasks import Task
from mtl.engine.trainer import predict
from mtl.errors import UserError
from mtl.io import atomic_path, read_table
from mtl.stages.trained import check_features, load_model

CHUNK_ROWS = 4096

Forward = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # inputs -> raw outputs
Columns = dict[str, np.ndarray | pa.Array]


def run(params: Params, variant: str, seed: int | None, input_path: Path,
        output: Path) -> None:
    if Path(output).suffix != ".parquet":
        raise UserError(f"--output: '{output}' must end in .parquet")
    bundle = load_model(params, variant, seed)
    table = read_table(input_path)
    check_features(table, input_path, bundle.preprocessor)
    id_column = next((c for c in (params.data.id_column, paths.ID) if c in table.column_names), None)
    forward = torch_forward(bundle.model)
    with atomic_path(output) as tmp:
        writer = None
        for start in range(0, max(table.num_rows, 1), CHUNK_ROWS):
            chunk = table.slice(start, CHUNK_ROWS)
            columns = {id_column: chunk[id_column]} if id_column else {}
            batch = pa.table(columns | predictions(bundle, chunk, forward))
            writer = writer or pq.ParquetWriter(tmp, batch.schema)
            writer.write_table(batch)
        writer.close()
    print(f"predict@{variant}: {table.num_rows} rows -> {output}")


def predictions(bundle: Bundle, rows: pa.Table, forward: Forward) -> Columns:
    """Every task's output columns for ``rows`` (a table with the model's feature columns): the
    one prediction path of ``mtl predict`` and ``mtl serve``. ``forward`` maps the model's
    inputs to its raw outputs (``torch_forward``, or the ONNX session)."""
    return decode(bundle.tasks, forward(bundle.preprocessor.transform(rows)))


def torch_forward(model: nn.Module) -> Forward:
    """The module as a ``Forward``: ``trainer.predict``, the path evaluate takes too (evaluation
    mode, no autograd)."""
    return functools.partial(predict, model)


def decode(tasks: list[Task], outputs: dict[str, torch.Tensor]) -> Columns:
    """The output columns of every task, from the raw outputs of a batch."""
    columns: Columns = {}
    for task in tasks:
        columns |= task_columns(task, outputs[task.name])
    return columns


def task_columns(task: Task, out: torch.Tensor) -> Columns:
    """One task's output columns for a chunk of raw model outputs."""
    p = task.decode(out).double().numpy()
    if task.kind == "regression":
        return {task.name: p}
    if task.kind == "multilabel":
        return {f"{task.name}:{label}": p[:, i] for i, label in enumerate(task.classes)}
    if task.kind == "binary":
        p = np.stack([1 - p, p], axis=1)
    labels = pa.array(np.asarray(task.classes, dtype=object)[p.argmax(axis=1)], pa.string())
    return {task.name: labels} | {f"{task.name}:p:{c}": p[:, i] for i, c in enumerate(task.classes)}
