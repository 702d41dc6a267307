"""Loss weighting: each method turns one step's task losses into gradients (it calls backward)
and returns the task weights it used, for logging."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Weighting(nn.Module):
    """Base class; a subclass may hold learnable parameters (they join the optimizer)."""

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        self.task_names = list(task_names)

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        weights = self.weights(losses)
        (weights * losses).sum().backward()
        return weights.detach()

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EqualWeighting(Weighting):
    """Equal weights: the plain sum of task losses."""

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)


class StaticWeighting(Weighting):
    """Fixed per-task weights given in params.yaml."""

    def __init__(self, task_names: Sequence[str], weights: dict[str, float]):
        super().__init__(task_names)
        self.register_buffer("fixed", torch.tensor([weights[t] for t in task_names]))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.fixed.to(losses.dtype)


def build(name: str, task_names: Sequence[str], weights: dict[str, float] | None = None) -> Weighting:
    """The weighting named ``name`` (one of ``mtl.engine.WEIGHTINGS``)."""
    if name == "ew":
        return EqualWeighting(task_names)
    if name == "static":
        if weights is None:
            raise ValueError("static weighting needs one weight per task")
        return StaticWeighting(task_names, weights)
    raise ValueError(f"unknown weighting '{name}'")


BUILDERS = ("ew", "static")  # what ``build`` accepts; kept equal to WEIGHTINGS by a test
