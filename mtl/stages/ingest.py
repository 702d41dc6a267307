"""ingest: the raw source (built-in data set, CSV or Parquet path/glob) -> the rows with a stable
row id, one Parquet file per split (``split.assign``: the source is read and written once), plus
a schema record (feature kinds, category vocabularies, label statistics, the split params).
A declared split's column (``split.column``) is carried as text, beside the features and targets.

Categorical and text features and classification targets are stored as strings, numeric
features and regression targets as float64, multilabel label columns as booleans, image
features as binary (raw uint8 pixels, H*W bytes a row, with (H, W) recorded in the schema); rows
with missing labels are kept (the engine masks them).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import DataConfig, Params
from mtl.errors import UserError
from mtl.io import Scan, atomic_paths, remove_leftovers
from mtl.sources import scan_source
from mtl.stages.common import as_flags, as_kind
from mtl.stages.progress import Rows
from mtl.stages.split import Partition, record

NUMERIC_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_dictionary)
TEXT_TYPES = (*STRING_TYPES, pa.types.is_boolean)
BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)


def run(params: Params) -> None:
    tables = [paths.ingested_path(name) for name in paths.SPLITS]
    remove_leftovers(*tables, paths.SCHEMA)
    scan = scan_source(params.data.source)
    with (atomic_paths(*tables, paths.SCHEMA) as tmps,  # all or none
          Rows("ingest") as progress):
        partition = Partition(dict(zip(paths.SPLITS, tmps)), params.split)

        def write(table: pa.Table) -> None:
            partition.write(table)
            progress.add(table.num_rows)

        schema = ingest(scan, params.data, write, params.split.column)
        partition.close()
        schema["split"] = record(params.split) | {"rows": partition.counts}
        tmps[-1].write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    print(f"ingest: {schema['n_rows']} rows, {len(schema['features'])} features, "
          f"{len(schema['tasks'])} tasks -> {paths.INGESTED_DIR}/{{{','.join(paths.SPLITS)}}}.parquet "
          f"({', '.join(f'{k} {v}' for k, v in partition.counts.items())})")
    if params.split.hash == "blake2b" and schema["n_rows"] >= SLOW_HASH_ROWS:
        print(f"warning: split.hash: blake2b hashes one key at a time (about 1.2 µs a row, "
              f"{schema['n_rows'] * 1.2e-6:.0f} s here); a new project of this size can set split.hash: "
              "splitmix64 before its first run (it moves rows between splits, so not in a project whose "
              "results you keep)", file=sys.stderr)


SLOW_HASH_ROWS = 1_000_000
"""Rows from which ingest points a project on the BLAKE2b split hash to the vectorised one."""


def prepare(table: pa.Table, data: DataConfig,
            split_column: str | None = None) -> tuple[pa.Table, dict]:
    """The ingested table and its schema record, in memory (what ``run`` writes)."""
    parts: list[pa.Table] = []
    schema = ingest(Scan.of(table), data, parts.append, split_column)
    return pa.concat_tables(parts), schema


def ingest(scan: Scan, data: DataConfig, write: Callable[[pa.Table], None],
           split_column: str | None = None) -> dict:
    """Convert ``scan`` batch by batch, passing each converted batch to ``write``, and return the
    schema record; ``split_column`` (``split.column``) is kept, as text. Checks that need the
    whole table run once it has been read, in a fixed order, so the first problem reported does
    not depend on the batch size."""
    batches, head, n_head = scan.batches(), [], 0  # the first batches: read once, checked first
    for batch in batches:
        head.append(batch)
        n_head += batch.num_rows
        if n_head >= 2:
            break
    if n_head < 2:
        raise UserError(f"data.source: '{data.source}' holds {'no rows' if n_head == 0 else 'a single row'}"
                        "; train, validation and test splits need more")
    names = scan.schema.names
    check_reserved(names)
    for name, task in data.tasks.items():
        for column in task.columns:
            if column not in names:
                raise UserError(f"data.tasks.{name}.target: column '{column}' is not in the data")
    if data.id_column is not None and data.id_column not in names:
        raise UserError(f"data.id_column: column '{data.id_column}' is not in the data")
    if split_column is not None and split_column not in names:
        raise UserError(f"split.column: column '{split_column}' is not in the data")
    for key in ("categorical", "text", "image", "drop"):
        for name in getattr(data, key):
            if name not in names:
                raise UserError(f"data.{key}: column '{name}' is not in the data")

    features = {name: _Column(name, kind, f"data.features: column '{name}'", data, feature=True)
                for name, kind in feature_kinds(scan.schema, data, split_column).items()}
    ids = _Column(data.id_column, "categorical", f"data.id_column: column '{data.id_column}'", data,
                  counts=False) if data.id_column is not None else None
    carried: dict[str, _Column] = {}  # the declared split's column
    if split_column is not None:
        what = f"split.column: column '{split_column}'"
        carried[split_column] = _Column(split_column, "categorical", what, data, counts=False)
    targets: dict[str, _Column] = {}
    for name, task in data.tasks.items():
        for c in task.columns:
            what = f"data.tasks.{name}.target: column '{c}'"
            kind = {"multilabel": "flags", "regression": "numeric"}.get(task.kind, "categorical")
            targets[c] = _Column(c, kind, what, data)
    n_rows, labelled, unhashable = 0, collections.Counter(), None
    for batch in itertools.chain(head, batches):
        try:
            columns = {paths.ID: ids.add(batch, n_rows) if ids else _content_ids(batch)}
        except pa.ArrowException as exc:  # a column that has no text form: raised after the feature checks
            columns, unhashable = {paths.ID: None}, unhashable or exc
        columns |= {name: col.add(batch, n_rows) for name, col in features.items()}
        columns |= {c: col.add(batch, n_rows) for c, col in targets.items()}
        columns |= {c: col.add(batch, n_rows) for c, col in carried.items()}
        for name, task in data.tasks.items():
            if task.kind == "multilabel" and all(columns[c] is not None for c in task.columns):
                valid = np.stack([columns[c].is_valid().to_numpy(zero_copy_only=False) for c in task.columns])
                labelled[name] += int(valid.any(axis=0).sum())
        n_rows += batch.num_rows
        if all(v is not None for v in columns.values()):
            write(pa.table(columns))

    for col in features.values():  # the checks, in order
        col.check_kind(n_rows)
    if not features:
        raise UserError("data.features: no feature column left")
    if unhashable is not None:
        raise unhashable
    for col in carried.values():
        col.check_values()
    if ids is not None:
        ids.check_values()
        if ids.n_missing:
            raise UserError(f"data.id_column: column '{data.id_column}' has {ids.n_missing} missing values")
    for col in features.values():
        col.check_values()
        if col.n_missing == n_rows:
            raise UserError(f"data.features: column '{col.name}' has no value at all (list it under data.drop)")
        if col.kind == "image":
            col.check_image()
    shapes = {tuple(col.shape) for col in features.values() if col.kind == "image"}
    if len(shapes) > 1:
        raise UserError(f"data.image: the image columns have different shapes {sorted(shapes)}; "
                        "they are stacked as channels of one image, so they must share one")
    tasks: dict[str, dict] = {}
    for name, task in data.tasks.items():
        for c in task.columns:
            targets[c].check_values()
        if task.kind == "multilabel":
            flags = [targets[c] for c in task.columns]
            tasks[name] = {"kind": task.kind, "target": task.columns, "labels": task.columns,
                           "n_labelled": labelled[name], "positives": {f.name: f.positives for f in flags},
                           "missing": {f.name: f.n_missing for f in flags}}
            continue
        col = targets[task.target]
        if col.n_missing == n_rows:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' has no label at all")
        stats = col.stats()
        if task.kind == "binary" and len(stats["vocabulary"]) != 2:
            raise UserError(f"data.tasks.{name}.target: a binary task needs exactly 2 classes, "
                            f"column '{task.target}' has {len(stats['vocabulary'])}")
        if task.kind == "multiclass" and len(stats["vocabulary"]) < 2:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' has fewer than 2 classes")
        if "vocabulary" in stats:
            stats = {"classes": stats.pop("vocabulary")} | stats
        tasks[name] = {"kind": task.kind, "target": task.target,
                       "n_labelled": n_rows - col.n_missing, "n_missing": col.n_missing} | stats
    return {"source": data.source, "n_rows": n_rows,
            "id": f"column:{data.id_column}" if data.id_column else "row-content-hash",
            "features": {name: {"kind": col.kind, "n_missing": col.n_missing} | col.stats()
                         | ({"shape": col.shape} if col.kind == "image" else {})
                         for name, col in features.items()},
            "tasks": tasks}


def check_reserved(names: list[str]) -> None:
    """Refuse a column of the source with a name the pipeline gives its own columns
    (``paths.RESERVED``): it would be dropped, or taken for the pipeline's own. (``mtl.config``
    refuses such names in params.yaml.)"""
    for name in names:
        if name in paths.RESERVED:
            raise UserError(f"data.source: column '{name}' has a name reserved for the pipeline's "
                            f"own columns ({', '.join(paths.RESERVED)}); rename it in the data")


def feature_kinds(schema: pa.Schema, data: DataConfig,
                  split_column: str | None = None) -> dict[str, str | None]:
    """Each feature column and its kind (numeric, categorical, text or image), judged by its
    type; None where the type does not fit (``_Column.check_kind`` says why, in order)."""
    targets = {c for t in data.tasks.values() for c in t.columns}
    skip = targets | {data.id_column, split_column} | set(data.drop) | set(paths.RESERVED)
    names = data.features if data.features is not None else [c for c in schema.names if c not in skip]
    kinds: dict[str, str | None] = {}
    for name in names:
        kind = schema.field(name).type if name in schema.names else None
        if kind is None:
            kinds[name] = None
        elif name in data.text:
            kinds[name] = "text" if any(check(kind) for check in STRING_TYPES) else None
        elif name in data.image:
            kinds[name] = "image" if any(check(kind) for check in BINARY_TYPES) else None
        elif name in data.categorical or any(check(kind) for check in TEXT_TYPES):
            kinds[name] = "categorical"
        elif any(check(kind) for check in NUMERIC_TYPES):
            kinds[name] = "numeric"
        else:
            kinds[name] = None
    return kinds


class _Column:
    """One column of the source, converted batch by batch (``add``), with the counts that its
    checks and its schema.json entry need."""

    def __init__(self, name: str, kind: str | None, what: str, data: DataConfig, feature: bool = False,
                 counts: bool = True):
        self.name, self.kind, self.what, self.data = name, kind, what, data
        self.feature, self.keep_counts = feature, counts
        self.type: pa.DataType | None = None
        self.rows = self.raw_nulls = self.n_missing = self.n_inf = self.positives = 0
        self.failed = False  # a batch could not be converted
        self.bad_flag = None  # the first value of a multilabel column that is not 0/1/true/false
        self.numbers: list = [0, 0, None]  # in text: values, values that are not numbers, the first of those
        self.counts: collections.Counter = collections.Counter()  # categorical: rows per value
        self.parts: list[tuple[int, float, float, float, float]] = []  # numeric: n, mean, std, min, max
        self.shape = list(data.image_shape) if name in data.image and data.image_shape else None
        self.image_error: str | None = None

    def _count_numbers(self) -> bool:
        """Whether the refusal of numbers mixed with text needs counting for this column."""
        text = self.type is not None and any(check(self.type) for check in STRING_TYPES)
        return text and (self.kind == "numeric" or (self.feature and self.kind == "categorical"
                                                    and self.name not in self.data.categorical))

    def add(self, batch: pa.RecordBatch, offset: int) -> pa.Array | None:
        """The column in ``batch`` converted (None if it is not there or did not convert);
        ``offset``: the index of the batch's first row."""
        if self.name not in batch.schema.names:
            return None
        column = batch.column(self.name)
        self.type = column.type
        self.rows += len(column)
        self.raw_nulls += column.null_count
        if self.kind == "numeric" and self._count_numbers():
            text = column.cast(pa.string())
            self._count_numbers_in(text, pc.value_counts(text))
        if self.kind is None or self.failed:
            return None
        try:
            out = as_flags(column) if self.kind == "flags" else as_kind(column, self.kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            self.failed = True
            return None
        if self.kind == "flags":
            if isinstance(out, str):
                self.bad_flag = self.bad_flag or out
                return None
            self.positives += int(pc.sum(out).as_py() or 0)
        if self.kind == "numeric":
            # nulls as NaN; not to_numpy(zero_copy_only=False), which imports pandas (0.5 s)
            values = (pc.fill_null(out, math.nan) if out.null_count else out).to_numpy()
            finite = np.isfinite(values)
            if not finite.all():
                n_nan = int(np.isnan(values).sum())
                self.n_missing += n_nan
                self.n_inf += len(values) - int(finite.sum()) - n_nan
                values = values[finite]
            if len(values):
                with np.errstate(over="ignore", invalid="ignore"):  # check_values refuses overflow
                    self.parts.append((len(values), values.mean(), values.std(), values.min(),
                                       values.max()))
            return out
        self.n_missing += out.null_count
        if self.kind == "categorical" and self.keep_counts:
            counts = pc.value_counts(out)
            self.counts.update({d["values"]: d["counts"] for d in counts.to_pylist() if d["values"] is not None})
            if self._count_numbers():
                self._count_numbers_in(out, counts)
        elif self.kind == "image" and self.image_error is None:
            self._add_image(out, offset)
        return out

    def _count_numbers_in(self, text: pa.Array, counts: pa.StructArray) -> None:
        """Add up the values of ``text`` (with their ``pc.value_counts``) that are not numbers,
        and keep the first one; the regular expression runs on the distinct values only."""
        values = counts.field("values")
        words = pc.invert(pc.fill_null(pc.match_substring_regex(values, NUMBER), True))
        n_bad = int(pc.sum(counts.field("counts").filter(words)).as_py() or 0)
        if n_bad and self.numbers[2] is None:
            self.numbers[2] = text.filter(pc.is_in(text, values.filter(words)))[0].as_py()
        self.numbers[0] += len(text) - text.null_count
        self.numbers[1] += n_bad

    def check_kind(self, n_rows: int) -> None:
        """The checks on a feature's type and presence (in the order they were always made)."""
        data, name = self.data, self.name
        if self.type is None:
            raise UserError(f"data.features: column '{name}' is not in the data")
        if self.raw_nulls == n_rows:
            raise UserError(f"data.features: column '{name}' has no value at all (list it under data.drop)")
        if name in data.text and self.kind is None:
            raise UserError(f"data.text: column '{name}' has type {self.type}, expected strings")
        if name in data.image and self.kind is None:
            raise UserError(f"data.image: column '{name}' has type {self.type}, expected binary "
                            "(raw uint8 pixels)")
        if self.kind == "categorical" and self._count_numbers():
            _refuse_numbers_with_text(self.numbers, f"data.features: column '{name}'", 0.5,
                                      hint=", or list the column under data.categorical")
        if self.kind is None:
            raise UserError(f"data.features: column '{name}' has type {self.type}, which is neither "
                            "numeric nor categorical (list it under data.drop, or under data.image "
                            "for raw pixels)")

    def check_values(self) -> None:
        """The checks on converting the values: types, infinities, multilabel values."""
        if self.kind == "flags":
            expected = "a multilabel column holds 0/1, true/false or nothing"
            if self.failed:
                raise UserError(f"{self.what} has type {self.type}, {expected}")
            if self.bad_flag is not None:
                raise UserError(f"{self.what} holds {self.bad_flag}, {expected}")
            if self.n_missing == self.rows:
                raise UserError(f"{self.what} has no label at all")
            return
        if self.failed:
            if self.kind == "numeric" and self._count_numbers():
                _refuse_numbers_with_text(self.numbers, self.what, 0.0)
            raise UserError(f"{self.what} has type {self.type}, expected {self.kind} values")
        if self.n_inf:
            raise UserError(f"{self.what} holds {self.n_inf} infinite value{'s' if self.n_inf > 1 else ''}; "
                            "fix them, or leave them empty to mark them missing")
        if self.kind == "numeric" and self.parts:
            stats = self.stats()
            if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"])):
                largest = max(abs(stats["min"]), abs(stats["max"]))
                raise UserError(f"{self.what} holds values so large (up to {largest:.3g}) that their "
                                "mean or standard deviation overflows; rescale the column")

    def stats(self) -> dict:
        if self.kind in ("text", "image"):
            return {}
        if self.kind == "categorical":
            return {"vocabulary": sorted(self.counts), "counts": {k: self.counts[k] for k in sorted(self.counts)}}
        if not self.parts:
            return {"mean": None, "std": None, "min": None, "max": None}
        if len(self.parts) == 1:
            _, mean, std, low, high = self.parts[0]
        else:  # the batches' means and variances pooled
            n, means, stds, lows, highs = (np.array(v) for v in zip(*self.parts))
            with np.errstate(over="ignore", invalid="ignore"):  # check_values refuses overflow
                mean = float((n * means).sum() / n.sum())
                std = math.sqrt(float((n * (stds**2 + (means - mean) ** 2)).sum() / n.sum()))
            low, high = lows.min(), highs.max()
        return {"mean": float(mean), "std": float(std), "min": float(low), "max": float(high)}

    def _add_image(self, column: pa.Array, offset: int) -> None:
        """(H, W) of the images (``data.image_shape``, or the side of the first, square, image);
        every image must hold H*W bytes."""
        name = self.name
        sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
        present = np.flatnonzero(~np.isnan(sizes)) if sizes.dtype.kind == "f" else np.arange(len(sizes))
        if not len(present):
            return
        if self.shape is None:
            first = int(sizes[present[0]])
            side = math.isqrt(first)
            if side * side != first:
                self.image_error = (f"data.image: images in column '{name}' have {first} bytes, not a square "
                                    "number; set data.image_shape: [height, width]")
                return
            self.shape = [side, side]
        bad = present[sizes[present] != self.shape[0] * self.shape[1]]
        if len(bad):
            h, w = self.shape
            self.image_error = (f"data.image: column '{name}' row {offset + bad[0]} has {int(sizes[bad[0]])} "
                                f"bytes, expected {h}x{w} = {h * w} (raw uint8 pixels)")

    def check_image(self) -> None:
        if self.image_error:
            raise UserError(self.image_error)
        if self.n_missing == self.rows:
            raise UserError(f"data.image: column '{self.name}' holds no image")


def _content_ids(batch: pa.RecordBatch) -> pa.Array:
    return row_ids(pa.Table.from_batches([batch]), None).combine_chunks()


def row_ids(table: pa.Table, id_column: str | None) -> pa.ChunkedArray:
    """The stable key of each row: the id column as text, or a hash of the row's content."""
    if id_column is not None:
        ids = as_kind(table[id_column], "categorical")  # NaN is missing
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


NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def _refuse_numbers_with_text(numbers: list, what: str, share: float, hint: str = "") -> None:
    """Fail if more than ``share`` of a text column's values are numbers but some are not: a
    numeric column with a typo, read as text. ``numbers``: values, non-numbers, the first of those."""
    n_values, n_bad, first = numbers
    if 0 < n_bad and n_values - n_bad > share * n_values:
        raise UserError(f"{what} holds numbers and {n_bad} value{'s' if n_bad > 1 else ''} that "
                        f"{'are' if n_bad > 1 else 'is'} not, e.g. '{first}': fix them or "
                        f"leave them empty to mark them missing{hint}")

