"""train@<variant>: the train and val splits -> a trained model (``models/<variant>/model.pt``)
and per-epoch losses, validation metrics and task weights logged with dvclive
(``dvclive/<variant>``).

After every epoch the whole training state goes to ``models/<variant>/checkpoint.pt`` (inside
the stage's DVC output, so it is kept with the model); ``mtl train --variant V --resume``
continues from it, with the same result as a run that was never interrupted. ``dvc repro``
always trains from scratch (DVC removes the output before running the stage)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
from dvclive import Live
from scmrepo.exceptions import SCMError

from mtl import paths
from mtl.config import Params, TrainConfig
from mtl.engine import weighting as weightings
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import (
    CheckpointMismatch,
    FitOptions,
    TaskData,
    fit,
    resolve_precision,
    seed_everything,
    select_device,
)
from mtl.errors import UserError
from mtl.io import atomic_path, read_json, read_table, write_json
from mtl.stages.common import require_columns


def run(params: Params, variant: str, resume: bool = False) -> None:
    cfg = params.variant_train(variant)
    spec = params.variants[variant]
    schema = read_json(paths.SCHEMA)
    train_table, val_table = (read_table(paths.split_path(s)) for s in ("train", "val"))
    for split, table in (("train", train_table), ("val", val_table)):
        require_columns(table, paths.split_path(split), params)
        missing = [f for f in schema["features"] if f not in table.column_names]
        if missing:
            raise UserError(f"{paths.split_path(split)}: feature column '{missing[0]}' from "
                            f"{paths.SCHEMA} is missing (re-run the pipeline from ingest)")

    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    try:
        precision = resolve_precision(cfg.precision, device)
    except ValueError as exc:
        raise UserError(f"train.precision: {exc}") from None
    out = paths.model_dir(variant)
    checkpoint = out / "checkpoint.pt"
    resume = resume and checkpoint.exists()
    enc = params.encoders
    preprocessor = Preprocessor.fit(train_table, schema["features"], enc.text, enc.hashing.model_dump())
    tasks = [task_from_schema(name, schema, train_table) for name in params.data.tasks]
    layers = {"hidden": cfg.hidden, "head_hidden": cfg.head_hidden, "dropout": cfg.dropout,
              "options": spec.arch_options}
    info = {"variant": variant, "weighting": spec.weighting, "weights": spec.weights,
            "weighting_options": spec.weighting_options, "train": cfg.model_dump()}
    try:  # an option value the method rejects (e.g. mgda level) is the user's mistake
        bundle = Bundle.create(spec.arch, tasks, preprocessor, layers, info,
                               {"dim": enc.dim, "image_channels": enc.image_channels})
        weighting = weightings.build(spec.weighting, [t.name for t in tasks], spec.weights,
                                     spec.weighting_options)
    except ValueError as exc:
        raise UserError(f"variants.{variant}: {exc}") from None
    model = bundle.model.to(device)
    weighting = weighting.to(device)
    train = TaskData.from_table(train_table, preprocessor, tasks).to(device)
    val = TaskData.from_table(val_table, preprocessor, tasks).to(device)

    try:
        live = Live(str(paths.live_dir(variant)), dvcyaml=False, save_dvc_exp=False, resume=resume)
    except SCMError as exc:  # dvclive 3.49 fails in a git repository without commits
        raise UserError(f"dvclive cannot log here ({exc}): make a first git commit, then re-run") from None

    def log_epoch(epoch: int, values: dict[str, float]) -> None:
        live.step = epoch  # also after resuming
        for key, value in values.items():
            if np.isfinite(value):
                live.log_metric(key, value)
        live.next_step()

    options = FitOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FitOptions)
                            if f.name in TrainConfig.model_fields and f.name != "precision"},
                         precision=precision)
    start = time.perf_counter()
    try:
        result = fit(model, tasks, weighting, train, val, options, on_epoch=log_epoch,
                     checkpoint=checkpoint, resume=resume)
    except CheckpointMismatch as exc:
        raise UserError(f"--resume: {exc}") from None
    seconds = time.perf_counter() - start
    live.end()

    bundle.info |= {"epochs_run": result.epochs_run, "best_epochs": result.best_epochs,
                    "resumed_at_epoch": result.resumed_at, "device": str(device),
                    "precision": precision, "deterministic": cfg.deterministic}
    with atomic_path(out / "model.pt") as tmp:
        bundle.save(tmp)
    write_json(bundle.info | {"train_seconds": round(seconds, 2), "n_train": len(train),
                              "n_val": len(val)}, out / "train.json")
    resumed = f" (resumed at epoch {result.resumed_at})" if resume else ""
    print(f"train@{variant}: {result.epochs_run} epochs{resumed} in {seconds:.1f}s on {device}, "
          f"best epochs {result.best_epochs} -> {out / 'model.pt'}")


def task_from_schema(name: str, schema: dict, train_table: pa.Table) -> Task:
    """The engine's task; a regression target is standardised with train-split statistics."""
    spec = schema["tasks"][name]
    if spec["kind"] != "regression":
        return Task(name, spec["kind"], spec["target"], classes=tuple(spec["classes"]))
    values = train_table[spec["target"]].to_numpy(zero_copy_only=False).astype("float64")
    labelled = values[np.isfinite(values)]
    if len(labelled) == 0:
        raise UserError(f"data.tasks.{name}.target: no labelled row in the train split")
    std = float(labelled.std())
    return Task(name, "regression", spec["target"], mean=float(labelled.mean()), std=std if std > 0 else 1.0)
