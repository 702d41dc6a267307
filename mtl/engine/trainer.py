"""The training loop: batches indexed from the split's tensors (held on the device, or
memory-mapped on the host and moved batch by batch), one backward per (micro-)batch through the
weighting, AdamW or SGD with an optional learning-rate schedule, gradient clipping and
accumulation, model selection on validation loss with early stopping, a checkpoint at the end of
every epoch from which a run resumes bit-identically on CPU, and data parallelism over the
processes ``torchrun`` starts (``mtl.engine.distributed``)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler

from mtl.engine import distributed
from mtl.engine.archs import Scaled, scaled_groups
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task

if TYPE_CHECKING:  # fit imports it: torchjd and its solvers are no cost to evaluate and predict
    from mtl.engine.weighting import Step, Weighting

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("none", "cosine", "step", "plateau")
PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE = ("stop", "skip")


@dataclass
class TaskData:
    """A split as tensors: model inputs, and per task the targets and the labelled-row mask."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]

    @classmethod
    def from_table(cls, table: pa.Table, preprocessor: Preprocessor,
                   tasks: Sequence[Task]) -> TaskData:
        encoded = {t.name: t.encode(*(table[c] for c in t.columns)) for t in tasks}
        return cls(preprocessor.transform(table),
                   {name: y for name, (y, _) in encoded.items()},
                   {name: mask for name, (_, mask) in encoded.items()})

    def __len__(self) -> int:
        return len(next(iter(self.targets.values())))

    @property
    def device(self) -> torch.device:
        return next(iter(self.targets.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.inputs, self.targets, self.masks) for t in d.values())

    def take(self, index: torch.Tensor) -> TaskData:
        pick = lambda d: {k: v[index] for k, v in d.items()}
        return TaskData(pick(self.inputs), pick(self.targets), pick(self.masks))

    def to(self, device: torch.device) -> TaskData:
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return TaskData(move(self.inputs), move(self.targets), move(self.masks))


@dataclass(frozen=True)
class FitOptions:
    """How ``fit`` trains; ``mtl.config.TrainConfig`` documents each option."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 0  # 0: never stop early
    seed: int = 0
    optimizer: str = "adamw"  # or "sgd"
    momentum: float = 0.0  # sgd only
    schedule: str = "none"  # none | cosine | step | plateau
    warmup_epochs: int = 0
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step and plateau: the factor of each decay
    plateau_patience: int = 10  # plateau: epochs without a better validation loss before a decay
    clip_grad_norm: float = 0.0  # 0: off; per selection group, the weighting's parameters unclipped
    accumulate: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # auto | fp32 | bf16 (CUDA only)
    compile: bool = False
    deterministic: bool = False
    nonfinite: str = "stop"  # a step with a non-finite task loss: stop | skip
    progress: bool = True  # a bar on a terminal, otherwise one line per epoch


@dataclass
class FitResult:
    epochs_run: int
    best_epochs: dict[str, int] = field(default_factory=dict)  # task -> epoch whose weights are kept
    resumed_at: int = 0  # the first epoch this call trained (> 0 after resuming)
    skipped_steps: int = 0  # micro-batches skipped for a non-finite loss (nonfinite="skip")


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from was written by another model or other options."""


class NonFiniteLoss(ValueError):
    """A task's training loss was NaN or infinite; the message names the task, epoch and step."""


EpochLog = dict[str, float]


