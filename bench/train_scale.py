"""Training at scale: a 1 M-row, 3-task table, encoded once and read through memory-mapped arrays.

    python bench/train_scale.py [--rows 1000000] [--batch 4096] [--repeats 5]
                                [--method-steps 40] [--method-repeats 3] [--table PATH]

1. The table of ``bench/synthetic.py`` (40 numeric and 6 categorical features; a binary, a
   4-class and a regression task, 5% of each task's labels missing), made or reused (``--table``).
2. The preprocessing is fitted in one streaming pass and the table encoded chunk by chunk into
   ``.npy`` files (``mtl.engine.store``), which training then reads memory-mapped. Reported: the
   time of each pass, the encoded size, and this process's anonymous memory (``RssAnon``: what
   it holds itself, as opposed to file pages the kernel may drop) before and after.
3. (a) One epoch of ``hps`` + ``ew`` through ``mtl.engine.trainer.fit`` against a hand-written
   loop (same model, task losses, memory-mapped tensors, batch order and batch size), with
   torch's default AdamW and with the fused AdamW the trainer uses; in turns, the order rotating
   each repeat; medians of the per-repeat ratios.
4. (b) Per weighting, the step time relative to ``ew`` on the same table's 3 tasks: ``fit`` over
   ``--method-steps`` batches right after as many of ``ew``, repeated with the methods in
   rotating order; gradient methods at the representation level where they have one
   (``level: features``), with the parameter level of ``mgda`` and ``upgrad`` for reference.

The model is ``params.yaml``'s default ``hps``: the feature encoder, a [64, 64] trunk and [32]
towers. Prints Markdown tables and writes bench/results/train-scale-<rows>-<host>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import (
    Machine,
    bare_epoch,
    label,
    method_step,
    print_loops,
    save_result,
    trainer_epoch,
)
from bench.synthetic import write as write_synthetic
from mtl.engine import WEIGHTING_OPTIONS, WEIGHTINGS, archs
from mtl.engine.encoders import FeatureEncoder, Moments, Preprocessor
from mtl.engine.store import encode_split, open_split
from mtl.engine.tasks import Task
from mtl.io import scan_table

HIDDEN, HEAD = [64, 64], [32]


def rss_mib() -> dict[str, float]:
    """This process's resident memory: anonymous (its own) and file-backed (mapped files)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile", "VmHWM")}


def features_and_tasks(table: Path) -> tuple[Preprocessor, list[Task], float]:
    """The preprocessing and tasks fitted on ``table`` in one streaming pass; its seconds."""
    schema = pq.read_schema(table)
    numeric = [f.name for f in schema if f.name.startswith("x")]
    features = {name: {"kind": "numeric", "n_missing": int(name < "x05")} for name in numeric}
    features |= {f.name: {"kind": "categorical", "n_missing": 0} for f in schema if f.name.startswith("c")}
    spend = Moments()

    def chunks():
        for batch in scan_table(table).batches():
            spend.update(batch["spend"].to_numpy(zero_copy_only=False).astype("float64"))
            yield batch

    start = time.perf_counter()
    preprocessor = Preprocessor.fit(chunks(), features)
    tasks = [Task("churn", "binary", "churn", classes=("no", "yes")),
             Task("plan", "multiclass", "plan", classes=("p0", "p1", "p2", "p3")),
             Task("spend", "regression", "spend", mean=spend.mean, std=spend.std)]
    return preprocessor, tasks, time.perf_counter() - start


def loops(data, tasks, build, batch: int, repeats: int) -> dict:
    empty = data.take(torch.arange(0))
    runs = {"trainer": lambda: trainer_epoch(tasks, data, empty, batch, build),
            "bare": lambda: bare_epoch(tasks, data, False, batch, build),
            "bare_fused": lambda: bare_epoch(tasks, data, True, batch, build)}
    warm = data.take(torch.arange(10 * batch))
    trainer_epoch(tasks, warm, empty, batch, build)
    bare_epoch(tasks, warm, True, batch, build)
    names, results = list(runs), []
    for r in range(repeats):
        times = {name: runs[name]() for name in names[r % 3:] + names[:r % 3]}
        results.append(times | {"ratio": times["trainer"] / times["bare"],
                                "ratio_fused": times["trainer"] / times["bare_fused"]})
    return {"runs": results, **{f"median_{key}": statistics.median(r[key] for r in results)
                                for key in results[0]}}


