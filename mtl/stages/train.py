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

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from scmrepo.exceptions import SCMError
from torch import nn

from mtl import paths
from mtl.config import Params, TrainConfig
from mtl.engine import distributed
from mtl.engine import weighting as weightings
from mtl.engine.affinity import AffinityProbe
from mtl.engine.checkpoint import RUN_STATE, Bundle, NotOurs, load_file
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
from mtl.io import (
    atomic_path,
    check_writable,
    mismatch,
    read_json,
    remove_leftovers,
    replace_dirs,
    temp_dir,
    write_json,
    writing,
)
from mtl.stages import encoded
from mtl.stages.group import read_groups


def run(params: Params, variant: str, seed: int, resume: bool = True) -> None:
    cfg, spec = params.variant_train(variant), params.all_variants[variant]
    schema = encoded.read_inputs(params, ("train", "val"))
    seed_everything(seed)
    device = select_device(cfg.device)
    if distributed.launched():
        device = distributed.start(device.type) or device
    main = distributed.world()[1] == 0
    work = paths.run_dir(variant, seed)
    if main:  # before hours of training, not after
        for folder in (paths.model_dir(variant, seed).parent, paths.live_dir(variant, seed).parent,
                       work.parent):
            check_writable(folder)
    try:
        precision = resolve_precision(cfg.precision, device)
    except ValueError as exc:
        raise UserError(f"train.precision: {exc}") from None
    data_key = encoded.data_fingerprint(params)
    preprocessor, tasks, train, val = encoded.load(params, schema, data_key)
    bundle, weighting = build(params, variant, seed, preprocessor, tasks)
    checkpoint = work / "checkpoint.pt"
    inputs = fingerprint(params, variant, seed, data_key)
    resume = distributed.from_main(main and resume and resumable(work, inputs))
    first = prepare(work, inputs, resume) if main else 0
    distributed.barrier()
    model = bundle.model.to(device)
    weighting = weighting.to(device)
    train, val = on_device(train, device), val.to(device)

    probe = None  # task relatedness; stl shares nothing to measure it on
    if spec.arch != "stl" and cfg.affinity_batches and main:
        probe = AffinityProbe(tasks, train, cfg.affinity_batches, cfg.batch_size, seed, device,
                              cfg.affinity_every)
        if resume and (work / "affinity.json").is_file():
            with run_file(work / "affinity.json"):
                probe.load_state_dict(read_json(work / "affinity.json"), first)
    live, log_epoch = epoch_logger(work, resume, model, tasks, probe) if main else (None, None)
    options = fit_options(cfg, seed, precision)
    start = time.perf_counter()
    try:
        with writing(work):  # a full disk while checkpointing or logging
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
                    "threads": torch.get_num_threads(), "precision": precision,
                    "deterministic": cfg.deterministic, "inputs_sha256": inputs}
    warnings = early_best(variant, seed, result.best_epochs, result.epochs_run)
    stats = {"train_seconds": round(seconds, 2), "n_train": len(train), "n_val": len(val),
             "warnings": warnings}
    publish(work, variant, seed, bundle, stats, probe)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    resumed = f" (resumed at epoch {result.resumed_at})" if resume else ""
    print(f"train@{variant}-{seed}: {result.epochs_run} epochs{resumed} in {seconds:.1f}s on "
          f"{device}, best epochs {result.best_epochs} -> {paths.model_dir(variant, seed) / 'model.pt'}")


def fit_options(cfg: TrainConfig, seed: int, precision: str, progress: bool = True) -> FitOptions:
    """The trainer's options from a ``train`` section."""
    return FitOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FitOptions)
                         if f.name in TrainConfig.model_fields and f.name != "precision"},
                      seed=seed, precision=precision, progress=progress)


