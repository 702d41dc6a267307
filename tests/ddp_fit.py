"""Trains the same small models with ``fit`` in one process or, under ``torchrun``, in several,
and saves each one's final weights: ``python tests/ddp_fit.py OUT_DIR`` (used by
tests/test_distributed.py)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.engine import archs, distributed, weighting
from mtl.engine.encoders import TabularEncoder
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit

TASKS = [Task("kind", "multiclass", "kind", classes=("a", "b", "c")),
         Task("flag", "binary", "flag", classes=("no", "yes")),
         Task("size", "regression", "size")]
# (name, weighting, its options, accumulate)
CONFIGS = [("ew", "ew", {}, 1), ("ew-accumulate", "ew", {}, 2), ("uw", "uw", {}, 1),
           ("gradnorm", "gradnorm", {}, 1), ("upgrad", "upgrad", {}, 1),
           ("upgrad-features", "upgrad", {"level": "features"}, 1),
           ("mgda-features", "mgda", {"level": "features"}, 1), ("db_mtl", "db_mtl", {}, 1),
           ("nash_mtl", "nash_mtl", {"update_weights_every": 2, "max_norm": 0.5}, 1),
           ("imtl", "imtl", {}, 1)]


def data(rows: int, seed: int) -> TaskData:
    """Targets that depend on 6 numeric features, with a third of each task's labels missing
    (so the processes' slices of a batch hold different numbers of labelled rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g)
    scores = x @ torch.randn(6, 3, generator=g)
    targets = {"kind": torch.bucketize(scores[:, 0].contiguous(), torch.tensor([-0.5, 0.5])),
               "flag": (scores[:, 1] > 0).float(), "size": scores[:, 2].contiguous()}
    masks = {t.name: torch.rand(rows, generator=g) > 0.33 for t in TASKS}
    return TaskData({"num": x, "cat": torch.zeros(rows, 0, dtype=torch.long)}, targets, masks)


def main(out: Path) -> None:
    processes = distributed.launched()
    if processes:
        distributed.start("cpu")
    train, val = data(400, 0), data(100, 1)
    for name, method, options, accumulate in CONFIGS:
        torch.manual_seed(0)
        model = archs.build("hps", lambda: TabularEncoder(6, []), TASKS, [16], [8], 0.0)
        if distributed.world()[1] == 0:
            torch.save(model.state_dict(), out / "initial.pt")
        fit(model, TASKS, weighting.build(method, [t.name for t in TASKS], None, options), train, val,
            FitOptions(epochs=3, batch_size=64, lr=1e-2, accumulate=accumulate, progress=False))
        if distributed.world()[1] == 0:
            torch.save(model.state_dict(), out / f"{name}.pt")
    distributed.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