def methods_list() -> list[tuple[str, dict]]:
    listed = []
    for name in WEIGHTINGS:
        listed.append((name, {"level": "features"} if "level" in WEIGHTING_OPTIONS[name] else {}))
        if name in ("mgda", "upgrad"):
            listed.append((name, {"level": "params"}))
    return listed


def methods(data, tasks, build, batch: int, steps: int, repeats: int) -> dict:
    sample = data.take(torch.arange(steps * batch))  # the same rows for every method
    empty = data.take(torch.arange(0))
    listed = methods_list()
    for name, opts in listed:  # warm-up
        method_step(name, opts, tasks, sample.take(torch.arange(2 * batch)), empty, batch, build)
    times: dict[str, list[tuple[float, float]]] = {label(*m): [] for m in listed}
    for r in range(repeats):
        shift = r * len(listed) // repeats
        for name, opts in listed[shift:] + listed[:shift]:
            ew = method_step("ew", {}, tasks, sample, empty, batch, build)
            times[label(name, opts)].append((method_step(name, opts, tasks, sample, empty, batch, build), ew))
    return {m: {"step_ms": 1e3 * statistics.median(t for t, _ in pairs),
                "ratio": statistics.median(t / ew for t, ew in pairs)} for m, pairs in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method-steps", type=int, default=40)
    parser.add_argument("--method-repeats", type=int, default=3)
    parser.add_argument("--table", type=Path, help="reuse this table of bench/synthetic.py")
    args = parser.parse_args()
    measured = Machine()
    with tempfile.TemporaryDirectory(dir=REPO / ".mtl" if (REPO / ".mtl").is_dir() else None) as tmp:
        table = args.table or Path(tmp) / "table.parquet"
        if args.table is None:
            write_synthetic(args.rows, str(table))
        memory = {"start": rss_mib()}
        preprocessor, tasks, fit_s = features_and_tasks(table)
        start = time.perf_counter()
        encode_split(scan_table(table).batches(), preprocessor, tasks, Path(tmp) / "encoded")
        encode_s = time.perf_counter() - start
        data = open_split(Path(tmp) / "encoded")
        rows = len(data)
        encoded_mib = sum(f.stat().st_size for f in (Path(tmp) / "encoded").glob("*.npy")) / 2**20
        memory["encoded"] = rss_mib()
        build = lambda ts: (torch.manual_seed(0), archs.build(
            "hps", lambda: FeatureEncoder(preprocessor), ts, HIDDEN, HEAD, 0.0))[1]
        epoch = loops(data, tasks, build, args.batch, args.repeats)
        memory["trained"] = rss_mib()
        per_method = methods(data, tasks, build, args.batch, args.method_steps, args.method_repeats)
    machine = measured.finish()
    print(f"Training at scale on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); {rows:,} rows, batch {args.batch}\n")
    print(f"Streaming fit {fit_s:.1f} s, encoding {encode_s:.1f} s ({rows / encode_s:,.0f} rows/s) "
          f"into {encoded_mib:.0f} MiB of .npy; RssAnon {memory['start']['RssAnon']:.0f} -> "
          f"{memory['encoded']['RssAnon']:.0f} -> {memory['trained']['RssAnon']:.0f} MiB "
          f"(RssFile after training {memory['trained']['RssFile']:.0f} MiB)\n")
    median = print_loops(epoch)
    print(f"\nSamples/s (median): trainer {rows / median['trainer']:,.0f}, bare loop "
          f"{rows / median['bare']:,.0f}, bare loop with fused AdamW {rows / median['bare_fused']:,.0f}\n")
    print("| method | step time / ew | step ms |")
    print("|---|---|---|")
    for m, r in per_method.items():
        print(f"| {m} | {r['ratio']:.2f}× | {r['step_ms']:.1f} |")
    print(f"\nTotal {machine['total_s']} s; other processes kept {machine['other_load_cores']:.2f} cores busy.")
    save_result(f"train-scale-{rows}", {
        "machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "fit_s": fit_s,
        "encode_s": encode_s, "encoded_mib": encoded_mib, "memory_mib": memory, "epoch": epoch,
        "methods": per_method})


if __name__ == "__main__":
    main()
