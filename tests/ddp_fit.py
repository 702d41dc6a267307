"""Trains the same small models with ``fit`` in one process or, under ``torchrun``, in several,
and saves each one's initial and final parameters: ``python tests/ddp_fit.py OUT_DIR`` (used by
tests/test_distributed.py)."""

import functools
import sys
from pathlib import Path

import torch
from rtdl_num_embeddings import PeriodicEmbeddings, PiecewiseLinearEncoding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.engine import archs, distributed, weighting
from mtl.engine.encoders import Preprocessor, TabularEncoder
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
           ("imtl", "imtl", {}, 1), ("ew-ple", "ew", {}, 1), ("ew-periodic", "ew", {}, 1),
           ("pcgrad-groups", "pcgrad", {}, 1), ("ew-stl-per-task", "ew", {}, 1),
           ("mgda-features-ensemble", "mgda", {"level": "features"}, 1)]
# Architectures other than hps, by config name: ``groups`` (a weighting per group) and ``stl``
# with a member's own widths, learning rate and weight decay (the tuned baseline's); a TabM-mini
# ensemble of 4 members (``train.ensemble``) under MGDA on the shared representation.
ARCHS = {"pcgrad-groups": ("groups", {"options": {"groups": [["kind", "flag"], ["size"]]}}),
         "ew-stl-per-task": ("stl", {"per_task": {"kind": {"hidden": [8], "lr_factor": 2.0,
                                                           "weight_decay": 0.1}}}),
         "mgda-features-ensemble": ("hps", {"ensemble": 4})}
NAMES = [name for name, *_ in CONFIGS] + ["finetune"]

def encoder(name: str) -> TabularEncoder:
    """The 6 numeric features as they are, or (configs ending ``-ple``, ``-periodic``) through
    that numeric encoding."""
    if name.endswith("-ple"):
        return TabularEncoder(6, [], PiecewiseLinearEncoding([torch.linspace(-2, 2, 9)] * 6), 6)
    if name.endswith("-periodic"):
        return TabularEncoder(6, [], PeriodicEmbeddings(6, 8, n_frequencies=8, lite=False), 6)
    return TabularEncoder(6, [])


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


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The learned tensors (not buffers such as the fixed bin edges of ``ple``, nor a
    fine-tuned encoder's frozen layers)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def main(out: Path) -> None:
    processes = distributed.launched()
    if processes:
        distributed.start("cpu")
    train, val = data(400, 0), data(100, 1)
    for name, method, options, accumulate in CONFIGS:
        torch.manual_seed(0)
        arch, layers = ARCHS.get(name, ("hps", {}))
        model = archs.build(arch, functools.partial(encoder, name), TASKS, [16], [8], 0.0, **layers)
        save(model, out / f"{name}-initial.pt")
        fit(model, TASKS, weighting.for_model(model, method, [t.name for t in TASKS], None, options),
            train, val, FitOptions(epochs=3, batch_size=64, lr=1e-2, accumulate=accumulate,
                                   progress=False))
        save(model, out / f"{name}.pt")
    finetune(out)
    distributed.stop()


def finetune(out: Path) -> None:
    """MiniLM with its top layer fine-tuned (test_finetune's table and model), its dropout off
    so that one process and two draw no different masks."""
    from tests.test_finetune import FEATURES, bundle, options, table
    from tests.test_finetune import TASKS as TEXT_TASKS

    rows = table()
    preprocessor = Preprocessor.fit(rows, FEATURES, text="minilm", max_length=16)
    model = bundle(preprocessor).model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    save(model, out / "finetune-initial.pt")
    data = TaskData.from_table(rows, preprocessor, TEXT_TASKS)
    fit(model, TEXT_TASKS, weighting.build("ew", [t.name for t in TEXT_TASKS]), data, data,
        options(epochs=2, lr=1e-2))
    save(model, out / "finetune.pt")


def save(model: torch.nn.Module, path: Path) -> None:
    """The trained tensors of ``model`` (on rank 0 only)."""
    if distributed.world()[1] == 0:
        torch.save(parameters(model), path)

if __name__ == "__main__":
    main(Path(sys.argv[1]))
