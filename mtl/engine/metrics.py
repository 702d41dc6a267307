"""Test metrics on tensors: accuracy, macro-F1 and AUROC (classification), MAE, RMSE and R²
(regression), with torchmetrics' definitions and arithmetic: the values are torchmetrics 1.9's,
bit for bit (tests/test_metrics.py).

Why not torchmetrics itself: importing any part of it imports all of it, with scipy.signal, and
transformers when that is installed (the ``text`` extra): 2.1 s of a 5 s ``mtl evaluate`` on
penguins (BENCHMARKS.md). One difference: a multilabel label without any labelled row gets no
AUROC and is left out of the macro average (torchmetrics fails with an IndexError).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _safe_divide(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``num / denom``, 0 where ``denom`` is 0."""
    return torch.where(denom != 0, num.float() / denom.float(), 0.0)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Share of rows whose predicted class is the target (micro accuracy)."""
    return float(_safe_divide((pred == target).sum(), torch.tensor(len(target))))


def f1_macro(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """The mean over classes of F1 = 2 TP / (2 TP + FN + FP), a class counted only when it is
    predicted or in the target."""
    tp = torch.bincount(target[pred == target], minlength=classes)
    fp = torch.bincount(pred, minlength=classes) - tp
    fn = torch.bincount(target, minlength=classes) - tp
    f1 = _safe_divide(2.0 * tp, 2.0 * tp + fn + fp)
    weights = (tp + fp + fn != 0).float()
    return float(_safe_divide(weights * f1, weights.sum()).sum())


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """The area under the ROC curve of ``score`` for the rows where ``positive``: the trapezoid
    rule over the curve's points at each distinct score (ties share a point); 0 when there is no
    positive or no negative row."""
    order = torch.argsort(score, descending=True)
    score, positive = score[order], positive[order].long()
    last = F.pad(torch.where(score[1:] - score[:-1])[0], [0, 1], value=len(score) - 1)
    tps = F.pad(torch.cumsum(positive, 0)[last], [1, 0])
    fps = F.pad(1 + last - tps[1:], [1, 0])
    fpr = fps / fps[-1] if fps[-1] > 0 else torch.zeros(len(fps))
    tpr = tps / tps[-1] if tps[-1] > 0 else torch.zeros(len(tps))
    return float(torch.trapz(tpr, fpr))


def auroc_macro(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The mean AUROC over the columns of ``scores`` [rows, columns], one against the rest;
    a column whose ``positive`` entries are -1 (unlabelled) leaves them out."""
    values = []
    for column in range(scores.shape[1]):
        labelled = positive[:, column] != -1
        if labelled.any():
            values.append(auroc(scores[labelled, column], positive[labelled, column] == 1))
    return float(torch.tensor(values).mean()) if values else math.nan


def multilabel(prob: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Macro accuracy, F1 and AUROC over the labels of ``prob`` [rows, labels] (a label is
    predicted when its probability is above 0.5); ``labels`` is 1, 0, or -1 where unlabelled."""
    pred = (prob > 0.5).long()
    tp = ((pred == labels) & (labels == 1)).sum(0)
    tn = ((pred == labels) & (labels == 0)).sum(0)
    fp = ((pred != labels) & (labels == 0)).sum(0)
    fn = ((pred != labels) & (labels == 1)).sum(0)
    n = float(labels.shape[1])
    return {"accuracy": float((_safe_divide(tp + tn, tp + tn + fp + fn) / n).sum()),
            "f1_macro": float((_safe_divide(2.0 * tp, 2.0 * tp + fn + fp) / n).sum()),
            "auroc": auroc_macro(prob, labels)}


def regression(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE and R² (1 - RSS / TSS; 1 when both are about 0, 0 when only TSS is, NaN for
    fewer than 2 rows)."""
    n, diff = len(true), pred - true
    rss = torch.sum(diff * diff)
    sum_obs = torch.sum(true)
    tss = torch.sum(true * true) - sum_obs * (sum_obs / n)
    if n < 2:
        r2 = math.nan
    elif abs(float(rss)) <= 1e-4:
        r2 = 1.0
    else:
        r2 = float(1 - rss / tss) if abs(float(tss)) > 1e-4 else 0.0
    return {"mae": float(torch.sum(torch.abs(diff)) / n), "rmse": float(torch.sqrt(rss / n)),
            "r2": r2}
