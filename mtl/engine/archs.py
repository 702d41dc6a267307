"""Architectures: how the tasks share a network (a trunk, gated experts, cross-stitched columns,
attention over a trunk), or one network per task.

Every model maps ``inputs`` (a dict of tensors) to ``{task name: output}`` and also offers:

- ``forward_with_features(inputs) -> (outputs, features)``: ``features`` is the one shared
  representation all task heads read (for representation-level gradient methods), or None when
  the architecture has no single one;
- ``shared_parameters()``: the parameters every task's loss depends on;
- ``last_shared_layer()``: the weight matrices of the last shared layer before the task
  towers (GradNorm's W); with no hidden layer, the encoder's weight matrices;
- ``selection_groups()``: (tasks, module) pairs; the tasks' summed validation loss picks the best
  epoch of the module's weights.

A module with ``lr_scales() -> [Scaled]`` trains those parameters at their own learning rate
(a fine-tuned encoder's layers, an ``stl`` member with its own settings).

A model reads its encoder only through ``encoder(inputs) -> [N, encoder.out_dim]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import nn

from mtl.engine import ARCH_OPTIONS
from mtl.engine.tasks import Task


class Scaled(NamedTuple):
    """Parameters that train at ``lr * factor``, with ``weight_decay`` when it is set."""

    params: list[nn.Parameter]
    factor: float
    weight_decay: float | None = None


def scaled_groups(module: nn.Module) -> list[Scaled]:
    """The ``lr_scales()`` of ``module`` or, where it has none, of the outermost modules under it
    that have one (an ``stl`` member's own settings then wrap its fine-tuned encoder's)."""
    if hasattr(module, "lr_scales"):
        return [Scaled(*group) for group in module.lr_scales()]
    return [group for child in module.children() for group in scaled_groups(child)]


def mlp(in_dim: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


def _layers(in_dim: int, widths: Sequence[int], dropout: float) -> nn.ModuleList:
    """``mlp`` cut into its layers, for architectures that act between them."""
    return nn.ModuleList(mlp(a, [b], dropout) for a, b in pairwise([in_dim, *widths]))


def _out_width(in_dim: int, widths: Sequence[int]) -> int:
    return widths[-1] if widths else in_dim


def _last_layer(parts: Iterable[nn.Module], encoder: nn.Module) -> list[nn.Parameter]:
    """The weight of the last ``nn.Linear`` of each part; where the parts have none (no hidden
    layer), every weight matrix of the encoder."""
    weights = []
    for part in parts:
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
        weights += [linears[-1].weight] if linears else []
    return weights or [p for p in encoder.parameters() if p.ndim >= 2]


def _towers(in_dim: int, tasks: Sequence[Task], head_hidden: Sequence[int],
            dropout: float) -> nn.ModuleDict:
    """Per task a small tower and its output layer."""
    return nn.ModuleDict({
        t.name: nn.Sequential(mlp(in_dim, head_hidden, dropout),
                              nn.Linear(_out_width(in_dim, head_hidden), t.out_dim))
        for t in tasks})


class HPS(nn.Module):
    """Hard parameter sharing (Caruana 1997, "Multitask Learning"): one encoder and trunk shared
    by all tasks, then a small tower and output layer per task. Last shared layer: the trunk's
    last linear layer (without a trunk, the encoder)."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float):
        super().__init__()
        self.encoder = encoder
        self.trunk = mlp(encoder.out_dim, hidden, dropout)
        self.heads = _towers(_out_width(encoder.out_dim, hidden), tasks, head_hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.forward_with_features(inputs)[0]

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        shared = self.trunk(self.encoder(inputs))
        return {name: head(shared) for name, head in self.heads.items()}, shared

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.trunk.parameters()]

    def last_shared_layer(self) -> list[nn.Parameter]:
        return _last_layer([self.trunk], self.encoder)

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [(list(self.heads), self)]


