"""Architectures: a shared trunk with task towers, or one network per task.

Every model maps ``inputs`` (a dict of tensors) to ``{task name: output}`` and names its
*selection groups*: the tasks whose summed validation loss picks the best epoch of a module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mtl.engine.tasks import Task


def mlp(in_dim: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


def _out_width(in_dim: int, widths: Sequence[int]) -> int:
    return widths[-1] if widths else in_dim


class HPS(nn.Module):
    """Hard parameter sharing (Caruana 1997, "Multitask Learning"): one encoder and trunk shared
    by all tasks, then a small tower and output layer per task."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float):
        super().__init__()
        self.encoder = encoder
        self.trunk = mlp(encoder.out_dim, hidden, dropout)
        width = _out_width(encoder.out_dim, hidden)
        self.heads = nn.ModuleDict({
            t.name: nn.Sequential(mlp(width, head_hidden, dropout),
                                  nn.Linear(_out_width(width, head_hidden), t.out_dim))
            for t in tasks})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shared = self.trunk(self.encoder(inputs))
        return {name: head(shared) for name, head in self.heads.items()}

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [(list(self.heads), self)]


class STL(nn.Module):
    """Single-task learning: an independent network per task, the baseline of Δm. The members
    share no parameter, so training them in one loop with AdamW equals training each alone;
    each keeps the weights of its own best validation epoch."""

    def __init__(self, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
                 hidden: Sequence[int], head_hidden: Sequence[int], dropout: float):
        super().__init__()
        self.members = nn.ModuleDict({
            t.name: HPS(make_encoder(), [t], hidden, head_hidden, dropout) for t in tasks})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: member(inputs)[name] for name, member in self.members.items()}

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [([name], member) for name, member in self.members.items()]


def build(arch: str, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
          hidden: Sequence[int], head_hidden: Sequence[int], dropout: float) -> nn.Module:
    """The model named ``arch`` (one of ``mtl.engine.ARCHITECTURES``)."""
    if arch == "hps":
        return HPS(make_encoder(), tasks, hidden, head_hidden, dropout)
    if arch == "stl":
        return STL(make_encoder, tasks, hidden, head_hidden, dropout)
    raise ValueError(f"unknown architecture '{arch}'")


BUILDERS = ("hps", "stl")  # what ``build`` accepts; kept equal to ARCHITECTURES by a test