def early_best(variant: str, seed: int, best_epochs: dict[str, int], epochs_run: int) -> list[str]:
    """A warning when the best validation epoch came very early: of at least 10 epochs run, the
    first 10% and at most the second (counting from 1). The validation loss then rose for most
    of the run, a sign of overfitting from the start (a short text column with many hash buckets
    does this)."""
    early = {t: b + 1 for t, b in best_epochs.items() if epochs_run >= 10 and b + 1 <= min(2, epochs_run / 10)}
    if not early:
        return []
    tasks = ", ".join(f"{t} at epoch {e}" for t, e in early.items())
    return [(f"train@{variant}-{seed}: the best validation loss came very early ({tasks}; "
            f"{epochs_run} epochs run), so the model overfits almost from the start; try a lower "
            f"train.lr or more train.weight_decay, and with text columns fewer "
            f"encoders.hashing.buckets or a smaller encoders.hashing.dim")]


def epoch_logger(work: Path, resume: bool, model: nn.Module, tasks: list[Task],
                 probe: AffinityProbe | None) -> tuple[Live, Callable[[int, dict[str, float]], None]]:
    """dvclive's logger of the run in ``work``, and the callback that logs each epoch's values
    to it, with the task affinity ``probe`` measures."""
    try:
        live = Live(str(work / "live"), dvcyaml=False, save_dvc_exp=False, resume=resume)
    except SCMError as exc:  # dvclive 3.49 fails in a git repository without commits
        raise UserError(f"dvclive cannot log here ({exc}): make a first git commit, then re-run") from None

    def log_epoch(epoch: int, values: dict[str, float]) -> None:
        if probe is not None and probe.due(epoch):
            values = values | {f"affinity/{kind}/{a.name}/{b.name}": float(matrix[i, j])
                               for kind, matrix in probe.measure(model, values["lr"], epoch).items()
                               for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i != j}
            write_json(probe.state_dict(), work / "affinity.json")
        # No next_step: it re-reads every logged series each epoch; end() writes the summary.
        live.step = epoch
        for key, value in values.items():
            if np.isfinite(value):
                live.log_metric(key, value)

    return live, log_epoch


def member_settings(cfg: TrainConfig, per_task: dict[str, dict]) -> dict[str, dict]:
    """``stl``'s per-task settings as its members take them: the learning rate as a factor of
    ``train.lr`` (its optimizer group's), the others as they are."""
    return {task: {k: v for k, v in values.items() if k != "lr"}
            | ({"lr_factor": values["lr"] / cfg.lr} if "lr" in values else {})
            for task, values in per_task.items()}


def build(params: Params, variant: str, seed: int, preprocessor: Preprocessor,
          tasks: list[Task]) -> tuple[Bundle, weightings.Weighting]:
    """The untrained model (a ``Bundle``) and the weighting of ``variant``."""
    cfg, spec, enc = params.variant_train(variant), params.all_variants[variant], params.encoders
    layers = {"hidden": cfg.hidden, "head_hidden": cfg.head_hidden, "dropout": cfg.dropout,
              "options": spec.arch_options} | ({"ensemble": cfg.ensemble} if cfg.ensemble > 1 else {})
    info = {"variant": variant, "seed": seed, "weighting": spec.weighting, "weights": spec.weights,
            "weighting_options": spec.weighting_options, "train": cfg.model_dump()}
    if spec.per_task:
        layers["per_task"] = member_settings(cfg, spec.per_task)
        info |= {"per_task": spec.per_task}
    if spec.arch == "groups":
        layers["options"] = spec.arch_options | {"groups": read_groups(params, variant)}
        info |= {"groups": layers["options"]["groups"]}
        if variant in params.grouped:  # chosen by group@<variant>: its score and runners-up
            info |= {"grouping": read_json(paths.grouping(variant))}
    encoder = {"dim": enc.dim, "text_dim": enc.hashing.dim, "image_channels": enc.image_channels,
               "numeric": enc.numeric, "periodic": enc.periodic.model_dump()}
    if enc.finetune.layers:
        encoder["finetune"] = enc.finetune.model_dump()
    try:  # an option value the method rejects (e.g. mgda level) is the user's mistake
        bundle = Bundle.create(spec.arch, tasks, preprocessor, layers, info, encoder)
        weighting = weightings.for_model(bundle.model, spec.weighting, [t.name for t in tasks],
                                         spec.weights, spec.weighting_options)
    except ValueError as exc:
        raise UserError(f"variants.{variant}: {exc}") from None
    return bundle, weighting


