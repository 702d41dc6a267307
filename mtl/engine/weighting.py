"""Loss weighting: each method turns one step's task losses into gradients (it calls backward)
and returns the task weights it used, for logging. The gradient methods, which combine per-task
gradients with torchjd, are in ``mtl.engine.gradients``, imported only when a run asks for one
(torchjd's import costs each training process about a CPU-second)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mtl.engine import WEIGHTING_OPTIONS


def _one_process(tensors: list[torch.Tensor]) -> None:
    """``Step.mean_over_processes`` of a run in one process: nothing to do."""


@dataclass
class Step:
    """What a weighting may use in one training step besides the task losses.

    Under data parallelism each process sees its own part of the batch, with its losses scaled so
    that the mean over processes of any gradient is the whole batch's; ``mean_over_processes``
    replaces tensors in place by that mean (an all-reduce), so that a method can combine the
    whole batch's per-task gradients, the same in every process."""

    shared_params: list[nn.Parameter]  # parameters every task depends on (empty for stl)
    features: torch.Tensor | None = None  # the shared representation the heads read, if any
    epoch: int = 0
    head_params: list[nn.Parameter] = field(default_factory=list)  # the model's other parameters
    # The weights of the model's last shared layer (``last_shared_layer()`` of mtl.engine.archs).
    last_shared_layer: list[nn.Parameter] = field(default_factory=list)
    # The losses as separate tensors: the gradient of one element of the stacked tensor goes
    # back through every task's head (with zeros), that of a separate loss through its own only.
    task_losses: list[torch.Tensor] | None = None
    processes: int = 1
    mean_over_processes: Callable[[list[torch.Tensor]], None] = _one_process


class Weighting(nn.Module):
    """Base class; a subclass may hold learnable parameters (they join the optimizer).

    ``backward(losses, step)`` must leave the gradient of every parameter in ``.grad`` and return
    the task weights it used (detached, shape [K]) for logging. Loss-weighting methods only
    override ``weights``; gradient methods override ``backward``. State that is neither a
    parameter nor a buffer goes through ``get_extra_state``, so that the trainer's checkpoints
    hold it and a resumed run continues exactly.

    ``loss_backward``: the method's backward is one backward pass of a weighted sum of the
    losses, whose weights depend on the loss values only, so that data parallelism may
    all-reduce the gradients as they are computed (DDP). Methods that combine per-task gradients
    set it False and combine the whole batch's gradients through ``Step.mean_over_processes``.
    """

    loss_backward = True

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        self.task_names = list(task_names)

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        weights = self.weights(losses)
        (weights * losses).sum().backward()
        return weights.detach()

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EqualWeighting(Weighting):
    """Equal weights: the plain sum of task losses."""

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        losses.sum().backward()
        return torch.ones_like(losses.detach())


class StaticWeighting(Weighting):
    """Fixed per-task weights given in params.yaml."""

    def __init__(self, task_names: Sequence[str], weights: dict[str, float]):
        super().__init__(task_names)
        self.register_buffer("fixed", torch.tensor([weights[t] for t in task_names]))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.fixed.to(losses.dtype)


# --- Loss weightings: one weighted sum of the task losses per step -------------------------------


class UncertaintyWeighting(Weighting):
    """Uncertainty weighting (Kendall, Gal, Cipolla 2018, "Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics"): a learnable log-variance s_k per task and
    the loss sum_k exp(-s_k) L_k + s_k, the common form without the paper's 1/2 factors (the
    regression and classification cases then read alike). At the optimum of s_k, exp(-s_k) =
    1 / L_k: each task's weight is the inverse of its loss. Effective weights: exp(-s)."""

    def __init__(self, task_names: Sequence[str]):
        super().__init__(task_names)
        self.log_var = nn.Parameter(torch.zeros(len(self.task_names)))

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        weights = torch.exp(-self.log_var)
        (weights * losses + self.log_var).sum().backward()
        return weights.detach()


