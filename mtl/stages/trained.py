"""Loading a trained model and checking that a table holds what it reads: for the stages
that use a model (evaluate, predict, export)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import Params
from mtl.engine.checkpoint import Bundle, NotOurs
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.errors import UserError
from mtl.stages.common import as_flags, as_kind, check_types, require_columns, seeds_of


def model_kinds(bundle: Bundle) -> dict[str, str]:
    """The kind of each column a trained model reads: its features and its tasks' targets."""
    p = bundle.preprocessor
    kinds = {name: "numeric" for name in p.tabular.numeric}
    kinds |= {name: "categorical" for name in p.tabular.categorical}
    kinds |= {name: "text" for name in (p.text.columns if p.text else ())}
    kinds |= {name: "image" for name in (p.image.columns if p.image else ())}
    return kinds | {column: task.kind for task in bundle.tasks for column in task.columns}


def model_path(params: Params, variant: str, seed: int | None) -> tuple[int, Path]:
    """The seed (default: the first of ``seeds``) and the ``model.pt`` of ``variant``; one line
    for a variant or seed that params.yaml does not name."""
    params.variant_train(variant)  # an unknown variant fails here
    seed = params.seeds[0] if seed is None else seeds_of(params, [seed])[0]
    return seed, paths.model_dir(variant, seed) / "model.pt"


def load_model(params: Params, variant: str, seed: int | None) -> Bundle:
    """The trained model of ``variant`` and ``seed`` (default: the first of ``seeds``)."""
    return load_model_file(params, variant, seed)[0]


def load_model_file(params: Params, variant: str, seed: int | None) -> tuple[Bundle, str]:
    """``load_model``, and the SHA-256 of the file it read (once): what ties an export to it."""
    seed, path = model_path(params, variant, seed)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run 'mtl train --variant {variant} --seed {seed}' first)")
    data = path.read_bytes()
    try:
        return Bundle.load(io.BytesIO(data)), hashlib.sha256(data).hexdigest()
    except NotOurs as exc:
        raise UserError(f"{path} is not a model written by mtl-pipeline ({exc}); "
                        f"run 'mtl train --variant {variant} --seed {seed}' again") from None


def feature_columns(preprocessor: Preprocessor) -> list[str]:
    p = preprocessor
    return [*p.tabular.numeric, *p.tabular.categorical,
            *(p.text.columns if p.text else ()), *(p.image.columns if p.image else ())]


def check_features(table: pa.Table, path: Path, preprocessor: Preprocessor) -> None:
    """One line naming the first feature column the model needs that ``table`` lacks, or the
    first numeric one that does not hold numbers."""
    for name in feature_columns(preprocessor):
        if name not in table.column_names:
            raise UserError(f"{path}: feature column '{name}' is missing (the model reads "
                            f"{feature_columns(preprocessor)})")
    for name in preprocessor.tabular.numeric:
        try:
            table[name].cast(pa.float64())
        except pa.ArrowException:
            raise UserError(f"{path}: column '{name}' must hold numbers "
                            f"(it holds {table[name].type})") from None


def check_labelled(table: pa.Table, path: Path, params: Params, bundle: Bundle) -> None:
    """One line naming what a labelled table (the test split) lacks for scoring ``bundle``: a
    target or the id column, a feature column, or a column of the wrong type."""
    require_columns(table, path, params)
    check_features(table, path, bundle.preprocessor)
    check_types(table.schema, path, model_kinds(bundle))


def as_labelled(table: pa.Table, path: Path, bundle: Bundle) -> pa.Table:
    """``table``, a labelled file a user brings, with its target columns converted as ingest
    converts them (a class as text, a value as a float, a label as a boolean); one line naming
    ``path`` and the column when a feature or target column is missing or does not convert, or
    a target holds a class the model does not know."""
    check_features(table, path, bundle.preprocessor)
    for task in bundle.tasks:
        for name in task.columns:
            if name not in table.column_names:
                raise UserError(f"{path}: target column '{name}' of task '{task.name}' is missing")
            column = _target(table[name], path, name, task)
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _target(column: pa.ChunkedArray, path: Path, name: str, task: Task) -> pa.ChunkedArray:
    """One target column of ``task`` converted, or one line saying why it does not convert."""
    if task.kind == "multilabel":
        flags = as_flags(column)
        if isinstance(flags, str):
            raise UserError(f"{path}: column '{name}' holds {flags}; a multilabel column holds "
                            "0/1, true/false or nothing")
        return flags
    regression = task.kind == "regression"
    try:
        column = as_kind(column, "numeric" if regression else "categorical")
    except pa.ArrowException:
        what = "numbers" if regression else "class labels"
        raise UserError(f"{path}: column '{name}' of task '{task.name}' must hold {what} (it "
                        f"holds {column.type})") from None
    if not regression:
        classes = pa.array(task.classes, pa.string())
        known = pc.or_kleene(pc.is_null(column), pc.is_in(column, classes))
        unknown = column.filter(pc.invert(known))
        if len(unknown):
            raise UserError(f"{path}: column '{name}' holds '{unknown[0].as_py()}', not a class of "
                            f"task '{task.name}' (classes: {', '.join(task.classes)})")
    return column
