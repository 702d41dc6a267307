"""k ensemble members in one network, trained in one pass (Gorishniy, Kotelnikov, Babenko,
ICLR 2025, "TabM: Advancing Tabular Deep Learning with Parameter-Efficient Ensembling"), in the
form of the paper's TabM-mini, built from the authors' ``tabm`` package:

- each member sees the encoder's output scaled elementwise by its own adapter (``tabm``'s
  ``ElementwiseAffine`` over [k, d], no bias), one value per feature at initialisation (the
  package's chunks, ``FeatureEncoder.chunks``; per element for an encoder without them): random
  signs over standardised numbers, normal where numbers go through ``ple`` or ``periodic`` (as
  ``TabM.make`` chooses by whether numeric embeddings are present);
- everything between the adapter and the output layers is shared by the members (any
  architecture of ``mtl.engine.archs``: the members are folded into the batch, [N * k, d]);
- each task's output layer is one per member (``tabm.LinearEnsemble``);
- training minimises the mean of the members' losses (``Task.loss`` over [N, k, out]), as the
  authors' code does; in evaluation the model returns the members' mean prediction: the mean
  probability (as logits: its log, or its log-odds) or the mean value.

Where this differs from TabM-mini: the encoder (categorical embeddings, text and image parts)
is ours; TabM one-hot encodes categories. The members share the whole encoder, as TabM shares
its numeric embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tabm
import torch
from torch import nn

from mtl.engine.tasks import Task


class MemberInputs(nn.Module):
    """An encoder's [N, d] output as k members see it, [N * k, d] (row by row, member by member)."""

    def __init__(self, encoder: nn.Module, k: int):
        super().__init__()
        self.encoder, self.k, self.out_dim = encoder, k, encoder.out_dim
        init = "random-signs" if getattr(encoder, "plain_numbers", True) else "normal"
        self.adapter = tabm.ElementwiseAffine((k, encoder.out_dim), bias=False, scaling_init=init,
                                              scaling_init_chunks=getattr(encoder, "chunks", None))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.encoder(inputs)
        return self.adapter(z.unsqueeze(1).expand(-1, self.k, -1)).flatten(0, 1)


def mean_prediction(out: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, k, o] members' outputs -> [N, o]: the logits of the mean probability (binary and
    multilabel: its log-odds; multiclass: its log), or the mean value (regression)."""
    if kind == "regression":
        return out.mean(1)
    log_k = math.log(out.shape[1])
    if kind == "multiclass":
        return torch.logsumexp(out.log_softmax(-1), dim=1) - log_k
    log_p = torch.logsumexp(nn.functional.logsigmoid(out), dim=1) - log_k
    log_q = torch.logsumexp(nn.functional.logsigmoid(-out), dim=1) - log_k
    return log_p - log_q


class MemberOutput(nn.Module):
    """A task's output layer, one per member: [N * k, h] -> [N, k, o] while training, the
    members' ``mean_prediction`` [N, o] in evaluation."""

    def __init__(self, linear: nn.Linear, k: int, kind: str):
        super().__init__()
        self.layer, self.kind = tabm.LinearEnsemble.from_linear(linear, k=k), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x.unflatten(0, (-1, self.layer.k)))
        return out if self.training else mean_prediction(out, self.kind)


def members_encoder(make_encoder: Callable[[], nn.Module], k: int) -> Callable[[], nn.Module]:
    """``make_encoder`` whose encoders feed k members."""
    return lambda: MemberInputs(make_encoder(), k)


def member_outputs_(model: nn.Module, tasks: Sequence[Task], k: int) -> nn.Module:
    """``model`` with the output layer of each task tower (the ``heads`` of every network of
    ``archs``) one per member, in place."""
    kinds = {t.name: t.kind for t in tasks}
    for network in [m for m in model.modules() if isinstance(getattr(m, "heads", None), nn.ModuleDict)]:
        for name, tower in network.heads.items():
            tower[-1] = MemberOutput(tower[-1], k, kinds[name])
    return model
