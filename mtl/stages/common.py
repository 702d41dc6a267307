"""What several stages share: the checks made before anything is written, the conversion of
a column to the type ingest writes, and the seeds a command runs. (Loading a trained model is
``mtl.stages.trained``: the data stages do not import the engine, so that a change there does
not re-run them.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError


def require_columns(table: pa.Table | pa.Schema, path: Path, params: Params,
                    reserved: bool = False) -> None:
    """Fail with one line if a task's target column (or a reserved column) is missing from
    ``table`` (or a table of that schema)."""
    names = (table if isinstance(table, pa.Schema) else table.schema).names
    for name, task in params.data.tasks.items():
        for column in task.columns:
            if column not in names:
                raise UserError(f"data.tasks.{name}.target: column '{column}' is not in {path} "
                                "(re-run ingest after changing data.tasks)")
    for column in paths.RESERVED if reserved else (paths.ID,):
        if column not in names:
            raise UserError(f"{path}: column '{column}' is missing (written by an older or other tool?)")


def as_kind(column: pa.Array, kind: str) -> pa.Array:
    """``column`` as ingest writes a column of that kind: binary (image), float64 (numeric) or
    strings; NaN in a float column read as categories is a missing value. Raises pyarrow's
    error when the values do not convert."""
    if kind == "categorical" and pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast({"image": pa.binary(), "numeric": pa.float64()}.get(kind, pa.string()))


def as_flags(column: pa.Array) -> pa.Array | str:
    """A multilabel column as booleans, null where the label is missing; or the first value that
    is not a label, as text. Raises pyarrow's error when the type does not fit."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    text = pc.utf8_lower(column.cast(pa.string()))
    ok = pc.or_kleene(pc.is_null(text), pc.is_in(text, pa.array(["0", "1", "false", "true"])))
    bad = column.filter(pc.invert(ok))
    if len(bad):
        return str(bad[0].as_py())
    return pc.or_(pc.equal(text, "1"), pc.equal(text, "true"))


# The Arrow type ingest writes for each kind of feature and of task.
WRITTEN_TYPES = {"numeric": pa.float64(), "categorical": pa.string(), "text": pa.string(),
                 "image": pa.binary(), "regression": pa.float64(), "binary": pa.string(),
                 "multiclass": pa.string(), "multilabel": pa.bool_()}


def check_types(columns: pa.Schema, path: Path, kinds: dict[str, str]) -> None:
    """Fail with one line naming the first column of ``kinds`` (column -> kind of feature or
    task) that does not have the type ingest writes for its kind: a split written by another
    tool, or changed by hand."""
    for name, kind in kinds.items():
        if name in columns.names and columns.field(name).type != WRITTEN_TYPES[kind]:
            raise UserError(f"{path}: column '{name}' holds {columns.field(name).type}, not the "
                            f"{WRITTEN_TYPES[kind]} ingest writes for a {kind} column (re-run the "
                            "pipeline from ingest)")


def seeds_of(params: Params, chosen: list[int] | None) -> list[int]:
    """The seeds a command runs: those chosen on the command line, each one of ``seeds``;
    without any, each of ``seeds``."""
    for seed in chosen or []:
        if seed not in params.seeds:
            raise UserError(f"--seed: {seed} is not in seeds {params.seeds} of the params file")
    return list(chosen or params.seeds)
