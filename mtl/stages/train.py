"""train@<variant>-<seed>: the train and val splits -> a trained model
(``models/<variant>/seed-<seed>/model.pt``) and per-epoch losses, validation metrics and task
weights logged with dvclive (``dvclive/<variant>/seed-<seed>``).

While it trains, the run keeps its checkpoint (written after every epoch) and its logs under
``.mtl/runs/<variant>/seed-<seed>/``, outside every DVC output, stamped with a hash of all its
inputs (params, splits, schema, engine code). A run that was killed, by hand or with
``dvc repro``, resumes there when rerun with the same inputs, with the same result as a run that
was never interrupted (bit-identical on CPU); ``--fresh`` starts over. Only a finished run
moves its model and logs into place, so no DVC output ever holds a partial run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from dvclive import Live
from scmrepo.exceptions import SCMError

from mtl import paths
from mtl.config import Params, TrainConfig
from mtl.engine import weighting as weightings
from mtl.engine.affinity import AffinityProbe
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import (
    CheckpointMismatch,
    FitOptions,
    NonFiniteLoss,
    TaskData,
    fit,
    resolve_precision,
    seed_everything,
    select_device,
)
from mtl.errors import UserError
from mtl.io import atomic_path, read_json, read_table, replace_dir, write_json
from mtl.stages.common import require_columns

ENGINE_CODE = Path(__file__).resolve().parents[1] / "engine"


def run(params: Params, variant: str, seed: int, resume: bool = True) -> None:
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

    seed_everything(seed)
    device = select_device(cfg.device)
    try:
        precision = resolve_precision(cfg.precision, device)
    except ValueError as exc:
        raise UserError(f"train.precision: {exc}") from None
    enc = params.encoders
    preprocessor = Preprocessor.fit(train_table, schema["features"], enc.text, enc.hashing.model_dump())
    tasks = [task_from_schema(name, schema, train_table) for name in params.data.tasks]
    layers = {"hidden": cfg.hidden, "head_hidden": cfg.head_hidden, "dropout": cfg.dropout,
              "options": spec.arch_options}
    info = {"variant": variant, "seed": seed, "weighting": spec.weighting, "weights": spec.weights,
            "weighting_options": spec.weighting_options, "train": cfg.model_dump()}
    try:  # an option value the method rejects (e.g. mgda level) is the user's mistake
        bundle = Bundle.create(spec.arch, tasks, preprocessor, layers, info,
                               {"dim": enc.dim, "image_channels": enc.image_channels})
        weighting = weightings.build(spec.weighting, [t.name for t in tasks], spec.weights,
                                     spec.weighting_options)
    except ValueError as exc:
        raise UserError(f"variants.{variant}: {exc}") from None
    work = paths.run_dir(variant, seed)
    checkpoint, stamp = work / "checkpoint.pt", work / "inputs.sha256"
    inputs = fingerprint(params, variant, seed)
    resume = resume and checkpoint.is_file() and stamp.is_file() and stamp.read_text() == inputs
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stamp.write_text(inputs)
    model = bundle.model.to(device)
    weighting = weighting.to(device)
    train = TaskData.from_table(train_table, preprocessor, tasks).to(device)
    val = TaskData.from_table(val_table, preprocessor, tasks).to(device)

    if resume:  # rows logged after the last checkpoint, before the run was stopped
        drop_logged_steps(work / "live", resumed_epoch(checkpoint))
    probe = None  # task relatedness; stl shares nothing to measure it on
    if spec.arch != "stl" and cfg.affinity_batches:
        probe = AffinityProbe(tasks, train, cfg.affinity_batches, cfg.batch_size, seed)
        if resume and (work / "affinity.json").is_file():
            probe.load_state_dict(read_json(work / "affinity.json"), resumed_epoch(checkpoint))
    try:
        live = Live(str(work / "live"), dvcyaml=False, save_dvc_exp=False, resume=resume)
    except SCMError as exc:  # dvclive 3.49 fails in a git repository without commits
        raise UserError(f"dvclive cannot log here ({exc}): make a first git commit, then re-run") from None

    def log_epoch(epoch: int, values: dict[str, float]) -> None:
        if probe is not None:
            values = values | {f"affinity/{kind}/{a.name}/{b.name}": float(matrix[i, j])
                               for kind, matrix in probe.measure(model, values["lr"]).items()
                               for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i != j}
            write_json(probe.state_dict(), work / "affinity.json")
        live.step = epoch
        for key, value in values.items():
            if np.isfinite(value):
                live.log_metric(key, value)
        live.next_step()

    options = FitOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FitOptions)
                            if f.name in TrainConfig.model_fields and f.name != "precision"},
                         seed=seed, precision=precision)
    start = time.perf_counter()
    try:
        result = fit(model, tasks, weighting, train, val, options, on_epoch=log_epoch,
                     checkpoint=checkpoint, resume=resume)
    except CheckpointMismatch as exc:  # the inputs' hash matched, so the checkpoint is corrupt
        raise UserError(f"{checkpoint}: {exc}; rerun with --fresh") from None
    except NonFiniteLoss as exc:
        raise UserError(f"train@{variant}-{seed}: {exc}") from None
    seconds = time.perf_counter() - start
    live.end()

    bundle.info |= {"epochs_run": result.epochs_run, "best_epochs": result.best_epochs,
                    "resumed_at_epoch": result.resumed_at, "skipped_steps": result.skipped_steps,
                    "device": str(device),
                    "precision": precision, "deterministic": cfg.deterministic}
    finished = work / "model"
    finished.mkdir()
    bundle.save(finished / "model.pt")
    write_json(bundle.info | {"train_seconds": round(seconds, 2), "n_train": len(train),
                              "n_val": len(val)}, finished / "train.json")
    if probe is not None:
        write_json(probe.summary(), finished / "affinity.json")
    out = paths.model_dir(variant, seed)
    replace_dir(work / "live", paths.live_dir(variant, seed))
    replace_dir(finished, out)
    shutil.rmtree(work)
    resumed = f" (resumed at epoch {result.resumed_at})" if resume else ""
    print(f"train@{variant}-{seed}: {result.epochs_run} epochs{resumed} in {seconds:.1f}s on "
          f"{device}, best epochs {result.best_epochs} -> {out / 'model.pt'}")


def fingerprint(params: Params, variant: str, seed: int) -> str:
    """SHA-256 of everything a training run depends on: its params, the splits and schema it
    reads, and the engine's source code."""
    digest = hashlib.sha256()
    config = {"variant": params.variants[variant].model_dump(), "seed": seed,
              "train": params.variant_train(variant).model_dump(),
              "encoders": params.encoders.model_dump(),
              "tasks": {k: v.model_dump() for k, v in params.data.tasks.items()}}
    digest.update(json.dumps(config, sort_keys=True).encode())
    files = [paths.split_path("train"), paths.split_path("val"), paths.SCHEMA, Path(__file__),
             *sorted(ENGINE_CODE.glob("*.py"))]
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resumed_epoch(checkpoint: Path) -> int:
    """The first epoch a run resuming from ``checkpoint`` trains."""
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]) + 1


