"""augment: the ingested splits -> the same splits, train with augmented copies of its rows.

Only training rows are copied (ingest has put each row in its split's file), and interpolation
partners are drawn from training rows of the same class (from a bounded sample of them, the
partner pool), so nothing of a validation or test row leaks into training. Each copy records its
source row's id. The files augment does not change (val and test; train too with ``copies`` 0)
are the ingested files themselves (hard links).

A copy gets Gaussian noise on its numeric features (``noise`` × the feature's std); a share
``interpolate`` of the copies first moves towards a partner row: x + λ (x_partner − x),
λ ~ U(0, max_lambda), with regression targets interpolated alike and class labels, categorical
features and missing values kept from the source.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError
from mtl.io import (
    RowGroupWriter,
    Scan,
    atomic_paths,
    link_or_copy,
    read_json,
    remove_leftovers,
    scan_table,
)
from mtl.stages.common import require_columns
from mtl.stages.progress import Rows
from mtl.stages.split import check_record, splitmix64_unit


def run(params: Params) -> None:
    outputs = [paths.augmented_path(name) for name in paths.SPLITS]
    remove_leftovers(*outputs)
    schema = read_json(paths.SCHEMA)
    scans = {name: scan_table(paths.ingested_path(name)) for name in paths.SPLITS}
    for name, scan in scans.items():
        require_columns(scan.schema, paths.ingested_path(name), params, reserved=True)
    rows = {name: pq.read_metadata(paths.ingested_path(name)).num_rows for name in paths.SPLITS}
    check_schema(schema, scans["train"].schema.names, sum(rows.values()))
    check_record(schema, params.split)
    copies = params.augment.copies
    n_out = rows["train"]  # train's rows written: without copies, the ingested file's
    with atomic_paths(*outputs) as tmps:
        for name, tmp in zip(paths.SPLITS, tmps):
            if name != "train" or copies == 0:  # passed through: the same file
                link_or_copy(paths.ingested_path(name), tmp)
        if copies:
            with Rows("augment") as progress:
                writer, n_out = RowGroupWriter(tmps[0], scans["train"].schema), 0
                for part in stream(scans["train"], schema, params):
                    writer.write(part)
                    n_out += part.num_rows
                    progress.add(part.num_rows)
                writer.close()
    print(f"augment: {rows['train']} training rows + {n_out - rows['train']} augmented -> {paths.AUGMENTED_DIR}")


def check_schema(schema: object, columns: list[str], n_rows: int) -> None:
    """Fail if schema.json is not the record ingest wrote with these tables (say, one of them
    was replaced by hand)."""
    features = schema.get("features") if isinstance(schema, dict) else None
    if (not isinstance(features, dict) or schema.get("n_rows") != n_rows
            or not all(name in columns and isinstance(f, dict) and "kind" in f for name, f in features.items())):
        raise UserError(f"{paths.SCHEMA}: does not describe {paths.INGESTED_DIR} (re-run ingest)")


def augment(train: pa.Table, schema: dict, params: Params) -> pa.Table:
    """The ingested training rows ``train`` and their copies (what ``run`` writes)."""
    return pa.concat_tables(stream(Scan.of(train), schema, params))


def stream(scan: Scan, schema: dict, params: Params) -> Iterator[pa.Table]:
    """Each batch of training rows, followed by its augmented copies (one per ``augment.copies``).
    Two passes over ``scan`` (``_Pool``, then the copies); memory holds a few batches and the
    partner pool, whatever the table's size."""
    cfg = params.augment
    columns = [name for name, f in schema["features"].items() if f["kind"] == "numeric"]
    n_numeric = len(columns)
    columns += [t.target for t in params.data.tasks.values() if t.kind == "regression"]
    pool = _Pool.read(scan, params, columns, n_numeric) if cfg.copies else None
    # one stream per quantity and copy, drawn in row order: the same draws for any batch size
    rngs = [[np.random.default_rng([cfg.seed, k, j]) for j in range(4)] for k in range(cfg.copies)]
    for batch in scan.batches():
        rows = pa.Table.from_batches([batch])
        yield rows
        if pool is None:
            continue
        x, m = _matrix(rows, columns), rows.num_rows
        for k, (partner, lam, pick, noise) in enumerate(rngs):
            xp = pool.partners(rows, x, partner.random(m)) if cfg.interpolate > 0 else x
            mix = lam.uniform(0, cfg.max_lambda, m) * (pick.random(m) < cfg.interpolate)
            new = np.where(np.isfinite(xp), x + mix * (xp - x), x)
            new[:n_numeric] += noise.standard_normal((m, n_numeric)).T * (cfg.noise * pool.scale[:, None])
            yield _copy(rows, k, dict(zip(columns, new)))


def _matrix(rows: pa.Table, columns: list[str]) -> np.ndarray:
    """The float ``columns`` of ``rows``, one row each (NaN where a value is missing)."""
    return np.array([rows[c].to_numpy() for c in columns], np.float64).reshape(len(columns), rows.num_rows)


