"""Torch's CPU threads against training speed, on an idle machine and on a busy one.

    python bench/threads.py [--threads 1 2] [--repeats 5]

Three models train through ``mtl.engine.trainer.fit`` (hps + ew, AdamW):

- small: a penguins-like MLP, 460 rows, batch 32, a [64, 64] trunk with [32] towers;
- large: a wide MLP, batch 4,096, a [512, 512] trunk with [32] towers;
- cnn: MultiFashion's image encoder (3x3 convolutions of 16 and 32 channels on 36x36 images),
  batch 128, a [128] trunk with [64] towers, two 10-class tasks.

Each thread count (``torch.set_num_threads``) trains a fixed number of steps after an untimed
warm-up, ``--repeats`` times with the thread counts in rotating order; the table gives the
median time per step. "Busy" runs the same with one busy-loop process per core, started by
this script, so the load is the same on every run: the situation of a stage that shares the
machine with other stages or jobs. Other processes' load is measured (``Machine``) and
reported, without the script's own busy loops.

Prints a Markdown table and writes bench/results/threads-<host>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import MIXED, Machine, save_result, synthetic
from mtl.engine import archs, weighting
from mtl.engine.encoders import TabularEncoder
from mtl.engine.image import SmallCNN
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit

IMAGE_TASKS = [Task(side, "multiclass", side, classes=tuple("0123456789")) for side in ("left", "right")]


class ImageEncoder(nn.Module):
    """The image part of ``FeatureEncoder`` alone: [N, 1, 36, 36] -> [N, 64]."""

    def __init__(self):
        super().__init__()
        self.cnn, self.out_dim = SmallCNN(1, (36, 36), (16, 32), 64), 64

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cnn(inputs["image"])


def images(rows: int) -> TaskData:
    g = torch.Generator().manual_seed(0)
    targets = {t.name: torch.randint(0, 10, (rows,), generator=g) for t in IMAGE_TASKS}
    return TaskData({"image": torch.rand(rows, 1, 36, 36, generator=g)}, targets,
                    {name: torch.ones(rows, dtype=torch.bool) for name in targets})


# name -> (description, tasks, data, model builder, batch, epochs per measurement)
MODELS = {
    "small": ("penguins-like MLP [64, 64], batch 32", MIXED, lambda: synthetic(460, MIXED),
              lambda: archs.build("hps", lambda: TabularEncoder(32, []), MIXED, [64, 64], [32], 0.0),
              32, 8),
    "large": ("MLP [512, 512], batch 4,096", MIXED, lambda: synthetic(4096 * 4, MIXED),
              lambda: archs.build("hps", lambda: TabularEncoder(32, []), MIXED, [512, 512], [32], 0.0),
              4096, 2),
    "cnn": ("image CNN 16-32 channels, 36x36, batch 128", IMAGE_TASKS, lambda: images(128 * 12),
            lambda: archs.build("hps", ImageEncoder, IMAGE_TASKS, [128], [64], 0.0), 128, 1),
}


def step_ms(name: str, data: TaskData, epochs: int | None = None) -> float:
    """Milliseconds per training step of model ``name`` at torch's current thread count."""
    _, tasks, _, build, batch, default_epochs = MODELS[name]
    epochs = epochs or default_epochs
    torch.manual_seed(0)
    model, ew = build(), weighting.build("ew", [t.name for t in tasks])
    options = FitOptions(epochs=epochs, batch_size=batch, lr=1e-3, progress=False)
    start = time.perf_counter()
    fit(model, tasks, ew, data, data.take(torch.arange(0)), options)
    return 1e3 * (time.perf_counter() - start) / (epochs * -(-len(data) // batch))


def measure(threads: list[int], repeats: int) -> dict:
    """{model: {threads: median ms per step}}, thread counts in rotating order per repeat."""
    result = {}
    for name in MODELS:
        data = MODELS[name][2]()
        times: dict[int, list[float]] = {t: [] for t in threads}
        for t in threads:  # warm-up
            torch.set_num_threads(t)
            step_ms(name, data.take(torch.arange(2 * MODELS[name][4])), epochs=1)
        for r in range(repeats):
            for t in threads[r % len(threads):] + threads[:r % len(threads)]:
                torch.set_num_threads(t)
                times[t].append(step_ms(name, data))
        result[name] = {t: statistics.median(v) for t, v in times.items()}
    return result


def busy(cores: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]


def run(threads: list[int], repeats: int, load: bool) -> tuple[dict, dict]:
    """The measurements and the machine's record, with ``load``: a busy loop per core."""
    machine = Machine()
    loops = busy(len(os.sched_getaffinity(0))) if load else []
    try:
        result = measure(threads, repeats)
    finally:
        for p in loops:
            p.terminate()
            p.wait()
    info = machine.finish()
    info |= {"busy_loops": len(loops), "busy_loop_cores": info.pop("children_cores")}
    return result, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    idle, idle_machine = run(args.threads, args.repeats, load=False)
    loaded, busy_machine = run(args.threads, args.repeats, load=True)

    m = idle_machine
    print(f"Threads on {m['cpu']}, {m['cores']} cores, torch {m['torch']}; median ms per step "
          f"of {args.repeats} runs, and the ratio to {args.threads[0]} thread(s)\n")
    cells = [f"{state} {t} thr ms" for state in ("idle", "busy") for t in args.threads]
    print("| model | " + " | ".join(cells) + " | idle ratios | busy ratios |")
    print("|---|" + "---|" * (len(cells) + 2))
    for name, (description, *_rest) in MODELS.items():
        row = [f"{r[name][t]:.2f}" for r in (idle, loaded) for t in args.threads]
        ratios = [" / ".join(f"{r[name][t] / r[name][args.threads[0]]:.2f}" for t in args.threads)
                  for r in (idle, loaded)]
        print(f"| {name}: {description} | " + " | ".join(row + ratios) + " |")
    for state, info in (("idle", idle_machine), ("busy", busy_machine)):
        print(f"\n{state}: {info['total_s']} s; other processes kept {info['other_load_cores']:.2f} "
              f"cores busy on average, the script's busy loops {info['busy_loop_cores']:.2f} "
              f"(load average {info['load_average_before']:.2f} before, "
              f"{info['load_average_after']:.2f} after).")
    save_result("threads", {"args": vars(args),
                            "idle": {"machine": idle_machine, "ms_per_step": idle},
                            "busy": {"machine": busy_machine, "ms_per_step": loaded}})


if __name__ == "__main__":
    main()