def drop_logged_steps(live_dir: Path, first: int) -> None:
    """Remove the dvclive rows of steps >= ``first`` (logged after the last checkpoint)."""
    for tsv in live_dir.glob("plots/metrics/**/*.tsv"):
        header, *rows = tsv.read_text().splitlines()
        step = header.split("\t").index("step")
        kept = [r for r in rows if int(r.split("\t")[step]) < first]
        with atomic_path(tsv) as tmp:
            tmp.write_text("\n".join([header, *kept]) + "\n")


def task_from_schema(name: str, schema: dict, train_table: pa.Table) -> Task:
    """The engine's task; a regression target is standardised with train-split statistics."""
    spec = schema["tasks"][name]
    if spec["kind"] == "multilabel":
        return Task(name, "multilabel", tuple(spec["target"]), classes=tuple(spec["labels"]))
    if spec["kind"] != "regression":
        return Task(name, spec["kind"], spec["target"], classes=tuple(spec["classes"]))
    values = train_table[spec["target"]].to_numpy(zero_copy_only=False).astype("float64")
    labelled = values[np.isfinite(values)]
    if len(labelled) == 0:
        raise UserError(f"data.tasks.{name}.target: no labelled row in the train split")
    std = float(labelled.std())
    return Task(name, "regression", spec["target"], mean=float(labelled.mean()), std=std if std > 0 else 1.0)
