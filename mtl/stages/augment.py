"""augment: the ingested table -> the same rows plus augmented copies of training rows.

Only rows that ``split`` will put in train are copied (their split is known from their key), and
interpolation partners are drawn from training rows of the same class, so nothing of a
validation or test row leaks into training. Each copy records its source row's id.

A copy gets Gaussian noise on its numeric features (``noise`` × the feature's std); a share
``interpolate`` of the copies first moves towards a partner row: x + λ (x_partner − x),
λ ~ U(0, max_lambda), with regression targets interpolated alike and class labels, categorical
features and missing values kept from the source.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mtl import paths
from mtl.config import Params
from mtl.io import read_json, read_table, write_table
from mtl.stages.common import require_columns
from mtl.stages.split import assign


def run(params: Params) -> None:
    table = read_table(paths.INGESTED)
    schema = read_json(paths.SCHEMA)
    require_columns(table, paths.INGESTED, params)
    out = augment(table, schema, params)
    write_table(out, paths.AUGMENTED)
    print(f"augment: {table.num_rows} rows + {out.num_rows - table.num_rows} augmented -> {paths.AUGMENTED}")


def augment(table: pa.Table, schema: dict, params: Params) -> pa.Table:
    cfg = params.augment
    n = table.num_rows
    originals = table.append_column(paths.SOURCE_ID, table[paths.ID]).append_column(
        paths.AUGMENTED_FLAG, pa.array(np.zeros(n, dtype=bool)))
    train_rows = np.flatnonzero(assign(table[paths.ID], params.split) == "train")
    if cfg.copies == 0 or len(train_rows) == 0:
        return originals

    numeric = [name for name, f in schema["features"].items() if f["kind"] == "numeric"]
    regression = [t.target for t in params.data.tasks.values() if t.kind == "regression"]
    values = {c: table[c].to_numpy(zero_copy_only=False).astype("float64") for c in numeric + regression}
    scale = {c: np.nanstd(values[c][train_rows]) if np.isfinite(values[c][train_rows]).any() else 0.0
             for c in numeric}
    classes = _class_of(table, params)
    rng = np.random.default_rng(cfg.seed)

    copies = []
    for k in range(cfg.copies):
        src = train_rows
        partner = _partners(src, classes, train_rows, rng) if cfg.interpolate > 0 else src
        lam = rng.uniform(0, cfg.max_lambda, len(src)) * (rng.random(len(src)) < cfg.interpolate)
        copy = table.take(pa.array(src))
        for c in numeric + regression:
            x, xp = values[c][src], values[c][partner]
            mixed = np.where(np.isfinite(xp), x + lam * (xp - x), x)
            if c in scale:
                mixed = mixed + rng.normal(0.0, 1.0, len(src)) * cfg.noise * scale[c]
            copy = copy.set_column(copy.schema.get_field_index(c), c, pa.array(mixed, pa.float64(),
                                                                               mask=~np.isfinite(mixed)))
        ids = pa.array([f"{i}#aug{k}" for i in copy[paths.ID].to_pylist()], pa.string())
        copy = copy.set_column(copy.schema.get_field_index(paths.ID), paths.ID, ids)
        copies.append(copy.append_column(paths.SOURCE_ID, table[paths.ID].take(pa.array(src)))
                      .append_column(paths.AUGMENTED_FLAG, pa.array(np.ones(len(src), dtype=bool))))
    return pa.concat_tables([originals, *copies])


def _class_of(table: pa.Table, params: Params) -> np.ndarray | None:
    """The class label of each row for the task that pairs rows, or None when there is none."""
    tasks = params.data.tasks
    name = params.augment.interpolate_task or next(
        (n for n, t in tasks.items() if t.kind != "regression"), None)
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
