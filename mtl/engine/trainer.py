"""The training loop: batches indexed from tensors held on the device, one backward per step
through the weighting, AdamW, and model selection on validation loss with early stopping."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mtl.engine.encoders import TabularPreprocessor
from mtl.engine.tasks import Task
from mtl.engine.weighting import Step, Weighting


@dataclass
class TaskData:
    """A split as tensors: model inputs, and per task the targets and the labelled-row mask."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]

    @classmethod
    def from_table(cls, table: pa.Table, preprocessor: TabularPreprocessor,
                   tasks: Sequence[Task]) -> TaskData:
        encoded = {t.name: t.encode(table[t.target]) for t in tasks}
        return cls(preprocessor.transform(table),
                   {name: y for name, (y, _) in encoded.items()},
                   {name: mask for name, (_, mask) in encoded.items()})

    def __len__(self) -> int:
        return len(next(iter(self.targets.values())))

    def take(self, index: torch.Tensor) -> TaskData:
        pick = lambda d: {k: v[index] for k, v in d.items()}
        return TaskData(pick(self.inputs), pick(self.targets), pick(self.masks))

    def to(self, device: torch.device) -> TaskData:
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return TaskData(move(self.inputs), move(self.targets), move(self.masks))


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 0  # 0: never stop early
    seed: int = 0


@dataclass
class FitResult:
    epochs_run: int
    best_epochs: dict[str, int] = field(default_factory=dict)  # task -> epoch whose weights are kept


EpochLog = dict[str, float]


def select_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_losses(outputs: dict[str, torch.Tensor], tasks: Sequence[Task], data: TaskData) -> torch.Tensor:
    return torch.stack([t.loss(outputs[t.name], data.targets[t.name], data.masks[t.name]) for t in tasks])


@torch.no_grad()
def predict(model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """Raw model outputs for every row, in evaluation mode."""
    model.eval()
    n = len(next(iter(inputs.values())))
    chunks = [model({k: v[i:i + batch_size] for k, v in inputs.items()}) for i in range(0, max(n, 1), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def fit(model: nn.Module, tasks: Sequence[Task], weighting: Weighting, train: TaskData,
        val: TaskData, options: FitOptions,
        on_epoch: Callable[[int, EpochLog], None] | None = None) -> FitResult:
    """Train ``model`` in place; each selection group ends with its best validation epoch's weights."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(options.seed)
    params = list(model.parameters()) + list(weighting.parameters())
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    index = {t.name: i for i, t in enumerate(tasks)}
    groups = model.selection_groups()
    shared = model.shared_parameters()
    best = [(math.inf, -1, None)] * len(groups)  # (val loss, epoch, state) per group
    n = len(train)
    epoch = -1
    for epoch in range(options.epochs):
        model.train()
        loss_sum = torch.zeros(len(tasks), device=device)
        weight_sum = torch.zeros(len(tasks), device=device)
        steps = 0
        for batch_index in torch.randperm(n, generator=generator).to(device).split(options.batch_size):
            batch = train.take(batch_index)
            outputs, features = model.forward_with_features(batch.inputs)
            losses = task_losses(outputs, tasks, batch)
            optimizer.zero_grad(set_to_none=True)
            weight_sum += weighting.backward(losses, Step(shared, features, epoch))
            optimizer.step()
            loss_sum += losses.detach()
            steps += 1
        log = {f"train/loss/{t.name}": float(v) for t, v in zip(tasks, loss_sum / steps)}
        log |= {f"weight/{t.name}": float(v) for t, v in zip(tasks, weight_sum / steps)}
        if len(val):
            outputs = predict(model, val.inputs)
            val_losses = task_losses(outputs, tasks, val)
            log |= {f"val/loss/{t.name}": float(v) for t, v in zip(tasks, val_losses)}
            for t in tasks:
                metrics = t.metrics(outputs[t.name], val.targets[t.name], val.masks[t.name])
                log |= {f"val/{t.name}/{k}": v for k, v in metrics.items()}
            for g, (names, module) in enumerate(groups):
                score = float(sum(val_losses[index[name]] for name in names))
                if score < best[g][0]:
                    best[g] = (score, epoch, copy.deepcopy(module.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, log)
        if options.patience and len(val) and all(epoch - b[1] >= options.patience for b in best):
            break
    result = FitResult(epochs_run=epoch + 1)
    for (names, module), (_, best_epoch, state) in zip(groups, best):
        if state is not None:
            module.load_state_dict(state)
        result.best_epochs |= {name: (best_epoch if state is not None else epoch) for name in names}
    return result
