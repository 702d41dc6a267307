"""Engine speed on CPU: the trainer against a bare PyTorch loop, and every weighting against ew.

    python bench/engine.py [--rows 200000] [--repeats 9] [--method-steps 40] [--method-repeats 5]

(a) One epoch of hps + ew through ``mtl.engine.trainer.fit`` and through a hand-written loop
with the same model, task losses, data, batch order, batch size and optimizer (AdamW), in
turns (the order rotates each repeat); the median of the per-repeat time ratios is reported.
(a') The same on issue 19's toy, where fixed per-step and per-epoch costs show: batch 64,
``--toy-epochs`` epochs of ``--toy-rows`` rows, each followed by an evaluation (task losses and
metrics) on ``--toy-val`` rows.
The bare loop runs twice: with torch's default AdamW (what one writes by hand) and with the
fused AdamW the trainer uses, which isolates the trainer's own overhead.
(b) Per weighting method, the time of a training step relative to ew, for K = 2, 4 and 8
regression tasks: ``--method-steps`` steps through ``fit`` right after as many steps of ew (so
that each ratio compares runs made under the same machine load), after an untimed warm-up,
repeated ``--method-repeats`` times with the methods in rotating order; medians of the ratios.

Prints Markdown tables and writes bench/results/engine-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtl.engine import WEIGHTING_OPTIONS, WEIGHTINGS, archs, weighting
from mtl.engine.encoders import TabularEncoder
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit

FEATURES, BATCH, HIDDEN, HEAD, LR = 32, 512, [64, 64], [32], 1e-3
TOY_BATCH = 64  # issue 19's toy: the many small steps of tabular training
MIXED = [Task("kind", "multiclass", "kind", classes=("a", "b", "c", "d")),
         Task("flag", "binary", "flag", classes=("no", "yes")),
         Task("size", "regression", "size")]


def synthetic(rows: int, tasks: list[Task], seed: int = 0) -> TaskData:
    """Numeric features and targets that depend on them; 10% of each task's labels missing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=g)
    scores = x @ torch.randn(FEATURES, len(tasks), generator=g)
    targets, masks = {}, {}
    for i, t in enumerate(tasks):
        s = scores[:, i].contiguous()
        if t.kind == "multiclass":
            targets[t.name] = torch.bucketize(s, torch.tensor([-1.0, 0.0, 1.0]))
        elif t.kind == "binary":
            targets[t.name] = (s > 0).float()
        else:
            targets[t.name] = s + 0.1 * torch.randn(rows, generator=g)
        masks[t.name] = torch.rand(rows, generator=g) > 0.1
    return TaskData({"num": x, "cat": torch.zeros(rows, 0, dtype=torch.long)}, targets, masks)


def hps(tasks: list[Task]) -> torch.nn.Module:
    torch.manual_seed(0)
    return archs.build("hps", lambda: TabularEncoder(FEATURES, []), tasks, HIDDEN, HEAD, 0.0)


def options(**kw) -> FitOptions:
    return FitOptions(**({"epochs": 1, "batch_size": BATCH, "lr": LR, "progress": False} | kw))


def trainer_epoch(tasks: list[Task], data: TaskData, empty: TaskData, batch: int = BATCH,
                  build: Callable[[list[Task]], torch.nn.Module] = hps, epochs: int = 1) -> float:
    """Seconds of ``epochs`` epochs through ``fit``, validating on ``empty`` (if it has rows)."""
    model, ew = build(tasks), weighting.build("ew", [t.name for t in tasks])
    start = time.perf_counter()
    fit(model, tasks, ew, data, empty, options(batch_size=batch, epochs=epochs))
    return time.perf_counter() - start