def select_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere; bf16 is refused off CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"bf16 needs a CUDA device, and this run is on {device.type} "
                         "(use auto or fp32)")
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """Within the block, only deterministic algorithms (``torch.use_deterministic_algorithms``,
    cuDNN's deterministic mode without benchmarking); restored afterwards. On CUDA it also sets
    ``CUBLAS_WORKSPACE_CONFIG``, which must happen before the first cuBLAS call."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2:]


def each_task_loss(outputs: dict[str, torch.Tensor], tasks: Sequence[Task], data: TaskData) -> list[torch.Tensor]:
    return [t.loss(outputs[t.name], data.targets[t.name], data.masks[t.name]) for t in tasks]


def task_losses(outputs: dict[str, torch.Tensor], tasks: Sequence[Task], data: TaskData) -> torch.Tensor:
    return torch.stack(each_task_loss(outputs, tasks, data))


@torch.no_grad()
def predict(model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """Raw model outputs for every row, in evaluation mode."""
    model.eval()
    n = len(next(iter(inputs.values())))
    chunks = [model({k: v[i:i + batch_size] for k, v in inputs.items()}) for i in range(0, max(n, 1), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def make_optimizer(model_params: list[nn.Parameter], weighting_params: list[nn.Parameter],
                   options: FitOptions, device: torch.device,
                   scaled: Sequence[Scaled] = ()) -> torch.optim.Optimizer:
    """AdamW or SGD; the fused implementation on CPU and CUDA (on CPU, AdamW's step takes a
    fifth of the time of the default one for the small networks of tabular data).

    The weighting's own parameters (UW's log-variances, GradNorm's logits, IMTL-L's scales) form
    a second group without weight decay: decay would pull them toward 0, i.e. toward equal
    weights, which none of their papers asks for. Every model parameter, biases and norms
    included, keeps ``weight_decay`` (exempting those, as nanoGPT does, awaits a measurement).
    ``scaled``: each a group at ``lr * factor`` and its own weight decay where set (the layers
    of a fine-tuned encoder, an ``stl`` member's settings: ``lr_scales``); the schedules scale
    every group's rate alike."""
    fused = device.type in ("cpu", "cuda") or None
    groups = [{"params": model_params}]
    if weighting_params:
        groups.append({"params": weighting_params, "weight_decay": 0.0})
    groups += [{"params": g.params, "lr": options.lr * g.factor}
               | ({} if g.weight_decay is None else {"weight_decay": g.weight_decay})
               for g in scaled if g.params]
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay,
                                 fused=fused)
    return torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum,
                           weight_decay=options.weight_decay, fused=fused)


def lr_scales(model: nn.Module) -> tuple[list[nn.Parameter], list[Scaled]]:
    """(the trainable parameters at ``lr``, the groups of the modules with ``lr_scales()``:
    fine-tuned encoders, ``stl`` members with their own settings). Frozen parameters are in
    neither."""
    scaled = scaled_groups(model)
    apart = {id(p) for group in scaled for p in group.params}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in apart], scaled


def make_schedules(optimizer: torch.optim.Optimizer, options: FitOptions
                   ) -> tuple[lr_scheduler.LRScheduler | None, lr_scheduler.ReduceLROnPlateau | None]:
    """(the schedule stepped after every epoch, warm-up included; the plateau schedule, stepped
    with the validation loss after the warm-up). Epoch e < W of a warm-up over W epochs trains
    at lr (e + 1) / (W + 1); the schedule proper starts from lr at epoch W."""
    w = options.warmup_epochs
    warmup = lr_scheduler.LinearLR(optimizer, 1 / (w + 1), total_iters=w) if w else None
    if options.schedule == "plateau":
        return warmup, lr_scheduler.ReduceLROnPlateau(optimizer, factor=options.gamma,
                                                      patience=options.plateau_patience)
    if options.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs - w)
    elif options.schedule == "step":
        main = lr_scheduler.StepLR(optimizer, options.step_size, options.gamma)
    else:
        return warmup, None
    return (lr_scheduler.SequentialLR(optimizer, [warmup, main], [w]) if warmup else main), None


