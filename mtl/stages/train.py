"""train@<variant>-<seed>: the train and val splits -> a trained model
(``models/<variant>/seed-<seed>/model.pt``) and per-epoch losses, validation metrics and task
weights logged with dvclive (``dvclive/<variant>/seed-<seed>``).

While it trains, the run keeps its checkpoint (written after every epoch) and its logs under
``.mtl/runs/<variant>/seed-<seed>/``, outside every DVC output, stamped with a hash of all its
inputs (params, splits, schema, engine code). A run that was killed, by hand or with
``dvc repro``, resumes there when rerun with the same inputs, with the same result as a run that
was never interrupted (bit-identical on CPU); ``--fresh`` starts over. Only a finished run
moves its model and logs into place, so no DVC output ever holds a partial run.

Under ``torchrun`` (e.g. ``torchrun --nproc-per-node 2 -m mtl train --variant hps-ew``) every
process trains its slice of each batch (``mtl.engine.distributed``); rank 0 alone decides whether
to resume, logs, checkpoints and writes the outputs. Several nodes must share the project
folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from scmrepo.exceptions import SCMError

from mtl import paths
from mtl.config import Params, TrainConfig
from mtl.engine import distributed
from mtl.engine import weighting as weightings
from mtl.engine.affinity import AffinityProbe
from mtl.engine.checkpoint import Bundle
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
from mtl.io import atomic_path, read_json, replace_dir, scan_table, write_json
from mtl.stages import encoded
from mtl.stages.common import require_columns


def run(params: Params, variant: str, seed: int, resume: bool = True) -> None:
    cfg = params.variant_train(variant)
    spec = params.variants[variant]
    schema = read_json(paths.SCHEMA)
    for split in ("train", "val"):
        columns = scan_table(paths.split_path(split)).schema
        require_columns(columns, paths.split_path(split), params)
        missing = [f for f in schema["features"] if f not in columns.names]
        if missing:
            raise UserError(f"{paths.split_path(split)}: feature column '{missing[0]}' from "
                            f"{paths.SCHEMA} is missing (re-run the pipeline from ingest)")

    seed_everything(seed)
    device = select_device(cfg.device)
    if distributed.launched():
        device = distributed.start(device.type) or device
    main = distributed.world()[1] == 0
    try:
        precision = resolve_precision(cfg.precision, device)
    except ValueError as exc:
        raise UserError(f"train.precision: {exc}") from None
    enc = params.encoders
    data_key = encoded.data_fingerprint(params)
    preprocessor, tasks, train, val = encoded.load(params, schema, data_key)
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
    inputs = fingerprint(params, variant, seed, data_key)
    resume = resume and checkpoint.is_file() and stamp.is_file() and stamp.read_text() == inputs
    resume = distributed.from_main(resume)
    if not resume and main:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stamp.write_text(inputs)
    distributed.barrier()
    model = bundle.model.to(device)
    weighting = weighting.to(device)
    train, val = on_device(train, device), val.to(device)

    if resume and main:  # rows logged after the last checkpoint, before the run was stopped
        drop_logged_steps(work / "live", resumed_epoch(checkpoint))
    probe = None  # task relatedness; stl shares nothing to measure it on
    if spec.arch != "stl" and cfg.affinity_batches and main:
        probe = AffinityProbe(tasks, train, cfg.affinity_batches, cfg.batch_size, seed, device)
        if resume and (work / "affinity.json").is_file():
            probe.load_state_dict(read_json(work / "affinity.json"), resumed_epoch(checkpoint))
    try:
        live = Live(str(work / "live"), dvcyaml=False, save_dvc_exp=False, resume=resume) if main else None
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
    if not main:
        return
    live.end()

    bundle.info |= {"epochs_run": result.epochs_run, "best_epochs": result.best_epochs,
                    "resumed_at_epoch": result.resumed_at, "skipped_steps": result.skipped_steps,
                    "device": str(device), "processes": distributed.world()[0],
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


def fingerprint(params: Params, variant: str, seed: int, data_key: str) -> str:
    """SHA-256 of everything a training run depends on: its params, its data (``data_key``:
    ``encoded.data_fingerprint``, of the splits, schema, encoders and engine code) and this
    stage's code."""
    digest = hashlib.sha256(data_key.encode())
    config = {"variant": params.variants[variant].model_dump(), "seed": seed,
              "train": params.variant_train(variant).model_dump()}
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(encoded.file_digest(Path(__file__)))
    return digest.hexdigest()


def on_device(data: TaskData, device: torch.device) -> TaskData:
    """``data`` moved to ``device`` if it takes at most half of the device's free memory (CUDA);
    otherwise, and on the CPU, left memory-mapped, for the trainer to move batch by batch."""
    if device.type == "cpu":
        return data
    if device.type == "cuda" and data.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return data
    return data.to(device)


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
