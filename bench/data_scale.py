"""Data stages at scale: ingest, augment and split of a synthetic 10 M-row × 50-column table.

    python bench/data_scale.py [--rows 10000000] [--aug-rows 1000000] [--table /tmp/syn-10000000.parquet]

Makes the table with ``bench/synthetic.py`` (or reuses ``--table``), then in a temporary
project runs ``mtl ingest``, ``mtl augment --set augment.copies=0`` and ``mtl split`` as
subprocesses, each under ``/usr/bin/time`` for its wall time and peak RSS. The bare baseline,
run the same way: the table read row group by row group (``ParquetFile.iter_batches``, as the
stages read) and written back with ``ParquetWriter`` (same batch size, row groups and encodings
as the stages: the I/O floor of one pass). Then, on
``--aug-rows`` rows, ``mtl augment`` with ``augment.copies=1``. Prints a Markdown table and
writes bench/results/data-scale-<host>.json.
"""

from __future__ import annotations

import argparse
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
from mtl.io import BATCH_ROWS

MTL = Path(sys.executable).parent / "mtl"
BASELINE = f"""
import sys, pyarrow as pa, pyarrow.parquet as pq
source = pq.ParquetFile(sys.argv[1], pre_buffer=False)
dictionary = [f.name for f in source.schema_arrow if not pa.types.is_floating(f.type)]
with pq.ParquetWriter(sys.argv[2], source.schema_arrow, use_dictionary=dictionary) as writer:
    for batch in source.iter_batches(batch_size={BATCH_ROWS}):
        writer.write_table(pa.Table.from_batches([batch]))
"""


def timed(args: list[str], cwd: Path) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%e %M %U %S", *args], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        _, rss_kb, user, system = out.read().split()
    return {"wall_s": round(wall, 2), "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_mib": round(int(rss_kb) / 1024)}


def project(root: Path, table: Path) -> Path:
    """A project whose params read ``table`` with its three tasks (and train two variants)."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"source": str(table), "id_column": "id",
                      "tasks": {name: {"kind": kind, "target": name} for name, kind in TASKS.items()}}
    params["variants"] = {name: params["variants"][name] for name in ("stl", "hps-ew")}
    params["split"]["hash"] = "splitmix64"  # the vectorised split hash, meant for tables this size
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--aug-rows", type=int, default=1_000_000)
    parser.add_argument("--table", type=Path, help="the synthetic table (made if missing)")
    args = parser.parse_args()
    table = args.table or Path(tempfile.gettempdir()) / f"syn-{args.rows}.parquet"
    if not table.exists():
        print(f"writing {table} ...", flush=True)
        write_synthetic(args.rows, str(table))
    measured = Machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = project(Path(tmp) / "big", table)
        runs = {"baseline": timed([sys.executable, "-c", BASELINE, str(table), str(Path(tmp) / "copy.parquet")], root)}
        (Path(tmp) / "copy.parquet").unlink()
        for stage, extra in (("ingest", []), ("augment", ["--set", "augment.copies=0"]), ("split", [])):
            runs[stage] = timed([str(MTL), stage, *extra], root)
        small = Path(tmp) / f"syn-{args.aug_rows}.parquet"
        write_synthetic(args.aug_rows, str(small))
        root = project(Path(tmp) / "small", small)
        runs["baseline_small"] = timed([sys.executable, "-c", BASELINE, str(small), str(Path(tmp) / "c.parquet")], root)
        runs["ingest_small"] = timed([str(MTL), "ingest"], root)
        runs["augment_copies_1"] = timed([str(MTL), "augment", "--set", "augment.copies=1"], root)
    machine = measured.finish()  # the stages it ran are its children, not other load
    for name, run in runs.items():
        rows = args.aug_rows if name.endswith(("_small", "_1")) else args.rows
        run |= {"rows": rows, "rows_per_s": round(rows / run["wall_s"]),
                "vs_baseline": round(run["wall_s"] / runs["baseline_small" if rows != args.rows else "baseline"]["wall_s"], 2)}
    both = runs["ingest"]["wall_s"] + runs["split"]["wall_s"]
    summary = {"ingest_split_rows_per_s": round(args.rows / both),
               "ingest_split_vs_two_baselines": round(both / (2 * runs["baseline"]["wall_s"]), 2),
               "peak_rss_mib": max(runs[s]["peak_rss_mib"] for s in ("ingest", "augment", "split"))}

    print(f"\nData stages on {machine['cpu']}, {machine['cores']} cores; table {table} "
          f"({args.rows:,} rows x 50 columns)\n")
    print("| run | rows | wall s | CPU s | rows/s | peak RSS MiB | × baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['rows']:,} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['rows_per_s']:,} | "
              f"{run['peak_rss_mib']:,} | {run['vs_baseline']:.2f} |")
    print(f"\ningest + split: {summary['ingest_split_rows_per_s']:,} rows/s, "
          f"{summary['ingest_split_vs_two_baselines']:.2f}× two baseline passes; peak RSS "
          f"{summary['peak_rss_mib']:,} MiB. Load average {machine['load_average_before']:.2f} before, "
          f"{machine['load_average_after']:.2f} after; total {machine['total_s']} s.")
    save_result("data-scale", {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                            "batch_rows": BATCH_ROWS, "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