class STL(nn.Module):
    """Single-task learning: an independent network per task, the baseline of Δm. The members
    share no parameter, so training them in one loop with AdamW equals training each alone;
    each keeps the weights of its own best validation epoch.

    ``per_task``: a member's own ``hidden``, ``head_hidden``, ``dropout``, and learning-rate
    factor and weight decay (``lr_factor``, ``weight_decay``: its optimizer group), which the
    baseline's per-task tuning chooses."""

    def __init__(self, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
                 hidden: Sequence[int], head_hidden: Sequence[int], dropout: float,
                 per_task: dict[str, dict]):
        super().__init__()
        self.per_task = per_task
        layers = {"hidden": hidden, "head_hidden": head_hidden, "dropout": dropout}
        self.members = nn.ModuleDict({t.name: HPS(make_encoder(), [t], **(layers | {
            k: v for k, v in self.per_task.get(t.name, {}).items() if k in layers}))
            for t in tasks})

    def lr_scales(self) -> list[Scaled]:
        """Each member with settings as its own group, at its factor and weight decay; the
        fine-tuned layers inside a member at their factor times the member's."""
        groups = []
        for name, member in self.members.items():
            own, inner = self.per_task.get(name, {}), scaled_groups(member)
            factor, decay = own.get("lr_factor", 1.0), own.get("weight_decay")
            groups += [Scaled(g.params, g.factor * factor,
                              decay if g.weight_decay is None else g.weight_decay) for g in inner]
            apart = {id(p) for g in inner for p in g.params}
            if own:
                groups.append(Scaled([p for p in member.parameters()
                                      if p.requires_grad and id(p) not in apart], factor, decay))
        return groups

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: member(inputs)[name] for name, member in self.members.items()}

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
        return self(inputs), None

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is shared

    def last_shared_layer(self) -> list[nn.Parameter]:
        return []

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [([name], member) for name, member in self.members.items()]


