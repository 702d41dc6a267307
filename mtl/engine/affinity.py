"""Task relatedness, measured during training: how a step for one task moves the others.

- **Gradient cosine**: the cosine similarity between two tasks' loss gradients on the shared
  parameters. Below 0 the tasks pull the shared layers apart, a "conflict" in the sense of Yu et
  al. 2020, "Gradient Surgery for Multi-Task Learning".
- **Inter-task affinity** (Fifty, Amid, Zhao, Yu, Anil, Finn 2021, "Efficiently Identifying
  Task Groupings for Multi-Task Learning"): ``Z[i, j] = 1 - L_j(θ_s - lr ∇_{θ_s} L_i, θ_j) /
  L_j(θ_s, θ_j)``, the relative drop of task j's loss after one SGD step on the shared
  parameters θ_s for task i alone, on the same batch. Positive: a step for i lowers j's loss.

Row i of each K×K matrix is the task taking the step, column j the task measured. A task without
a labelled row in a batch (or, for the cosine, with a zero gradient) gives NaN there, which the
averages ignore. The paper measures Z at every training step; ``AffinityProbe`` measures both on
a few fixed training batches after the first epoch and every ``every``-th after it: a sample of
the same quantities over training, at 1/``every`` of the cost of measuring after each epoch.
Measuring changes nothing: the model's weights, ``.grad``, train/eval modes and every random
state stay as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from mtl.engine.affinity_summary import KINDS, from_json, nanmean, to_json
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData, task_losses


def gradient_cosines(model: nn.Module, tasks: Sequence[Task], data: TaskData) -> np.ndarray:
    """[K, K] cosine similarity of the tasks' loss gradients on ``model.shared_parameters()``."""
    with _evaluating(model):
        return _cosines(_task_gradients(model, tasks, data)[1])


def lookahead_affinity(model: nn.Module, tasks: Sequence[Task], data: TaskData,
                       lr: float) -> np.ndarray:
    """[K, K] inter-task affinity Z[i, j] of Fifty et al. 2021 for an SGD step of size ``lr``."""
    with _evaluating(model):
        losses, grads = _task_gradients(model, tasks, data)
        return _lookahead(model, tasks, data, losses, grads, lr)


class AffinityProbe:
    """Both measures on ``batches`` fixed training batches of ``batch_size`` rows, drawn once with
    a generator of its own (and held on ``device``, by default the data's); ``measure`` after
    the epochs ``due`` names (0, every, 2 every, ... counting from 0), ``summary`` for the mean
    over the epochs measured."""

    def __init__(self, tasks: Sequence[Task], data: TaskData, batches: int, batch_size: int,
                 seed: int, device: torch.device | None = None, every: int = 1):
        if every < 1:
            raise ValueError("every must be at least 1")
        self.tasks, self.every = list(tasks), every
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        self.batches = [data.take(r.to(data.device)).to(device or data.device)
                        for r in rows.split(batch_size)[:batches]]
        self.history: list[dict[str, np.ndarray]] = []  # per epoch measured
        self.epochs: list[int] = []  # the epoch of each entry of history

    def due(self, epoch: int) -> bool:
        """Whether to measure after ``epoch`` (counted from 0): the first and every ``every``-th."""
        return epoch % self.every == 0

    def measure(self, model: nn.Module, lr: float, epoch: int | None = None
                ) -> dict[str, np.ndarray]:
        """Both K×K matrices, averaged over the batches; also appended to ``history``, as
        measured after ``epoch`` (by default the count of earlier measurements)."""
        per_batch = []
        with _evaluating(model):
            for batch in self.batches:
                losses, grads = _task_gradients(model, self.tasks, batch)
                per_batch.append({"cosine": _cosines(grads),
                                  "lookahead": _lookahead(model, self.tasks, batch, losses, grads, lr)})
        result = {kind: nanmean([m[kind] for m in per_batch]) for kind in KINDS}
        self.epochs.append(len(self.history) if epoch is None else epoch)
        self.history.append(result)
        return result

    def summary(self) -> dict:
        """The mean over the measured epochs, JSON-ready (NaN -> None)."""
        k = len(self.tasks)
        return {"tasks": [t.name for t in self.tasks],
                **{kind: to_json(nanmean([h[kind] for h in self.history], (k, k)))
                   for kind in KINDS},
                "epochs": len(self.history), "every": self.every}

    def state_dict(self) -> dict:
        """Every measured epoch's matrices, JSON-ready, to resume from with ``load_state_dict``."""
        return {"tasks": [t.name for t in self.tasks], "epochs": self.epochs,
                "history": [{kind: to_json(h[kind]) for kind in KINDS} for h in self.history]}

    def load_state_dict(self, state: dict, epochs: int) -> None:
        """Take back what ``state`` measured after the first ``epochs`` epochs."""
        if state["tasks"] != [t.name for t in self.tasks]:
            raise ValueError(f"affinity state of tasks {state['tasks']}, not of this run's")
        kept = [(e, h) for e, h in zip(state["epochs"], state["history"], strict=True)
                if e < epochs]
        self.epochs = [e for e, _ in kept]
        self.history = [{kind: from_json(h[kind]) for kind in KINDS} for _, h in kept]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) within the block; every module's mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _shared(model: nn.Module) -> dict[str, nn.Parameter]:
    names = {id(p): name for name, p in model.named_parameters()}
    shared = {names[id(p)]: p for p in model.shared_parameters() if p.requires_grad}
    if not shared:
        raise ValueError("the model shares no parameter between its tasks")
    return shared


def _task_gradients(model: nn.Module, tasks: Sequence[Task], data: TaskData
                    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...] | None]]:
    """(the task losses, per task its gradient on the shared parameters or None when no row is
    labelled); ``torch.autograd.grad`` leaves every ``.grad`` alone."""
    shared = list(_shared(model).values())
    with torch.enable_grad():
        losses = task_losses(model(data.inputs), tasks, data)
        grads = [torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
                 if data.masks[t.name].any() else None for k, t in enumerate(tasks)]
    return losses.detach(), grads


def _cosines(grads: list[tuple[torch.Tensor, ...] | None]) -> np.ndarray:
    out = np.full((len(grads),) * 2, np.nan)
    flat = {i: torch.cat([g.flatten() for g in gs]).double() for i, gs in enumerate(grads)
            if gs is not None}
    unit = {i: g / norm for i, g in flat.items() if (norm := torch.linalg.vector_norm(g)) > 0}
    if unit:
        stacked = torch.stack(list(unit.values()))
        out[np.ix_(list(unit), list(unit))] = (stacked @ stacked.T).clamp(-1, 1).cpu().numpy()
    return out


@torch.no_grad()
def _lookahead(model: nn.Module, tasks: Sequence[Task], data: TaskData, losses: torch.Tensor,
               grads: list[tuple[torch.Tensor, ...] | None], lr: float) -> np.ndarray:
    """Z[i, j] from a step on a copy of the shared parameters (``functional_call``): the model's
    own parameters are never written."""
    shared = _shared(model)
    before = losses.double().cpu().numpy()
    measured = np.array([bool(data.masks[t.name].any()) for t in tasks]) & (before > 0)
    out = np.full((len(tasks),) * 2, np.nan)
    for i, gs in enumerate(grads):
        if gs is None:
            continue
        stepped = {name: p - lr * g for (name, p), g in zip(shared.items(), gs)}
        after = task_losses(functional_call(model, stepped, (data.inputs,)), tasks, data)
        after = after.double().cpu().numpy()
        out[i, measured] = 1 - after[measured] / before[measured]
    return out
