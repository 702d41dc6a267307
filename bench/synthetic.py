"""A synthetic multi-task table of any size, written row group by row group in bounded memory.

    python bench/synthetic.py --rows 10000000 --out /tmp/syn.parquet [--seed 0] [--group 262144]

50 columns: ``id`` (int64), 40 numeric features ``x00``…``x39`` (standard normal; ``x00``–``x04``
miss 1% of their values), 6 categorical features ``c0``…``c5`` (8 levels each) and 3 targets
built from a shared part s = x[:, :10] @ w + 0.5 sin(x10) x11 + effect(c0) and a task-specific part:

- ``churn`` (binary "no"/"yes"): s + x[:, 20:25] @ u + logistic noise > 0;
- ``plan`` (multiclass "p0"…"p3"): argmax of four logits, each s·a_k + x[:, 25:30] @ V_k + effect(c1) + Gumbel noise;
- ``spend`` (regression): s + x30² − x31 + 0.3 N(0, 1).

Each target misses 5% of its labels. The coefficients come from ``--seed``; each row group
from its own seeded generator, so the file is the same for the same arguments. A table for
``params.yaml``: ``data: {source: <out>, id_column: id, tasks: {churn: {kind: binary, target:
churn}, plan: {kind: multiclass, target: plan}, spend: {kind: regression, target: spend}}}``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_NUMERIC, N_CATEGORICAL, LEVELS, MISSING_LABELS = 40, 6, 8, 0.05
TASKS = {"churn": "binary", "plan": "multiclass", "spend": "regression"}


def coefficients(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng([seed, 0])
    return {"w": g.normal(0, 0.5, 10), "c0": g.normal(0, 1, LEVELS), "u": g.normal(0, 1, 5),
            "a": g.normal(0, 1, 4), "V": g.normal(0, 1, (5, 4)), "c1": g.normal(0, 1, (LEVELS, 4))}


def row_group(start: int, rows: int, coef: dict[str, np.ndarray], seed: int) -> pa.Table:
    """Rows ``start`` … ``start + rows - 1`` of the table."""
    g = np.random.default_rng([seed, 1, start])
    x = g.standard_normal((rows, N_NUMERIC))
    cat = g.integers(0, LEVELS, (rows, N_CATEGORICAL))
    shared = x[:, :10] @ coef["w"] + 0.5 * np.sin(x[:, 10]) * x[:, 11] + coef["c0"][cat[:, 0]]
    churn = shared + x[:, 20:25] @ coef["u"] + g.logistic(size=rows) > 0
    logits = shared[:, None] * coef["a"] + x[:, 25:30] @ coef["V"] + coef["c1"][cat[:, 1]]
    plan = np.argmax(logits + g.gumbel(size=(rows, 4)), axis=1)
    spend = shared + x[:, 30] ** 2 - x[:, 31] + 0.3 * g.standard_normal(rows)

    def missing(share: float) -> np.ndarray:
        return g.random(rows) < share

    columns: dict[str, pa.Array] = {"id": pa.array(np.arange(start, start + rows))}
    for j in range(N_NUMERIC):
        columns[f"x{j:02d}"] = pa.array(x[:, j], mask=missing(0.01) if j < 5 else None)
    levels = pa.array([f"l{k}" for k in range(LEVELS)])
    for j in range(N_CATEGORICAL):
        columns[f"c{j}"] = levels.take(pa.array(cat[:, j]))
    columns["churn"] = pa.array(np.array(["no", "yes"])[churn.astype(int)], mask=missing(MISSING_LABELS))
    columns["plan"] = pa.array(np.array(["p0", "p1", "p2", "p3"])[plan], mask=missing(MISSING_LABELS))
    columns["spend"] = pa.array(spend, mask=missing(MISSING_LABELS))
    return pa.table(columns)


def write(rows: int, out: str, seed: int = 0, group: int = 1 << 18) -> None:
    coef = coefficients(seed)
    writer = None
    for start in range(0, rows, group):
        table = row_group(start, min(group, rows - start), coef, seed)
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", type=int, default=1 << 18, help="rows per row group")
    args = parser.parse_args()
    write(args.rows, args.out, args.seed, args.group)


if __name__ == "__main__":
    main()
