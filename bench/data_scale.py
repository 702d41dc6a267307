"""Data stages at scale, against DuckDB and Polars doing the same work in the same run.

    python bench/data_scale.py [--rows 10000000] [--formats parquet,csv] [--table /tmp/syn-10000000.parquet]
                               [--before REV]

Makes the synthetic 50-column table with ``bench/synthetic.py`` (or reuses ``--table``), and its
CSV copy for ``csv``. For each input format, in a temporary project, it runs as subprocesses,
each under ``/usr/bin/time`` for wall time, CPU time and peak RSS:

- ``mtl ingest``, ``mtl augment --set augment.copies=0`` and ``mtl split`` (``split.hash:
  splitmix64``): the source in, three Parquet files out;
- the same work in DuckDB (one ``COPY ... PARTITION_BY``) and in Polars (three lazy Parquet
  sinks collected together, one scan): the source read, the id hashed, rows split 65/15/20,
  three Parquet files (snappy) written; neither checks, converts or records a schema;
- for Parquet, the bare pass (the table read and written back by pyarrow, as the stages write:
  the I/O floor of one pass), and ``mtl augment`` with ``augment.copies=1``;
- with ``--before REV``, the three stages of an earlier revision (its ``mtl`` package, from
  ``git archive``) first, in the same run.

Prints a Markdown table and writes bench/results/data-scale-<host>.json. Needs duckdb and polars
(the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from bench.synthetic import TASKS
from bench.synthetic import write as write_synthetic
from mtl.io import BATCH_ROWS, NULL_VALUES

BASELINE = f"""
import sys, pyarrow as pa, pyarrow.parquet as pq
source = pq.ParquetFile(sys.argv[1], pre_buffer=False)
dictionary = [f.name for f in source.schema_arrow if not pa.types.is_floating(f.type)]
with pq.ParquetWriter(sys.argv[2], source.schema_arrow, use_dictionary=dictionary) as writer:
    for batch in source.iter_batches(batch_size={BATCH_ROWS}):
        writer.write_table(pa.Table.from_batches([batch]))
"""
DUCKDB = f"""
import sys, duckdb
source, out = sys.argv[1], sys.argv[2]
read = (f"read_parquet('{{source}}')" if source.endswith(".parquet")
        else f"read_csv('{{source}}', nullstr={NULL_VALUES!r})")
duckdb.sql(f'''COPY (SELECT * EXCLUDE (u), CASE WHEN u < 0.2 THEN 'test' WHEN u < 0.35 THEN 'val'
                     ELSE 'train' END AS split
               FROM (SELECT *, hash(CAST(id AS VARCHAR) || 'mtl') / 18446744073709551616.0 AS u
                     FROM {{read}}))
               TO '{{out}}' (FORMAT parquet, COMPRESSION snappy, PARTITION_BY (split))''')
"""
POLARS = f"""
import sys, polars as pl
source, out = sys.argv[1], sys.argv[2]
frame = (pl.scan_parquet(source) if source.endswith(".parquet")
         else pl.scan_csv(source, null_values={NULL_VALUES!r}))
u = pl.col("id").cast(pl.String).hash(0) / 2.0**64
frame = frame.with_columns(u.alias("u"))
splits = {{"test": pl.col("u") < 0.2, "val": (pl.col("u") >= 0.2) & (pl.col("u") < 0.35),
           "train": pl.col("u") >= 0.35}}
pl.collect_all([frame.filter(rows).drop("u").sink_parquet(f"{{out}}/{{name}}.parquet", compression="snappy",
                                                          lazy=True, mkdir=True)
                for name, rows in splits.items()])