class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns, Davison 2019, "End-to-End Multi-Task Learning with
    Attention"): in epoch t, lambda_k = K softmax_k(r(t-1) / T) with r_k(t-1) = L_k(t-1) /
    L_k(t-2), the ratio of the task's mean training loss over the two previous epochs; weights
    are 1 in the first two epochs. A task whose loss falls slower gets more weight; the weights
    always sum to K."""

    def __init__(self, task_names: Sequence[str], *, temperature: float):
        super().__init__(task_names)
        self.temperature = temperature
        self.epoch: int | None = None
        self.loss_sum: torch.Tensor | None = None  # over the current epoch's steps
        self.steps = 0
        self.epoch_means: list[torch.Tensor] = []  # the last two finished epochs

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "loss_sum": self.loss_sum, "steps": self.steps,
                "epoch_means": self.epoch_means}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.loss_sum, self.steps = state["epoch"], state["loss_sum"], state["steps"]
        self.epoch_means = list(state["epoch_means"])

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if step.epoch != self.epoch:
            if self.steps:
                self.epoch_means = [*self.epoch_means, self.loss_sum / self.steps][-2:]
            self.epoch, self.loss_sum, self.steps = step.epoch, torch.zeros_like(losses.detach()), 0
        if len(self.epoch_means) < 2:
            weights = torch.ones_like(losses)
        else:
            ratio = self.epoch_means[1] / self.epoch_means[0]
            weights = len(losses) * torch.softmax(ratio / self.temperature, dim=0)
        self.loss_sum = self.loss_sum + losses.detach()
        self.steps += 1
        (weights * losses).sum().backward()
        return weights.detach()


class RLW(Weighting):
    """Random loss weighting (Lin, Ye, Zhang, Tsang 2022, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning"): each step, weights softmax(z) with z drawn
    from a standard normal by torch's global generator (so seeding reproduces them). The weights
    are positive and sum to 1."""

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.randn_like(losses.detach()), dim=0)


class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich 2018, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks"). With G_k = w_k |grad_W L_k| the
    norm of task k's weighted gradient on W, the weights of the last shared layer (Section 3.2:
    "generally chosen as the last shared layer of weights"; each architecture names its own,
    ``Step.last_shared_layer``; several matrices count as one W, the norm is over all of them),
    and r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0)) its relative inverse training rate (L(0):
    the losses of the first step), the weights descend the loss sum_k |G_k - mean(G) r_k^alpha|
    (the target held constant) while the network descends sum_k w_k L_k. Tasks that train
    slower or have smaller gradients gain weight. The weights are K softmax(logits), positive
    and summing to K by construction; the paper instead updates w directly and renormalises it
    to sum to K after every step. The authors published no code. Without shared parameters
    (STL) the losses are summed."""

    loss_backward = False

    def __init__(self, task_names: Sequence[str], *, alpha: float):
        super().__init__(task_names)
        self.alpha = alpha
        self.logits = nn.Parameter(torch.zeros(len(self.task_names)))
        self.initial_losses: torch.Tensor | None = None

    def get_extra_state(self) -> dict:
        return {"initial_losses": self.initial_losses}

    def set_extra_state(self, state: dict) -> None:
        self.initial_losses = state["initial_losses"]

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        if not step.shared_params:
            return sum_backward(losses)
        layer = step.last_shared_layer
        if not layer:
            raise ValueError("gradnorm needs a shared layer of weights, and this model has none "
                             "(no hidden layer over an encoder without weights): set train.hidden")
        if self.initial_losses is None:
            self.initial_losses = losses.detach().clone()
        weights = len(losses) * torch.softmax(self.logits, dim=0)
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            loss, layer, retain_graph=True)]) for loss in each_loss(losses, step)])
        step.mean_over_processes([grads])
        grad_norms = weights * grads.norm(dim=1)
        rates = losses.detach() / self.initial_losses
        target = (grad_norms.mean() * (rates / rates.mean()) ** self.alpha).detach()
        (grad_norms - target).abs().sum().backward(inputs=[self.logits])
        (weights.detach() * losses).sum().backward()
        return weights.detach()


