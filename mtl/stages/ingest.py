"""ingest: the raw source (built-in data set, CSV or Parquet path/glob) -> one Parquet table with
a stable row id, plus a schema record (feature kinds, category vocabularies, label statistics).

Categorical and text features and classification targets are stored as strings, numeric
features and regression targets as float64, image features as binary (raw uint8 pixels, H*W
bytes a row, with (H, W) recorded in the schema); rows with missing labels are kept (the engine
masks them).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import DataConfig, Params
from mtl.errors import UserError
from mtl.io import read_source, write_json, write_table

NUMERIC_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_dictionary)
TEXT_TYPES = (*STRING_TYPES, pa.types.is_boolean)
BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)


def run(params: Params) -> None:
    table = read_source(params.data.source)
    table, schema = prepare(table, params.data)
    write_table(table, paths.INGESTED)
    write_json(schema, paths.SCHEMA)
    print(f"ingest: {table.num_rows} rows, {len(schema['features'])} features, "
          f"{len(schema['tasks'])} tasks -> {paths.INGESTED}")


def feature_kinds(table: pa.Table, data: DataConfig) -> dict[str, str]:
    """Each feature column and its kind: numeric, categorical, text or image."""
    targets = {t.target for t in data.tasks.values()}
    skip = targets | {data.id_column} | set(data.drop) | set(paths.RESERVED)
    names = data.features if data.features is not None else [c for c in table.column_names if c not in skip]
    kinds = {}
    for name in names:
        if name not in table.column_names:
            raise UserError(f"data.features: column '{name}' is not in the data")
        kind = table.schema.field(name).type
        if name in data.text:
            if not any(check(kind) for check in STRING_TYPES):
                raise UserError(f"data.text: column '{name}' has type {kind}, expected strings")
            kinds[name] = "text"
        elif name in data.image:
            if not any(check(kind) for check in BINARY_TYPES):
                raise UserError(f"data.image: column '{name}' has type {kind}, expected binary "
                                "(raw uint8 pixels)")
            kinds[name] = "image"
        elif name in data.categorical or any(check(kind) for check in TEXT_TYPES):
            kinds[name] = "categorical"
        elif any(check(kind) for check in NUMERIC_TYPES):
            kinds[name] = "numeric"
        else:
            raise UserError(f"data.features: column '{name}' has type {kind}, which is neither "
                            "numeric nor categorical (list it under data.drop, or under data.image "
                            "for raw pixels)")
    if not kinds:
        raise UserError("data.features: no feature column left")
    return kinds


def prepare(table: pa.Table, data: DataConfig) -> tuple[pa.Table, dict]:
    if table.num_rows == 0:
        raise UserError(f"data.source: '{data.source}' holds no rows")
    for name, task in data.tasks.items():
        if task.target not in table.column_names:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' is not in the data")
    if data.id_column is not None and data.id_column not in table.column_names:
        raise UserError(f"data.id_column: column '{data.id_column}' is not in the data")
    for key in ("text", "image"):
        for name in getattr(data, key):
            if name not in table.column_names:
                raise UserError(f"data.{key}: column '{name}' is not in the data")
    kinds = feature_kinds(table, data)

    columns: dict[str, pa.ChunkedArray] = {paths.ID: row_ids(table, data.id_column)}
    features: dict[str, dict] = {}
    for name, kind in kinds.items():
        columns[name] = _as(table[name], kind, f"data.features: column '{name}'")
        features[name] = {"kind": kind, "n_missing": _n_missing(columns[name])} | _stats(columns[name], kind)
        if kind == "image":
            features[name]["shape"] = _image_shape(columns[name], name, data.image_shape)
    shapes = {tuple(f["shape"]) for f in features.values() if f["kind"] == "image"}
    if len(shapes) > 1:
        raise UserError(f"data.image: the image columns have different shapes {sorted(shapes)}; "
                        "they are stacked as channels of one image, so they must share one")
    tasks: dict[str, dict] = {}
    for name, task in data.tasks.items():
        kind = "numeric" if task.kind == "regression" else "categorical"
        column = _as(table[task.target], kind, f"data.tasks.{name}.target: column '{task.target}'")
        columns[task.target] = column
        n_missing = _n_missing(column)
        if n_missing == table.num_rows:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' has no label at all")
        stats = _stats(column, kind)
        if task.kind == "binary" and len(stats["vocabulary"]) != 2:
            raise UserError(f"data.tasks.{name}.target: a binary task needs exactly 2 classes, "
                            f"column '{task.target}' has {len(stats['vocabulary'])}")
        if task.kind == "multiclass" and len(stats["vocabulary"]) < 2:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' has fewer than 2 classes")
        if "vocabulary" in stats:
            stats = {"classes": stats.pop("vocabulary")} | stats
        tasks[name] = {"kind": task.kind, "target": task.target,
                       "n_labelled": table.num_rows - n_missing, "n_missing": n_missing} | stats
    schema = {"source": data.source, "n_rows": table.num_rows,
              "id": f"column:{data.id_column}" if data.id_column else "row-content-hash",
              "features": features, "tasks": tasks}
    return pa.table(columns), schema


def row_ids(table: pa.Table, id_column: str | None) -> pa.ChunkedArray:
    """The stable key of each row: the id column as text, or a hash of the row's content."""
    if id_column is not None:
        ids = table[id_column].cast(pa.string())
        if ids.null_count:
            raise UserError(f"data.id_column: column '{id_column}' has {ids.null_count} missing values")
        return ids
    as_text = [pc.fill_null(_as_key(table[c]), "\x00") for c in table.column_names]
    joined = pc.binary_join_element_wise(*as_text, "\x1f") if len(as_text) > 1 else as_text[0]
    digest = [hashlib.blake2b(s.encode(), digest_size=8).hexdigest() for s in joined.to_pylist()]
    return pa.chunked_array([pa.array(digest, pa.string())])


