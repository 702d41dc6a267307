"""augment: the ingested table -> the same rows plus augmented copies of training rows.

Only rows that ``split`` will put in train are copied (``split.assign`` of their key, or of their
value of ``split.column``, which each copy keeps, so it lands in train too), and interpolation
partners are drawn from training rows of the same class, so nothing of a validation or test row
leaks into training. Each copy records its source row's id.

A copy gets Gaussian noise on its numeric features (``noise`` × the feature's std); a share
``interpolate`` of the copies first moves towards a partner row: x + λ (x_partner − x),
λ ~ U(0, max_lambda), with regression targets interpolated alike and class labels, categorical
features and missing values kept from the source.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError
from mtl.io import RowGroupWriter, Scan, atomic_path, read_json, remove_leftovers, scan_table
from mtl.stages.common import require_columns
from mtl.stages.progress import Rows
from mtl.stages.split import assign, require_split_column


def run(params: Params) -> None:
    remove_leftovers(paths.AUGMENTED)
    scan = scan_table(paths.INGESTED)
    schema = read_json(paths.SCHEMA)
    require_columns(scan.schema.empty_table(), paths.INGESTED, params)
    require_split_column(scan.schema.names, paths.INGESTED, params.split)
    n_rows = pq.read_metadata(paths.INGESTED).num_rows
    check_schema(schema, scan.schema.names, n_rows)
    n_out = 0
    with atomic_path(paths.AUGMENTED) as tmp, Rows("augment") as progress:
        writer = RowGroupWriter(tmp, _with_source(scan.schema.empty_table(), False).schema)
        for part in stream(scan, schema, params):
            writer.write(part)
            n_out += part.num_rows
            progress.add(part.num_rows)
        writer.close()
    print(f"augment: {n_rows} rows + {n_out - n_rows} augmented -> {paths.AUGMENTED}")


def check_schema(schema: object, columns: list[str], n_rows: int) -> None:
    """Fail if schema.json is not the record ingest wrote with this table (say, one of the pair
    was replaced by hand)."""
    features = schema.get("features") if isinstance(schema, dict) else None
    if (not isinstance(features, dict) or schema.get("n_rows") != n_rows
            or not all(name in columns and isinstance(f, dict) and "kind" in f for name, f in features.items())):
        raise UserError(f"{paths.SCHEMA}: does not describe {paths.INGESTED} (re-run ingest)")


def augment(table: pa.Table, schema: dict, params: Params) -> pa.Table:
    """The whole augmented table of an ingested ``table`` (what ``run`` writes)."""
    return pa.concat_tables(stream(Scan.of(table), schema, params))


def _with_source(table: pa.Table, augmented: bool) -> pa.Table:
    """``table`` (whose ``_id`` is its source's id) with the source id and the augmented flag."""
    n = table.num_rows
    return table.append_column(paths.SOURCE_ID, table[paths.ID]).append_column(
        paths.AUGMENTED_FLAG, pa.array(np.full(n, augmented)))


def stream(scan: Scan, schema: dict, params: Params) -> Iterator[pa.Table]:
    """The original rows, batch by batch, then each augmented copy of the training rows.

    Only the numeric features and regression targets (and the ids, classes and declared splits)
    of the whole table are held in memory, to draw partners; nothing at all when
    ``augment.copies`` is 0."""
    for batch in scan.batches():
        yield _with_source(pa.Table.from_batches([batch]), False)
    cfg = params.augment
    if cfg.copies == 0:
        return
    numeric = [name for name, f in schema["features"].items() if f["kind"] == "numeric"]
    regression = [t.target for t in params.data.tasks.values() if t.kind == "regression"]
    column = params.split.column
    labels = [t.target for t in params.data.tasks.values() if t.kind != "multilabel"]
    kept = [paths.ID, *numeric, *regression, *labels, *([column] if column else [])]
    table = pa.Table.from_batches([b.select(list(dict.fromkeys(kept))) for b in scan.batches()])
    declared = table[column] if column else None
    train_rows = np.flatnonzero(assign(table[paths.ID], params.split, declared) == "train")
    if len(train_rows) == 0:
        return
    classes = _class_of(table, params)
    values = {c: table[c].to_numpy().astype("float64") for c in numeric + regression}
    scale = {c: np.nanstd(values[c][train_rows]) if np.isfinite(values[c][train_rows]).any() else 0.0
             for c in numeric}
    rng = np.random.default_rng(cfg.seed)
    for k in range(cfg.copies):
        src = train_rows
        partner = _partners(src, classes, train_rows, rng) if cfg.interpolate > 0 else src
        lam = rng.uniform(0, cfg.max_lambda, len(src)) * (rng.random(len(src)) < cfg.interpolate)
        new = {}
        for c in numeric + regression:
            x, xp = values[c][src], values[c][partner]
            mixed = np.where(np.isfinite(xp), x + lam * (xp - x), x)
            if c in scale:
                mixed = mixed + rng.normal(0.0, 1.0, len(src)) * cfg.noise * scale[c]
            new[c] = pa.array(mixed, pa.float64(), mask=~np.isfinite(mixed))
        start = 0  # the copy, batch by batch: the training rows of each batch, in order
        for batch in scan.batches():
            done, end = np.searchsorted(src, [start, start + batch.num_rows])
            copy = pa.Table.from_batches([batch]).take(pa.array(src[done:end] - start))
            start += batch.num_rows
            if not copy.num_rows:
                continue
            columns = {c: new[c].slice(done, end - done) for c in new}
            columns[paths.ID] = pc.binary_join_element_wise(copy[paths.ID], f"#aug{k}", "")
            copy = _with_source(copy, True)
            yield pa.Table.from_arrays([columns.get(name, column) for name, column in
                                        zip(copy.column_names, copy.columns)], schema=copy.schema)


def _class_of(table: pa.Table, params: Params) -> np.ndarray | None:
    """The class label of each row for the task that pairs rows, or None when there is none."""
    tasks = params.data.tasks
    name = params.augment.interpolate_task or next(
        (n for n, t in tasks.items() if t.kind in ("binary", "multiclass")), None)
    if name is None:
        return None
    return np.asarray(table[tasks[name].target].to_pylist(), dtype=object)


def _partners(src: np.ndarray, classes: np.ndarray | None, pool: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """For each source row, a random training row of the same class (itself if it has no class)."""
    if classes is None:
        return rng.choice(pool, len(src))
    partner = src.copy()
    for label in sorted({classes[i] for i in src if classes[i] is not None}):  # sorted: set order varies by run
        members = pool[classes[pool] == label]
        rows = np.flatnonzero(classes[src] == label)
        partner[rows] = rng.choice(members, len(rows))
    return partner