"""
STAGES = (("mtl ingest", ["ingest"]), ("mtl augment (copies 0)", ["augment", "--set", "augment.copies=0"]),
          ("mtl split", ["split"]))


def timed(args: list[str], cwd: Path, code: Path = REPO) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command, from
    /usr/bin/time; ``code``: where the ``mtl`` package it imports lies. The page cache is
    flushed first: a command would otherwise pay for writing back the last one's output."""
    env = os.environ | {"PYTHONPATH": str(code)}
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        start = time.perf_counter()
        subprocess.run(["nice", "-n", "10", "/usr/bin/time", "-o", out.name, "-f", "%e %M %U %S", *args],
                       cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        _, rss_kb, user, system = out.read().split()
    return {"wall_s": round(wall, 2), "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_mib": round(int(rss_kb) / 1024)}


def package(rev: str, root: Path) -> Path:
    """``rev``'s ``mtl`` package, extracted under ``root``."""
    archive = subprocess.run(["git", "archive", rev, "mtl"], cwd=REPO, capture_output=True, check=True).stdout
    root.mkdir(parents=True)
    subprocess.run(["tar", "-x"], input=archive, cwd=root, check=True)
    return root


def project(root: Path, source: Path) -> Path:
    """A project whose params read ``source`` with its three tasks (and train two variants)."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"source": str(source), "id_column": "id",
                      "tasks": {name: {"kind": kind, "target": name} for name, kind in TASKS.items()}}
    params["variants"] = {name: params["variants"][name] for name in ("stl", "hps-ew")}
    params["split"]["hash"] = "splitmix64"  # the vectorised split hash, meant for tables this size
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def csv_copy(table: Path) -> Path:
    """The CSV file of the Parquet ``table`` (written batch by batch, once)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = table.with_suffix(".csv")
    if not out.exists():
        source = pq.ParquetFile(table)
        with pacsv.CSVWriter(str(out) + ".tmp", source.schema_arrow) as writer:
            for batch in source.iter_batches(batch_size=BATCH_ROWS):
                writer.write_batch(batch)
        Path(str(out) + ".tmp").rename(out)
    return out


def run_format(source: Path, tmp: Path, parquet: bool, before: Path | None) -> dict[str, dict]:
    """The runs on one input file, in a project under ``tmp`` (removed afterwards), each printed
    as it ends."""
    runs = {}

    def run(name: str, args: list[str], cwd: Path, code: Path = REPO) -> None:
        runs[name] = timed(args, cwd, code)
        print(f"{source.suffix[1:]}: {name}: {runs[name]}", flush=True)

    mtl = [sys.executable, "-m", "mtl"]
    if before is not None:
        old = project(tmp / "before", source)
        for name, args in STAGES:
            run(f"before: {name}", [*mtl, *args], old, before)
        shutil.rmtree(old)
    root = project(tmp / "project", source)
    for name, args in STAGES:
        run(name, [*mtl, *args], root)
    if parquet:
        run("mtl augment (copies 1)", [*mtl, "augment", "--set", "augment.copies=1"], root)
    shutil.rmtree(root)
    for name, script in (("duckdb", DUCKDB), ("polars", POLARS)):
        run(name, [sys.executable, "-c", script, str(source), str(tmp / name)], tmp)
        shutil.rmtree(tmp / name)
    if parquet:
        run("pyarrow read + write (one pass)", [sys.executable, "-c", BASELINE, str(source),
                                                str(tmp / "copy.parquet")], tmp)
        (tmp / "copy.parquet").unlink()
    return runs


def summary(runs: dict[str, dict], rows: int) -> dict:
    """ingest + augment (copies 0) + split against DuckDB and Polars (and the earlier revision)."""
    stages = sum(runs[name]["wall_s"] for name, _ in STAGES)
    cpu = sum(runs[name]["cpu_s"] for name, _ in STAGES)
    out = {"stages_wall_s": round(stages, 2), "stages_cpu_s": round(cpu, 1),
           "stages_rows_per_s": round(rows / stages),
           "vs_duckdb": round(stages / runs["duckdb"]["wall_s"], 2),
           "vs_duckdb_cpu": round(cpu / runs["duckdb"]["cpu_s"], 2),
           "vs_polars": round(stages / runs["polars"]["wall_s"], 2),
           "stages_peak_rss_mib": max(runs[name]["peak_rss_mib"] for name, _ in STAGES)}
    if f"before: {STAGES[0][0]}" in runs:
        out["vs_before"] = round(stages / sum(runs[f"before: {name}"]["wall_s"] for name, _ in STAGES), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--formats", default="parquet,csv", help="input formats, comma-separated")
    parser.add_argument("--table", type=Path, help="the synthetic table (made if missing)")
    parser.add_argument("--before", help="an earlier revision whose stages to run first, in the same run")
    args = parser.parse_args()
    table = args.table or Path(tempfile.gettempdir()) / f"syn-{args.rows}.parquet"
    if not table.exists():
        print(f"writing {table} ...", flush=True)
        write_synthetic(args.rows, str(table))
    formats = args.formats.split(",")
    sources = {fmt: table if fmt == "parquet" else csv_copy(table) for fmt in formats}
    measured = Machine()
    with tempfile.TemporaryDirectory(dir=table.parent) as tmp:
        before = package(args.before, Path(tmp) / "before-code") if args.before else None
        runs = {fmt: run_format(source, Path(tmp), fmt == "parquet", before) for fmt, source in sources.items()}
    machine = measured.finish()  # the runs are its children, not other load
    for fmt_runs in runs.values():
        for run in fmt_runs.values():
            run["rows_per_s"] = round(args.rows / run["wall_s"])
    summaries = {fmt: summary(fmt_runs, args.rows) for fmt, fmt_runs in runs.items()}

    print(f"\nData stages on {machine['cpu']}, {machine['cores']} cores; {args.rows:,} rows x 50 columns\n")
    print("| input | run | wall s | CPU s | rows/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for fmt, fmt_runs in runs.items():
        for name, run in fmt_runs.items():
            print(f"| {fmt} | {name} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['rows_per_s']:,} | "
                  f"{run['peak_rss_mib']:,} |")
    for fmt, s in summaries.items():
        print(f"\n{fmt}: ingest + augment (copies 0) + split {s['stages_wall_s']:.1f} s, "
              f"{s['stages_rows_per_s']:,} rows/s, {s['vs_duckdb']:.2f}x DuckDB ({s['vs_duckdb_cpu']:.2f}x its "
              f"CPU time), {s['vs_polars']:.2f}x Polars, peak RSS {s['stages_peak_rss_mib']:,} MiB"
              + (f", {s['vs_before']:.2f}x {args.before}" if "vs_before" in s else ""))
    print(f"\nLoad average {machine['load_average_before']:.2f} before, {machine['load_average_after']:.2f} "
          f"after; other processes kept {machine['other_load_cores']} cores busy; total {machine['total_s']} s.")
    save_result("data-scale", {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "batch_rows": BATCH_ROWS, "runs": runs, "summary": summaries})


if __name__ == "__main__":
    main()