def _mix(weights: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ``weights`` [N, E] mix the expert outputs (E tensors [N, W]) into [N, W]."""
    return torch.einsum("ne,new->nw", weights, torch.stack(experts, dim=1))


class _Extraction(nn.Module):
    """One extraction level of PLE (a Customized Gate Control unit): shared experts, experts of
    each task, and per task a softmax gate over [its own experts + the shared experts]. With
    ``shared_gate``, one more gate mixes all experts into the next level's shared input."""

    def __init__(self, in_dim: int, widths: Sequence[int], dropout: float, names: list[str],
                 shared_experts: int, task_experts: int, shared_gate: bool):
        super().__init__()
        self.shared = nn.ModuleList(mlp(in_dim, widths, dropout) for _ in range(shared_experts))
        self.specific = nn.ModuleDict({
            n: nn.ModuleList(mlp(in_dim, widths, dropout) for _ in range(task_experts))
            for n in names})
        self.gates = nn.ModuleDict({n: nn.Linear(in_dim, task_experts + shared_experts)
                                    for n in names})
        self.shared_gate = (nn.Linear(in_dim, len(names) * task_experts + shared_experts)
                            if shared_gate else None)

    def forward(self, task_in: dict[str, torch.Tensor], shared_in: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor]]:
        """(per task output, shared output or None, per task gate weights [N, experts])."""
        shared = [e(shared_in) for e in self.shared]
        specific = {n: [e(task_in[n]) for e in experts] for n, experts in self.specific.items()}
        weights = {n: torch.softmax(gate(task_in[n]), dim=1) for n, gate in self.gates.items()}
        out = {n: _mix(w, specific[n] + shared) for n, w in weights.items()}
        if self.shared_gate is None:
            return out, None, weights
        every = [h for hs in specific.values() for h in hs] + shared
        return out, _mix(torch.softmax(self.shared_gate(shared_in), dim=1), every), weights


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang, Liu, Zhao, Gong 2020, "Progressive Layered
    Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
    Recommendations"): ``levels`` stacked extraction levels, each with ``shared_experts`` shared
    and ``task_experts`` per-task experts (MLPs of widths ``hidden``). A task's gate mixes its
    own experts and the shared ones; every level but the last also has a shared gate over all
    experts, whose output the next level's shared experts read. The last level feeds the towers.

    Shared parameters (every task's loss depends on them): the encoder and every level's shared
    experts; at each level but the last also the task experts and the shared gate (the shared
    gate mixes them into what every task reads next); and the task gates of levels two or more
    before the last (they feed their task's next experts, which the next shared gate reads).
    Last shared layer: the last linear layer of every shared expert of the last level, as one
    W (every task's gate reads every shared expert; no shared weight lies after them).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float, shared_experts: int = 2,
                 task_experts: int = 1, levels: int = 2):
        super().__init__()
        if shared_experts < 1 or task_experts < 0 or levels < 1:
            raise ValueError("need shared_experts >= 1, task_experts >= 0 and levels >= 1")
        self.encoder = encoder
        self.task_experts = task_experts
        self.levels = nn.ModuleList()
        in_dim = encoder.out_dim
        for level in range(levels):
            self.levels.append(_Extraction(in_dim, hidden, dropout, [t.name for t in tasks],
                                           shared_experts, task_experts, level < levels - 1))
            in_dim = _out_width(in_dim, hidden)
        self.heads = _towers(in_dim, tasks, head_hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run(inputs)[0]

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
        return self(inputs), None

    def gates(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per level, each task gate's weights [N, task experts + shared experts] (softmax)."""
        return self._run(inputs)[1]

    def _run(self, inputs: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        shared = self.encoder(inputs)
        task_in = dict.fromkeys(self.heads, shared)
        weights = []
        for level in self.levels:
            task_in, shared, w = level(task_in, shared)
            weights.append(w)
        return {name: head(task_in[name]) for name, head in self.heads.items()}, weights

    def shared_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters())
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            params += level.shared.parameters()
            if i < last:
                params += [*level.specific.parameters(), *level.shared_gate.parameters()]
            if i < last - 1 and self.task_experts:
                params += level.gates.parameters()
        return params

    def last_shared_layer(self) -> list[nn.Parameter]:
        return _last_layer(self.levels[-1].shared, self.encoder)

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [(list(self.heads), self)]


class CGC(PLE):
    """Customized Gate Control (Tang et al. 2020, "Progressive Layered Extraction (PLE)"): PLE
    with one level. Each task's softmax gate mixes its own ``task_experts`` experts and the
    ``shared_experts`` shared ones; no task reads another task's experts. Shared parameters:
    the encoder and the shared experts; last shared layer: the shared experts' last linear
    layers."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float, shared_experts: int = 2,
                 task_experts: int = 1):
        super().__init__(encoder, tasks, hidden, head_hidden, dropout, shared_experts,
                         task_experts, levels=1)


class MMoE(PLE):
    """Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong, Chi 2018, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"): ``experts``
    expert MLPs (widths ``hidden``) on the encoded inputs, and per task a softmax gate over all
    of them feeding the task's tower; it is CGC without task experts. Shared parameters: the
    encoder and the experts (every gate gives every expert a positive weight); the gates are
    per task. Last shared layer: every expert's last linear layer, as one W."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float, experts: int = 4):
        super().__init__(encoder, tasks, hidden, head_hidden, dropout, experts, 0, levels=1)


def _stitch_init(k: int, keep: float = 0.9) -> torch.Tensor:
    """``keep`` on the diagonal, the rest of each row spread evenly (rows sum to 1)."""
    if k == 1:
        return torch.ones(1, 1)
    return torch.full((k, k), (1 - keep) / (k - 1)).fill_diagonal_(keep)


class CrossStitch(nn.Module):
    """Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert 2016, "Cross-stitch Networks
    for Multi-task Learning"): on the shared encoder, one column (an MLP of widths ``hidden``)
    per task; after each layer a learnable K×K unit ``alpha`` mixes the columns,
    ``h'_k = sum_j alpha[k, j] h_j``, starting near the identity (0.9 on the diagonal).

    Shared parameters: the encoder, the stitch units and also every column, since each column
    reaches every task through the off-diagonal stitch weights; only the towers are per task.
    Last shared layer: the last linear layer of every column, as one W. Not the last stitch
    unit: though every task's loss reaches it, task k's gradient on it lies in row k alone
    (only tower k reads mixed column k), so per entry it is a task-specific parameter.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float):
        super().__init__()
        self.encoder = encoder
        self.columns = nn.ModuleDict({t.name: _layers(encoder.out_dim, hidden, dropout)
                                      for t in tasks})
        self.stitches = nn.ParameterList(nn.Parameter(_stitch_init(len(tasks))) for _ in hidden)
        self.heads = _towers(_out_width(encoder.out_dim, hidden), tasks, head_hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.encoder(inputs)
        h = [x] * len(self.columns)
        for i, alpha in enumerate(self.stitches):
            out = torch.stack([column[i](h_k) for column, h_k in zip(self.columns.values(), h)])
            h = list(torch.einsum("kj,jnw->knw", alpha, out))
        return {name: head(h_k) for (name, head), h_k in zip(self.heads.items(), h)}

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
        return self(inputs), None

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.columns.parameters(), *self.stitches]

    def last_shared_layer(self) -> list[nn.Parameter]:
        return _last_layer(self.columns.values(), self.encoder)

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [(list(self.heads), self)]


class MTAN(nn.Module):
    """Multi-Task Attention Network (Liu, Johns, Davison 2019, "End-to-End Multi-Task Learning
    with Attention"), in a tabular/MLP version: a shared trunk (an MLP of widths ``hidden``)
    and, per task, an attention path. At trunk layer l the task's soft mask
    ``m = sigmoid(Linear([t_{l-1}, s_l]))`` weights the layer's output element-wise,
    ``t_l = m * s_l`` (``t_0`` is the encoded input); the task tower reads the last ``t``. The
    paper's attention modules are convolutions between ResNet/SegNet blocks; here each is one
    linear layer between trunk layers.

    Shared parameters: the encoder and the trunk; the attention layers are per task. Last
    shared layer: the trunk's last linear layer (without a trunk, the encoder).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], hidden: Sequence[int],
                 head_hidden: Sequence[int], dropout: float):
        super().__init__()
        self.encoder = encoder
        self.trunk = _layers(encoder.out_dim, hidden, dropout)
        dims = [encoder.out_dim, *hidden]
        self.attention = nn.ModuleDict({
            t.name: nn.ModuleList(nn.Linear(a + b, b) for a, b in pairwise(dims))
            for t in tasks})
        self.heads = _towers(dims[-1], tasks, head_hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run(inputs)[0]

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
        return self(inputs), None

    def masks(self, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per task, its attention mask at each trunk layer ([N, width], in (0, 1))."""
        return self._run(inputs)[1]

    def _run(self, inputs: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        x = self.encoder(inputs)
        shared = []
        for layer in self.trunk:
            shared.append(layer(shared[-1] if shared else x))
        outputs, masks = {}, {}
        for name, path in self.attention.items():
            t, masks[name] = x, []
            for attend, s in zip(path, shared):
                masks[name].append(torch.sigmoid(attend(torch.cat([t, s], dim=1))))
                t = masks[name][-1] * s
            outputs[name] = self.heads[name](t)
        return outputs, masks

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.trunk.parameters()]

    def last_shared_layer(self) -> list[nn.Parameter]:
        return _last_layer([self.trunk], self.encoder)

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [(list(self.heads), self)]


class Groups(nn.Module):
    """Task groupings (Fifty, Amid, Zhao, Yu, Anil, Finn 2021, "Efficiently Identifying Task
    Groupings for Multi-Task Learning"; Standley et al. 2020): the tasks are partitioned into
    ``groups`` (lists of task names), and each group is its own network: ``inner`` (default
    ``hps``, with its default options) over a group of two or more tasks, a single-task network
    (``hps`` over the one task, as each of ``stl``'s) over a group of one. The networks share
    nothing. They are built group by group, in order, each from a fresh encoder, so one group
    per task (in task order) creates ``stl``'s parameters and one group of all ``inner``'s, from
    the same random state.

    ``shared_parameters()``: those shared within a group (each network's own), so that the
    affinity probe measures pairs within a group; a step for a task leaves every other group's
    loss unchanged, so a pair across groups measures 0. No layer is shared by every task:
    ``last_shared_layer()`` is empty, and the variant's weighting runs per group on each
    network's own shared parameters and last shared layer (``weighting.PerGroup``).
    """

    def __init__(self, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
                 hidden: Sequence[int], head_hidden: Sequence[int], dropout: float,
                 groups: Sequence[Sequence[str]] | None = None, inner: str = "hps"):
        super().__init__()
        if inner not in _CLASSES:
            raise ValueError(f"inner: '{inner}' is not an architecture of one network "
                             f"({', '.join(_CLASSES)})")
        by_name = {t.name: t for t in tasks}
        if groups is None or sorted(n for g in groups for n in g) != sorted(by_name) or not all(groups):
            raise ValueError(f"groups: {groups} must list each task ({', '.join(by_name)}) once")
        self.groups = [list(g) for g in groups]
        self.order = [t.name for t in tasks]
        self.members = nn.ModuleList(
            _CLASSES[inner if len(g) > 1 else "hps"](
                make_encoder(), [by_name[n] for n in g], hidden, head_hidden, dropout)
            for g in self.groups)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {name: out for member in self.members for name, out in member(inputs).items()}
        return {name: outputs[name] for name in self.order}

    def forward_with_features(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
        return self(inputs), None

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for member in self.members for p in member.shared_parameters()]

    def last_shared_layer(self) -> list[nn.Parameter]:
        return []

    def selection_groups(self) -> list[tuple[list[str], nn.Module]]:
        return [group for member in self.members for group in member.selection_groups()]


_CLASSES = {"hps": HPS, "mmoe": MMoE, "cgc": CGC, "ple": PLE, "cross_stitch": CrossStitch,
            "mtan": MTAN}


def build(arch: str, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
          hidden: Sequence[int], head_hidden: Sequence[int], dropout: float,
          options: dict | None = None, per_task: dict[str, dict] | None = None,
          ensemble: int = 1) -> nn.Module:
    """The model named ``arch`` (one of ``mtl.engine.ARCHITECTURES``); ``options`` override the
    defaults in ``ARCH_OPTIONS[arch]``; ``per_task``: ``stl``'s members' own settings;
    ``ensemble``: k > 1 makes each network an ensemble of k members (``mtl.engine.ensemble``)."""
    if ensemble < 1:
        raise ValueError(f"ensemble: {ensemble} members; it must be at least 1")
    if ensemble == 1:
        return _build(arch, make_encoder, tasks, hidden, head_hidden, dropout, options, per_task)
    from mtl.engine import ensemble as members

    model = _build(arch, members.members_encoder(make_encoder, ensemble), tasks, hidden,
                   head_hidden, dropout, options, per_task)
    return members.member_outputs_(model, tasks, ensemble)


def _build(arch: str, make_encoder: Callable[[], nn.Module], tasks: Sequence[Task],
           hidden: Sequence[int], head_hidden: Sequence[int], dropout: float,
           options: dict | None, per_task: dict[str, dict] | None) -> nn.Module:
    if arch not in ARCH_OPTIONS:
        raise ValueError(f"unknown architecture '{arch}'")
    unknown = set(options or {}) - set(ARCH_OPTIONS[arch])
    if unknown:
        raise ValueError(f"architecture '{arch}' has no option {sorted(unknown)}")
    if per_task and arch != "stl":
        raise ValueError(f"per-task settings are for arch 'stl', not '{arch}'")
    if arch == "stl":
        return STL(make_encoder, tasks, hidden, head_hidden, dropout, per_task or {})
    if arch == "groups":
        return Groups(make_encoder, tasks, hidden, head_hidden, dropout,
                      **(ARCH_OPTIONS[arch] | (options or {})))
    return _CLASSES[arch](make_encoder(), tasks, hidden, head_hidden, dropout,
                          **(ARCH_OPTIONS[arch] | (options or {})))