def check_options(options: FitOptions, device: torch.device, has_val: bool) -> None:
    """Raise ValueError for options ``fit`` cannot honour (``TrainConfig`` checks most earlier)."""
    if options.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not '{options.optimizer}'")
    if options.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not '{options.schedule}'")
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not '{options.precision}'")
    if options.nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, not '{options.nonfinite}'")
    if options.accumulate < 1:
        raise ValueError("accumulate must be at least 1")
    if options.schedule != "none" and options.warmup_epochs >= options.epochs:
        raise ValueError("warmup_epochs must be below epochs")
    if options.schedule == "plateau" and not has_val:
        raise ValueError("the plateau schedule needs validation rows")
    resolve_precision(options.precision, device)


def fit(model: nn.Module, tasks: Sequence[Task], weighting: Weighting, train: TaskData,
        val: TaskData, options: FitOptions,
        on_epoch: Callable[[int, EpochLog], None] | None = None,
        checkpoint: Path | str | None = None, resume: bool = False) -> FitResult:
    """Train ``model`` in place; each selection group ends with its best validation epoch's weights.

    ``on_epoch(epoch, log)`` receives the epoch's mean training losses, task weights, learning
    rate and validation losses and metrics. With ``checkpoint``, the whole training state is
    written there (atomically) after every epoch; with ``resume`` too, training continues from
    that file when it exists, with the same results as a run that was never interrupted.

    Gradient accumulation: the weighting's ``backward`` runs on each micro-batch alone (fresh
    ``.grad``), and an optimizer step takes the mean of its micro-batches' gradients. For a loss
    weighting with fixed weights (ew, static) that equals one batch of ``accumulate`` times the
    size (micro-batches of equal size and label counts); a gradient method aggregates the task
    gradients of each micro-batch, so its guarantee (e.g. MGDA's common descent direction) holds
    for each micro-batch, not for their mean, and a stateful weighting advances per micro-batch.

    Non-finite losses: before each backward, every task loss must be finite. With
    ``nonfinite="stop"`` a NaN or infinite one raises ``NonFiniteLoss`` naming the task, the
    epoch and the step within it (both counted from 0, as in the logs). With ``"skip"`` that
    micro-batch gets no backward (an optimizer step whose micro-batches were all skipped is not
    taken), ``FitResult.skipped_steps`` counts it, and an epoch with every step skipped raises
    anyway. Only the losses are checked: a finite loss whose gradient overflows is not caught.

    Data parallelism: in a process group (``torchrun``), every process trains the same model on
    its slice of each batch (``batch_size`` is the whole batch, over all processes) and the
    result equals one process's with the same batches, up to floating-point rounding. Loss
    weightings go through DistributedDataParallel, which all-reduces the gradients during the
    backward pass; methods that combine per-task gradients average those (the Jacobian, or the
    Gramian at the representation level) over the processes before combining them, and the
    remaining gradients are averaged before the optimizer step, as with accumulation. Only
    rank 0 calls ``on_epoch`` and writes the checkpoint; every process reads it to resume.
    """
    from mtl.engine.weighting import Step

    device = next(model.parameters()).device
    processes, rank = distributed.world()
    if len(train) == 0:
        raise ValueError("no training rows")
    check_options(options, device, len(val) > 0)
    precision = resolve_precision(options.precision, device)
    generator = torch.Generator().manual_seed(options.seed)
    params = list(model.parameters()) + list(weighting.parameters())
    trainable, scaled = lr_scales(model)
    optimizer = make_optimizer(trainable, list(weighting.parameters()), options, device, scaled)
    schedule, plateau = make_schedules(optimizer, options)
    index = {t.name: i for i, t in enumerate(tasks)}
    groups = model.selection_groups()
    # A frozen parameter (a fine-tuned encoder's bottom layers) gets no gradient from any method.
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    layer = [p for p in model.last_shared_layer() if p.requires_grad]
    heads = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in shared)]
    # Clipping is per selection group, so that STL's networks stay independent of each other.
    clipped = [list(module.parameters()) for _, module in groups] if options.clip_grad_norm else []
    best = [(math.inf, -1, None)] * len(groups)  # (val loss, epoch, state) per group
    start, stopped, skipped = 0, False, 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start, best, stopped, skipped = _restore(Path(checkpoint), options, model, weighting,
                                                 optimizer, schedule, plateau, generator, device)
    ddp = None
    if processes > 1:  # DDP also broadcasts rank 0's initial weights
        ddp = DistributedDataParallel(_WithFeatures(model),
                                      device_ids=[device] if device.type == "cuda" else None)
    forward = _forward(ddp or model.forward_with_features, precision, options.compile)
    n, k = len(train), options.accumulate
    # Without DDP's all-reduce during backward, gradients are averaged before each optimizer step.
    average = processes > 1 and (k > 1 or not weighting.loss_backward)
    sync = ddp.no_sync if average else contextlib.nullcontext
    epoch = start - 1
    main = rank == 0
    with (deterministic_algorithms(options.deterministic, device),
          _progress(options.progress and main, options.epochs, start) as report):
        for epoch in range(start, start if stopped else options.epochs):
            began = time.perf_counter()
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            step_losses, step_weights = [], []  # stacked once per epoch, not summed per step
            batches = torch.randperm(n, generator=generator).to(train.device).split(options.batch_size)
            for i, rows in enumerate(batches):
                if i % k == 0:
                    optimizer.zero_grad(set_to_none=True)
                    used = 0  # micro-batches of this optimizer step that went through backward
                batch = train.take(rows.tensor_split(processes)[rank] if processes > 1 else rows)
                if batch.device != device:
                    batch = batch.to(device)
                with sync():
                    outputs, features = forward(batch.inputs)
                    each = each_task_loss(outputs, tasks, batch)
                    if processes > 1:
                        each = distributed.whole_batch_losses(each, torch.stack(
                            [batch.masks[t.name].sum() for t in tasks]))
                    losses = torch.stack(each)
                    values = losses.tolist()  # on CPU 20 times cheaper than torch.isfinite(losses)
                    finite = all(map(math.isfinite, values))
                    if finite:
                        step = Step(shared, features, epoch, head_params=heads,
                                    last_shared_layer=layer, task_losses=each,
                                    processes=processes,
                                    mean_over_processes=distributed.mean_over_processes)
                        step_weights.append(weighting.backward(losses, step) if k == 1
                                            else _backward_alone(weighting, losses, step, params))
                if finite:
                    step_losses.append(losses.detach())
                    used += 1
                else:
                    where = _nonfinite(tasks, values, epoch, i)
                    if options.nonfinite == "stop":
                        raise NonFiniteLoss(f"non-finite loss {where}; lower train.lr, set "
                                            "train.clip_grad_norm, or train.nonfinite: skip")
                    skipped += 1
                    if not step_losses and i + 1 == len(batches):
                        raise NonFiniteLoss(f"every step of epoch {epoch} had a non-finite loss "
                                            f"(the last {where}); lower train.lr or set "
                                            "train.clip_grad_norm")
                if used and ((i + 1) % k == 0 or i + 1 == len(batches)):  # the step's last micro-batch
                    if k > 1:
                        _mean_of_micro_batches(params, used)
                    if average:
                        distributed.mean_over_processes([p.grad for p in params if p.grad is not None])
                    for group in clipped:
                        nn.utils.clip_grad_norm_(group, options.clip_grad_norm, foreach=True)
                    optimizer.step()
            means = torch.stack([torch.stack(step_losses).mean(0),
                                 torch.stack(step_weights).mean(0)]).tolist()
            log = {f"train/loss/{t.name}": v for t, v in zip(tasks, means[0])}
            log |= {f"weight/{t.name}": v for t, v in zip(tasks, means[1])}
            log["lr"] = lr
            val_loss = math.nan
            if len(val):
                outputs = predict(model, val.inputs)
                val_losses = task_losses(outputs, tasks, val).tolist()
                log |= {f"val/loss/{t.name}": v for t, v in zip(tasks, val_losses)}
                for t in tasks:
                    metrics = t.metrics(outputs[t.name], val.targets[t.name], val.masks[t.name])
                    log |= {f"val/{t.name}/{key}": v for key, v in metrics.items()}
                val_loss = sum(val_losses)
                for g, (names, module) in enumerate(groups):
                    score = sum(val_losses[index[name]] for name in names)
                    if score < best[g][0]:
                        best[g] = (score, epoch, copy.deepcopy(module.state_dict()))
            stopped = bool(options.patience and len(val)
                           and all(epoch - b[1] >= options.patience for b in best))
            if on_epoch is not None and main:
                on_epoch(epoch, log)
            if plateau is not None and epoch >= options.warmup_epochs:
                plateau.step(val_loss)
            elif schedule is not None:
                schedule.step()
            if checkpoint is not None and main:
                _save_atomically({
                    "options": asdict(options), "epoch": epoch, "stopped": stopped,
                    "model": model.state_dict(), "weighting": weighting.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": None if schedule is None else schedule.state_dict(),
                    "plateau": None if plateau is None else plateau.state_dict(),
                    "best": [{"loss": b[0], "epoch": b[1], "state": b[2]} for b in best],
                    "rng": _rng_states(generator, device), "skipped": skipped,
                }, Path(checkpoint))
            report(epoch, log, time.perf_counter() - began)
            if stopped:
                break
    result = FitResult(epochs_run=epoch + 1, resumed_at=start, skipped_steps=skipped)
    for (names, module), (_, best_epoch, state) in zip(groups, best):
        if state is not None:
            module.load_state_dict(state)
        result.best_epochs |= {name: (best_epoch if state is not None else epoch) for name in names}
    return result