def _as_key(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as text for the content hash; binary values (e.g. pixels) by their BLAKE2b digest."""
    if any(check(column.type) for check in BINARY_TYPES):
        return pa.chunked_array([pa.array(
            [None if b is None else hashlib.blake2b(b, digest_size=8).hexdigest() for b in column.to_pylist()],
            pa.string())])
    return column.cast(pa.string())


def _image_shape(column: pa.ChunkedArray, name: str, shape: list[int] | None) -> list[int]:
    """(H, W) of the images in ``column`` (``data.image_shape``, or the side of square images);
    every image must hold H*W bytes."""
    sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
    present = np.flatnonzero(~np.isnan(sizes)) if sizes.dtype.kind == "f" else np.arange(len(sizes))
    if not len(present):
        raise UserError(f"data.image: column '{name}' holds no image")
    if shape is None:
        first = int(sizes[present[0]])
        side = math.isqrt(first)
        if side * side != first:
            raise UserError(f"data.image: images in column '{name}' have {first} bytes, not a square "
                            "number; set data.image_shape: [height, width]")
        shape = [side, side]
    bad = present[sizes[present] != shape[0] * shape[1]]
    if len(bad):
        raise UserError(f"data.image: column '{name}' row {bad[0]} has {int(sizes[bad[0]])} bytes, "
                        f"expected {shape[0]}x{shape[1]} = {shape[0] * shape[1]} (raw uint8 pixels)")
    return list(shape)


def _as(column: pa.ChunkedArray, kind: str, what: str) -> pa.ChunkedArray:
    try:
        if kind == "image":
            return column.cast(pa.binary())
        return column.cast(pa.float64() if kind == "numeric" else pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UserError(f"{what} has type {column.type}, expected {kind} values") from None


def _n_missing(column: pa.ChunkedArray) -> int:
    if pa.types.is_floating(column.type):
        return int(pc.sum(pc.is_nan(pc.fill_null(column, float("nan")))).as_py() or 0)
    return column.null_count


def _stats(column: pa.ChunkedArray, kind: str) -> dict:
    if kind in ("text", "image"):
        return {}
    if kind == "categorical":
        counts = {d["values"]: d["counts"] for d in pc.value_counts(column).to_pylist() if d["values"] is not None}
        return {"vocabulary": sorted(counts), "counts": {k: counts[k] for k in sorted(counts)}}
    values = column.to_numpy(zero_copy_only=False)
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(finite.mean()), "std": float(finite.std()),
            "min": float(finite.min()), "max": float(finite.max())}