class FAMO(Weighting):
    """FAMO (Liu, Feng, Stone, Liu 2023, "FAMO: Fast Adaptive Multitask Optimization"): the
    model descends sum_k z_k log(L_k + eps) / c with z = softmax(xi) and c = sum_k z_k / (L_k +
    eps) held constant, i.e. task weights z_k / (c (L_k + eps)), which sum to 1; the logits xi
    then take an Adam step (learning rate ``logit_lr``, weight decay ``gamma``) along the
    gradient of z with respect to xi applied to delta = log L(before) - log L(after), so that all
    task losses fall at about the same rate, without any per-task gradient.

    Approximation: the official code measures L(after) on the same batch, with one extra
    forward pass after the model update; a weighting here sees only each step's losses, so the
    logits are updated at the next step with that step's losses, measured on the next batch
    (delta then also holds the batch-to-batch noise). The logits are a buffer stepped by FAMO's
    own Adam, not by the trainer's optimizer."""

    def __init__(self, task_names: Sequence[str], *, logit_lr: float, gamma: float):
        super().__init__(task_names)
        self.logit_lr, self.gamma = logit_lr, gamma
        self.register_buffer("logits", torch.zeros(len(self.task_names)))
        self.optimizer: torch.optim.Adam | None = None  # made at the first update, on the device
        self.previous: torch.Tensor | None = None  # the last step's log losses

    def get_extra_state(self) -> dict:
        return {"previous": self.previous,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.previous = state["previous"]
        if state["optimizer"] is not None:
            for param_state in state["optimizer"]["state"].values():
                param_state["step"] = param_state["step"].cpu()  # as torch.optim keeps it
            self._make_optimizer().load_state_dict(state["optimizer"])

    def _make_optimizer(self) -> torch.optim.Adam:
        self.optimizer = torch.optim.Adam([self.logits], lr=self.logit_lr, weight_decay=self.gamma)
        return self.optimizer

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        log_losses = torch.log(losses.detach() + 1e-8)
        if self.previous is not None:
            delta = self.previous - log_losses
            z = torch.softmax(self.logits, dim=0)
            self.logits.grad = z * (delta - (z * delta).sum())  # (d softmax / d logits)^T delta
            (self.optimizer or self._make_optimizer()).step()
        self.previous = log_losses
        weights = torch.softmax(self.logits, dim=0) / (losses.detach() + 1e-8)
        weights = weights / weights.sum()
        (weights * losses).sum().backward()
        return weights


def each_loss(losses: torch.Tensor, step: Step) -> list[torch.Tensor]:
    """The task losses one by one, as separate tensors where the trainer gives them."""
    return list(losses) if step.task_losses is None else step.task_losses


def sum_backward(losses: torch.Tensor) -> torch.Tensor:
    """Nothing is shared (STL): each task's parameters get their own loss's gradient."""
    losses.sum().backward()
    return torch.ones_like(losses.detach())


CLASSES: dict[str, type[Weighting]] = {
    "ew": EqualWeighting,
    "static": StaticWeighting,
    "uw": UncertaintyWeighting,
    "dwa": DWA,
    "rlw": RLW,
    "gradnorm": GradNorm,
    "famo": FAMO,
}
GRADIENT_METHODS = ("db_mtl", "mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "upgrad")  # in mtl.engine.gradients


class PerGroup(Weighting):
    """One weighting per group of a ``Groups`` model (``arch: groups``), each over its group's
    tasks and that network's own shared parameters and last shared layer, as if each network
    trained alone: a gradient method never combines gradients of two groups (MGDA's min-norm
    point or Nash-MTL's bargaining over all K tasks would couple the groups' step sizes
    through the weights, although their parameters are disjoint), and a loss weighting whose
    weights depend on every task (DWA, RLW, FAMO's softmax) normalises within its group.

    ``members``: per group, the indices of its tasks in the loss vector and its network. The
    backward runs once per group, so with data parallelism it is not one DDP backward:
    ``loss_backward`` is False and the trainer averages the gradients before the step."""

    loss_backward = False

    def __init__(self, task_names: Sequence[str], inner: list[Weighting],
                 members: list[tuple[list[int], nn.Module]]):
        super().__init__(task_names)
        self.inner = nn.ModuleList(inner)
        self.members = list(members)  # a plain list: the networks are the model's, not ours

    def backward(self, losses: torch.Tensor, step: Step) -> torch.Tensor:
        each = each_loss(losses, step)
        weights = torch.zeros_like(losses.detach())
        for weighting, (index, network) in zip(self.inner, self.members):
            shared = network.shared_parameters()
            mine = [each[i] for i in index]
            sub = Step(shared, None, step.epoch,
                       head_params=[p for p in network.parameters() if all(p is not q for q in shared)],
                       last_shared_layer=network.last_shared_layer(), task_losses=mine,
                       processes=step.processes, mean_over_processes=step.mean_over_processes)
            weights[index] = weighting.backward(torch.stack(mine), sub).to(weights.dtype)
        return weights


def for_model(model: nn.Module, name: str, task_names: Sequence[str],
              weights: dict[str, float] | None = None, options: dict | None = None) -> Weighting:
    """The weighting ``name`` for ``model``: ``build``'s, or for a ``Groups`` model a
    ``PerGroup`` of it over each group's network."""
    groups = getattr(model, "groups", None)
    if groups is None:
        return build(name, task_names, weights, options)
    index = {n: i for i, n in enumerate(task_names)}
    return PerGroup(task_names, [build(name, names, weights, options) for names in groups],
                    [([index[n] for n in names], network)
                     for names, network in zip(groups, model.members)])


def build(name: str, task_names: Sequence[str], weights: dict[str, float] | None = None,
          options: dict | None = None) -> Weighting:
    """The weighting named ``name`` (a key of ``mtl.engine.WEIGHTING_OPTIONS``) with its options."""
    if name not in CLASSES and name not in GRADIENT_METHODS:
        raise ValueError(f"unknown weighting '{name}'")
    unknown = set(options or {}) - set(WEIGHTING_OPTIONS[name])
    if unknown:
        raise ValueError(f"weighting '{name}' has no option {', '.join(sorted(unknown))} "
                         f"(options: {', '.join(WEIGHTING_OPTIONS[name]) or 'none'})")
    if name == "static":
        if weights is None:
            raise ValueError("static weighting needs one weight per task")
        return StaticWeighting(task_names, weights)
    if name in GRADIENT_METHODS:
        from mtl.engine.gradients import CLASSES as GRADIENT_CLASSES

        return GRADIENT_CLASSES[name](task_names, **(WEIGHTING_OPTIONS[name] | (options or {})))
    return CLASSES[name](task_names, **(WEIGHTING_OPTIONS[name] | (options or {})))