class _WithFeatures(nn.Module):
    """``model.forward_with_features`` as a module's forward, for DDP to wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return self.model.forward_with_features(inputs)


def _forward(forward_with_features: Callable, precision: str, compile: bool
             ) -> Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """``forward_with_features`` (the model's, or DDP's around it), compiled and under bf16
    autocast if asked (the outputs are then cast back to fp32, so that the losses are computed
    in fp32)."""
    forward = torch.compile(forward_with_features) if compile else forward_with_features
    if precision != "bf16":
        return forward

    def autocast_forward(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs, features = forward(inputs)
        return {name: out.float() for name, out in outputs.items()}, features

    return autocast_forward


def _backward_alone(weighting: Weighting, losses: torch.Tensor, step: Step,
                    params: list[nn.Parameter]) -> torch.Tensor:
    """``weighting.backward`` on cleared gradients, then the earlier micro-batches' gradients
    added back: each micro-batch is processed exactly as it would be on its own."""
    earlier = [p.grad for p in params]
    for p in params:
        p.grad = None
    weights = weighting.backward(losses, step)
    for p, grad in zip(params, earlier):
        if grad is not None:
            p.grad = grad if p.grad is None else p.grad + grad
    return weights


def _mean_of_micro_batches(params: list[nn.Parameter], count: int) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)


def _nonfinite(tasks: Sequence[Task], losses: list[float], epoch: int, step: int) -> str:
    """Where the first non-finite task loss is, e.g. "in task 'size' at epoch 3, step 12 (nan)"."""
    t = next(i for i, loss in enumerate(losses) if not math.isfinite(loss))
    return f"in task '{tasks[t].name}' at epoch {epoch}, step {step} ({losses[t]})"


@contextlib.contextmanager
def _progress(enabled: bool, epochs: int, start: int) -> Iterator[Callable[[int, EpochLog, float], None]]:
    """``report(epoch, log, seconds)`` after each epoch: a rich progress bar when stdout is a
    terminal; otherwise (a log, a pipe) one line per epoch (``_epoch_line``)."""
    if not enabled:
        yield lambda epoch, log, seconds: None
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        yield lambda epoch, log, seconds: print(_epoch_line(epoch, epochs, log, seconds), flush=True)
        return
    from rich import progress as rp

    with rp.Progress(rp.TextColumn("epoch"), rp.BarColumn(), rp.MofNCompleteColumn(),
                     rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[status]}"),
                     console=console) as bar:
        task = bar.add_task("epoch", total=epochs, completed=start, status="")

        def report(epoch: int, log: EpochLog, seconds: float) -> None:
            status = (f"loss {_sum(log, 'train/loss/'):.4g}  val {_sum(log, 'val/loss/'):.4g}  "
                      f"lr {log['lr']:.3g}")
            bar.update(task, advance=1, status=status)

        yield report


def _sum(log: EpochLog, prefix: str) -> float:
    values = [v for k, v in log.items() if k.startswith(prefix)]
    return sum(values) if values else math.nan


def _epoch_line(epoch: int, epochs: int, log: EpochLog, seconds: float) -> str:
    """One epoch as a line of text: epochs done, the summed training and validation losses,
    each task's first validation metric and the epoch's seconds, e.g. ``epoch 3/150: loss
    1.234, val 1.456, val species/accuracy 0.9512, val body_mass/mae 301.2, 0.21 s``."""
    parts, tasks = [f"loss {_sum(log, 'train/loss/'):.4g}"], set()
    if any(key.startswith("val/") for key in log):
        parts.append(f"val {_sum(log, 'val/loss/'):.4g}")
    for key, value in log.items():
        kind, _, metric = key.partition("/")
        task = metric.split("/")[0]
        if kind == "val" and task != "loss" and task not in tasks:
            tasks.add(task)
            parts.append(f"val {metric} {value:.4g}")
    return f"epoch {epoch + 1}/{epochs}: " + ", ".join([*parts, f"{seconds:.2f} s"])


def _save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:  # a full disk is then an OSError torch's error carries
            torch.save(state, file)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state a run draws from, as tensors and plain values (``weights_only``)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states = {"shuffle": generator.get_state(), "torch": torch.get_rng_state(),
              "numpy": numpy_state, "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def _set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(states["shuffle"].cpu())
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
    if "mps" in states:
        torch.mps.set_rng_state(states["mps"].cpu())


def _restore(path: Path, options: FitOptions, model: nn.Module, weighting: Weighting,
             optimizer: torch.optim.Optimizer, schedule: lr_scheduler.LRScheduler | None,
             plateau: lr_scheduler.ReduceLROnPlateau | None, generator: torch.Generator,
             device: torch.device) -> tuple[int, list, bool, int]:
    """Load a checkpoint into the training state; returns (next epoch, best per group, stopped,
    skipped steps)."""
    state = torch.load(path, map_location=device, weights_only=True)
    # The number of epochs may grow, unless the schedule depends on it.
    free = {"progress", "compile"} | ({"epochs"} if options.schedule != "cosine" else set())
    for key, value in asdict(options).items():
        if key not in free and state["options"].get(key) != value:
            raise CheckpointMismatch(f"{path}: written with {key}={state['options'].get(key)!r}, "
                                     f"this run has {key}={value!r}; restore it or start afresh")
    try:
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
    except RuntimeError as exc:
        raise CheckpointMismatch(f"{path}: written for another model or weighting "
                                 f"({str(exc).splitlines()[0]})") from None
    for param_state in state["optimizer"]["state"].values():
        if "step" in param_state:
            param_state["step"] = param_state["step"].cpu()  # load_state_dict moves it if need be
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    if plateau is not None:
        plateau.load_state_dict(state["plateau"])
    _set_rng_states(state["rng"], generator, device)
    best = [(b["loss"], b["epoch"], b["state"]) for b in state["best"]]
    return state["epoch"] + 1, best, state["stopped"], state["skipped"]