def resumable(work: Path, inputs: str) -> bool:
    """Whether ``work`` holds a checkpoint of a run of the same inputs (its stamp matches)."""
    try:
        stamp = (work / "inputs.sha256").read_bytes()
    except OSError:  # no stamp, or not a readable file: start afresh
        return False
    return stamp == inputs.encode() and (work / "checkpoint.pt").is_file()


def prepare(work: Path, inputs: str, resume: bool) -> int:
    """Make ``work`` ready for the run; returns the first epoch to train. Resuming, what a kill
    left half-written is removed, and so are the log rows of epochs after the checkpoint's."""
    checkpoint = work / "checkpoint.pt"
    if not resume:
        with writing(work):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "inputs.sha256").write_text(inputs)
        return 0
    remove_leftovers(checkpoint, work / "affinity.json", work / "model")
    with run_file(checkpoint):
        state = load_file(checkpoint)
        if problem := mismatch(state, RUN_STATE):
            raise NotOurs(problem)
    first = state["epoch"] + 1
    drop_logged_steps(work / "live", first)
    return first


@contextlib.contextmanager
def run_file(path: Path) -> Iterator[None]:
    """One line pointing to ``--fresh`` for a file of an interrupted run that does not read back."""
    try:
        yield
    except (NotOurs, UserError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: not a file of an interrupted run of mtl-pipeline ({exc}); "
                        "rerun with --fresh to start afresh") from None


def publish(work: Path, variant: str, seed: int, bundle: Bundle, stats: dict,
            probe: AffinityProbe | None) -> None:
    """Write the model, ``train.json`` (its info and ``stats``) and the affinity summary, then
    move them and the run's logs into place: both folders, or neither."""
    with writing(work):
        finished = temp_dir(work, "model")
        bundle.save(finished / "model.pt")
    write_json(bundle.info | stats, finished / "train.json")
    if probe is not None:
        write_json(probe.summary(), finished / "affinity.json")
    replace_dirs((work / "live", paths.live_dir(variant, seed)), (finished, paths.model_dir(variant, seed)))
    shutil.rmtree(work)


def fingerprint(params: Params, variant: str, seed: int, data_key: str) -> str:
    """SHA-256 of everything a training run depends on: its params (encoders included), torch's
    thread count (CPU results can depend on it), its data (``data_key``:
    ``encoded.data_fingerprint``, of the splits, schema, preprocessing and engine code) and this
    stage's code."""
    digest = hashlib.sha256(data_key.encode())
    config = {"variant": params.all_variants[variant].model_dump(), "seed": seed,
              "train": params.variant_train(variant).model_dump(),
              "encoders": params.encoders.model_dump(),
              "threads": torch.get_num_threads()}
    if params.all_variants[variant].arch == "groups":  # a grouped variant's chosen groups too
        config["groups"] = read_groups(params, variant)
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


def drop_logged_steps(live_dir: Path, first: int) -> None:
    """Remove the dvclive rows of steps >= ``first`` (logged after the last checkpoint)."""
    for tsv in live_dir.glob("plots/metrics/**/*.tsv"):
        with run_file(tsv):
            header, *rows = tsv.read_text(encoding="utf-8").splitlines()
            step = header.split("\t").index("step")
            kept = [r for r in rows if int(r.split("\t")[step]) < first]
        with atomic_path(tsv) as tmp:
            tmp.write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