def bare_epoch(tasks: list[Task], data: TaskData, fused: bool, batch: int = BATCH,
               build: Callable[[list[Task]], torch.nn.Module] = hps, epochs: int = 1,
               val: TaskData | None = None) -> float:
    """What one would write by hand: index the tensors, sum the task losses, AdamW; after each
    epoch, with ``val``, its task losses and metrics (the trainer's evaluation, without model
    selection)."""
    model = build(tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=fused or None)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(len(data), generator=generator).split(batch):
            outputs = model({key: value[rows] for key, value in data.inputs.items()})
            loss = sum(t.loss(outputs[t.name], data.targets[t.name][rows], data.masks[t.name][rows])
                       for t in tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if val is not None:
            model.eval()
            with torch.no_grad():
                outputs = model(val.inputs)
                for t in tasks:
                    t.loss(outputs[t.name], val.targets[t.name], val.masks[t.name]).item()
                    t.metrics(outputs[t.name], val.targets[t.name], val.masks[t.name])
    return time.perf_counter() - start


def compare_loops(rows: int, repeats: int, batch: int = BATCH, epochs: int = 1,
                  val_rows: int = 0) -> dict:
    """The trainer against the bare loops: ``epochs`` epochs of ``rows`` rows in batches of
    ``batch``, each followed by an evaluation on ``val_rows`` rows (none if 0)."""
    data, val = synthetic(rows, MIXED), synthetic(val_rows, MIXED, seed=1)
    kw = {"batch": batch, "epochs": epochs}
    loops = {"trainer": lambda d: trainer_epoch(MIXED, d, val, **kw),
             "bare": lambda d: bare_epoch(MIXED, d, fused=False, val=val if val_rows else None, **kw),
             "bare_fused": lambda d: bare_epoch(MIXED, d, fused=True, val=val if val_rows else None,
                                                **kw)}
    for loop in loops.values():  # warm-up
        loop(data.take(torch.arange(min(rows, 20 * batch))))
    names, runs = list(loops), []
    for r in range(repeats):
        times = {name: loops[name](data) for name in names[r % 3:] + names[:r % 3]}
        runs.append(times | {"ratio": times["trainer"] / times["bare"],
                             "ratio_fused": times["trainer"] / times["bare_fused"]})
    return {"rows": rows, "batch": batch, "epochs": epochs, "val_rows": val_rows,
            "steps": -(-rows // batch), "runs": runs,
            **{f"median_{key}": statistics.median(r[key] for r in runs) for key in runs[0]}}


# Every method with its defaults, and the gradient methods that have one at the representation level.
METHODS = [(name, {}) for name in WEIGHTINGS] + [
    (name, {"level": "features"}) for name in WEIGHTINGS if "level" in WEIGHTING_OPTIONS[name]]


def label(name: str, opts: dict) -> str:
    return name + "".join(f" ({k}={v})" for k, v in opts.items())


def method_step(name: str, opts: dict, tasks: list[Task], data: TaskData, empty: TaskData,
                batch: int = BATCH, build: Callable[[list[Task]], torch.nn.Module] = hps) -> float:
    names = [t.name for t in tasks]
    weights = dict.fromkeys(names, 1.0) if name == "static" else None
    model, method = build(tasks), weighting.build(name, names, weights, opts)
    start = time.perf_counter()
    fit(model, tasks, method, data, empty, options(batch_size=batch))
    return (time.perf_counter() - start) / -(-len(data) // batch)


def compare_methods(ks: list[int], steps: int, repeats: int) -> dict:
    results = {}
    for k in ks:
        tasks = [Task(f"t{i}", "regression", f"t{i}") for i in range(k)]
        data = synthetic(steps * BATCH, tasks, seed=k)
        empty = data.take(torch.arange(0))
        warm = data.take(torch.arange(3 * BATCH))
        for name, opts in METHODS:
            method_step(name, opts, tasks, warm, empty)
        times: dict[str, list[tuple[float, float]]] = {label(*m): [] for m in METHODS}
        for r in range(repeats):
            shift = r * len(METHODS) // repeats
            for name, opts in METHODS[shift:] + METHODS[:shift]:
                ew = method_step("ew", {}, tasks, data, empty)
                times[label(name, opts)].append((method_step(name, opts, tasks, data, empty), ew))
        results[k] = {m: {"step_ms": 1e3 * statistics.median(t for t, _ in pairs),
                          "ratio": statistics.median(t / ew for t, ew in pairs)}
                      for m, pairs in times.items()}
    return results


def busy_cpu_s() -> float:
    """CPU seconds the machine has spent busy (steal time included), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (and were waited for)."""
    times = os.times()
    return times.children_user + times.children_system


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def save_result(name: str, result: dict) -> Path:
    """Write ``result`` to ``bench/results/<name>-<host>.json``, the file BENCHMARKS.md cites."""
    out = REPO / "bench" / "results" / f"{name}-{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def load_line(info: dict) -> str:
    """How busy other processes kept the machine during a benchmark (``Machine.finish()``'s info)."""
    return (f"other processes kept {info['other_load_cores']:.2f} cores busy on average (load "
            f"average {info['load_average_before']:.2f} before, {info['load_average_after']:.2f} after)")


class Machine:
    """The machine a torch benchmark runs on, and how busy other processes keep it meanwhile:
    ``info`` at the start, completed by ``finish()``. The benchmark's own child processes (busy
    loops, servers, stages it runs; ended by then) count as ``children_cores``, not as other load."""

    def __init__(self):
        self.info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "torch": str(torch.__version__), "python": platform.python_version(),
                     "load_average_before": os.getloadavg()[0]}
        self._start, self._busy = time.perf_counter(), busy_cpu_s()
        self._own, self._children = own_cpu_s(), children_cpu_s()

    def finish(self) -> dict:
        wall = time.perf_counter() - self._start
        children = (children_cpu_s() - self._children) / wall
        # Cores kept busy by anything but this benchmark: other processes, the hypervisor (steal).
        other = (busy_cpu_s() - self._busy - (own_cpu_s() - self._own)) / wall - children
        self.info |= {"load_average_after": os.getloadavg()[0], "other_load_cores": round(other, 2),
                      "children_cores": round(children, 2), "total_s": round(wall, 1)}
        return self.info


def print_loops(loops: dict) -> dict:
    """The per-repeat table of ``trainer`` against the bare loops; returns the medians."""
    median = {k[7:]: v for k, v in loops.items() if k.startswith("median_")}
    print("| repeat | trainer s | bare loop s | bare loop, fused AdamW s | trainer / bare | "
          "trainer / bare fused |")
    print("|---|---|---|---|---|---|")
    for i, run in enumerate([*loops["runs"], median]):
        print(f"| {i if i < len(loops['runs']) else 'median'} | {run['trainer']:.2f} | {run['bare']:.2f} | "
              f"{run['bare_fused']:.2f} | {run['ratio']:.3f} | {run['ratio_fused']:.3f} |")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--method-steps", type=int, default=40)
    parser.add_argument("--method-repeats", type=int, default=5)
    parser.add_argument("--toy-rows", type=int, default=4096)
    parser.add_argument("--toy-epochs", type=int, default=5)
    parser.add_argument("--toy-val", type=int, default=1024)
    args = parser.parse_args()
    measured = Machine()
    loops = compare_loops(args.rows, args.repeats)
    toy = compare_loops(args.toy_rows, args.repeats, TOY_BATCH, args.toy_epochs, args.toy_val)
    methods = compare_methods([2, 4, 8], args.method_steps, args.method_repeats)
    machine = measured.finish()

    print(f"Engine on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads)\n")
    print(f"(a) One epoch of hps + ew, {loops['rows']} rows x {FEATURES} features, 3 tasks, "
          f"batch {BATCH} ({loops['steps']} steps), AdamW\n")
    print_loops(loops)
    print(f"\n(a') The small-model toy: {toy['epochs']} epochs of {toy['rows']} rows, batch "
          f"{TOY_BATCH} ({toy['steps']} steps an epoch), each epoch followed by an evaluation on "
          f"{toy['val_rows']} rows (the trainer also keeps the best weights)\n")
    print_loops(toy)
    print()
    ks = list(methods)
    print(f"(b) Step time relative to ew (batch {BATCH}, hps {HIDDEN}, K regression tasks; "
          f"median of {args.method_repeats} runs of {args.method_steps} steps)\n")
    print("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for m in methods[ks[0]]:
        cells = [f"{methods[k][m]['ratio']:.2f}× ({methods[k][m]['step_ms']:.1f} ms)" for k in ks]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"\nTotal {machine['total_s']} s; {load_line(machine)}.")
    save_result("engine", {"machine": machine, "args": vars(args), "loops": loops, "toy": toy,
                            "methods": methods})


if __name__ == "__main__":
    main()