def _copy(rows: pa.Table, k: int, values: dict[str, np.ndarray]) -> pa.Table:
    """Copy ``k`` of ``rows``: ``values`` for its numeric columns, ids suffixed ``#aug<k>``, the
    source's id and the augmented flag."""
    columns = {c: pa.array(v, pa.float64(), mask=~np.isfinite(v)) for c, v in values.items()}
    columns[paths.ID] = pc.binary_join_element_wise(rows[paths.ID], f"#aug{k}", "")
    columns[paths.SOURCE_ID] = rows[paths.ID]
    columns[paths.AUGMENTED_FLAG] = pa.array(np.ones(rows.num_rows, bool))
    return pa.Table.from_arrays([columns.get(name, column) for name, column in
                                 zip(rows.column_names, rows.columns)], schema=rows.schema)


POOL_ROWS = 1 << 16
"""Training rows kept to draw interpolation partners from (all of them in a smaller table)."""


class _Pool:
    """The first pass of ``stream``: the partner pool, a uniform sample of at most ``POOL_ROWS``
    training rows with a class (those whose key has the smallest hash: the same sample for any
    batch size or row order), grouped by class; and each numeric feature's std over it, the
    noise's scale."""

    def __init__(self, params: Params, n_columns: int, n_numeric: int):
        tasks = params.data.tasks
        name = params.augment.interpolate_task or next(
            (n for n, t in tasks.items() if t.kind in ("binary", "multiclass")), None)
        self.label = tasks[name].target if name else None  # the column whose class pairs rows
        self.keys, self.classes = np.zeros(0), np.zeros(0, object)
        self.values = np.zeros((n_columns, 0))
        self.scale = np.zeros(n_numeric)
        self.names = pa.array([], pa.string())  # the classes in the pool, and their rows' ranges
        self.starts = self.ends = np.zeros(0, np.int64)

    @classmethod
    def read(cls, scan: Scan, params: Params, columns: list[str], n_numeric: int) -> _Pool:
        pool = cls(params, len(columns), n_numeric)
        kept = list(dict.fromkeys([paths.ID, *columns, *([pool.label] if pool.label else [])]))
        for batch in scan.batches(kept):
            pool._sample(pa.Table.from_batches([batch]), columns, params.augment.seed)
        classes = pool.classes.astype(str)
        order = np.lexsort((pool.keys, classes))
        classes, pool.values = classes[order], pool.values[:, order]
        names, pool.starts = np.unique(classes, return_index=True)
        pool.names, pool.ends = pa.array(names, pa.string()), np.append(pool.starts[1:], len(classes))
        numeric = pool.values[:n_numeric]
        if numeric.size:  # the std over the pool (all training rows with a class, up to POOL_ROWS)
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a column without a value: 0
                pool.scale = np.nan_to_num(np.nanstd(numeric, axis=1))
        return pool

    def _sample(self, rows: pa.Table, columns: list[str], seed: int) -> None:
        """Keep the ``POOL_ROWS`` training rows seen so far whose keys hash smallest (a row
        without a class stays out: it is its own partner)."""
        keys = splitmix64_unit(rows[paths.ID], f"augment:{seed}")
        keep = (rows[self.label].is_valid().to_numpy(zero_copy_only=False) if self.label
                else np.ones(len(keys), bool))
        if len(self.keys) == POOL_ROWS:  # a full pool: only the rows that enter it
            keep &= keys < self.keys.max()
        new = np.flatnonzero(keep)
        classes = (rows[self.label].take(new).to_numpy(zero_copy_only=False) if self.label
                   else np.full(len(new), "", object))
        keys = np.concatenate([self.keys, keys[new]])
        classes = np.concatenate([self.classes, classes])
        values = np.concatenate([self.values, _matrix(rows.take(new), columns)], axis=1)
        keep = np.argpartition(keys, POOL_ROWS)[:POOL_ROWS] if len(keys) > POOL_ROWS else slice(None)
        self.keys, self.classes, self.values = keys[keep], classes[keep], values[:, keep]

    def partners(self, rows: pa.Table, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The values of a partner of each row of ``rows`` (values ``x``): the pool row of its
        class at ``u`` (uniform in [0, 1)); the row itself when its class is not in the pool."""
        if self.label is None:  # one class, "", in the pool unless it is empty
            code = np.full(rows.num_rows, 0 if len(self.names) else -1)
        else:
            code = pc.index_in(rows[self.label], value_set=self.names).fill_null(-1).to_numpy()
        found = code >= 0
        if not found.any():
            return x
        start, size = self.starts[code[found]], self.ends[code[found]] - self.starts[code[found]]
        out = x.copy()
        out[:, found] = self.values[:, start + (u[found] * size).astype(np.int64)]
        return out
