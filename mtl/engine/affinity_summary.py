"""Task-affinity summaries without torch: averaging the matrices ``AffinityProbe`` records
over runs, and describing them in words (groupings as in Fifty et al. 2021, "Efficiently
Identifying Task Groupings for Multi-Task Learning"). The report stage needs only these, so it
does not import torch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

KINDS = ("cosine", "lookahead")
MAX_GROUPED_TASKS = 8  # describe() scores groupings of at most this many tasks


def mean_over_runs(summaries: Sequence[dict]) -> dict:
    """The mean of ``AffinityProbe.summary()`` dicts of several runs (seeds) of the same tasks;
    ``epochs`` is the total over the runs, ``runs`` their number."""
    if not summaries:
        raise ValueError("no affinity summary to average")
    tasks = summaries[0]["tasks"]
    if any(s["tasks"] != tasks for s in summaries):
        raise ValueError("the runs' affinity summaries are of different tasks")
    return {"tasks": tasks,
            **{kind: to_json(nanmean([from_json(s[kind]) for s in summaries])) for kind in KINDS},
            "epochs": sum(s["epochs"] for s in summaries), "runs": len(summaries)}


def describe(summary: dict) -> list[str]:
    """Plain-language findings: the pairs that conflict (negative mean cosine or affinity), the
    pair that helps each other most, and whether to try splitting the tasks into two networks.

    Groupings follow Fifty et al. 2021: a task's score in a group is the mean affinity onto it
    from the group's other tasks (Z[i, j] over i), 0 for a task alone; a grouping scores the mean
    over all tasks. The best split into two groups is set against all tasks in one network."""
    names = summary["tasks"]
    cos, z = from_json(summary["cosine"]), from_json(summary["lookahead"])
    k = len(names)
    if k < 2 or np.isnan(z).all():
        return ["Task relatedness needs at least two tasks with measured affinities."]
    lines = []
    for i, j in itertools.combinations(range(k), 2):
        why = []
        if cos[i, j] < 0:
            why.append(f"their gradients on the shared layers point apart (cosine {cos[i, j]:.2f})")
        why += [f"a step for {names[a]} raises the loss of {names[b]} (affinity {z[a, b]:.3g}, "
                f"against {z[b, b]:.3g} for a step for {names[b]} itself)"
                for a, b in ((i, j), (j, i)) if z[a, b] < 0]
        if why:
            lines.append(f"{names[i]} and {names[j]} conflict: {'; '.join(why)}.")
    if not lines:
        lines.append("No pair of tasks conflicts: no mean gradient cosine or affinity is negative.")
    mutual = np.where(np.eye(k, dtype=bool), np.nan, (z + z.T) / 2)
    if np.isfinite(mutual).any() and np.nanmax(mutual) > 0:
        i, j = np.unravel_index(np.nanargmax(mutual), mutual.shape)
        lines.append(f"{names[i]} and {names[j]} help each other most (mean affinity "
                     f"{mutual[i, j]:.3g}, gradient cosine {cos[i, j]:.2f}).")
    if k > MAX_GROUPED_TASKS:
        return lines
    together = _grouping_score(z, [list(range(k))])
    split = max(_two_groups(k), key=lambda groups: _grouping_score(z, groups))
    score = _grouping_score(z, split)
    shown = " and ".join("{" + ", ".join(names[i] for i in g) + "}" for g in split)
    if score > together:
        lines.append(f"Grouping to try: {shown} as two networks (score {score:.3g}, against "
                     f"{together:.3g} for all tasks in one network).")
    else:
        lines.append(f"Keep all tasks in one network: it scores {together:.3g}, against "
                     f"{score:.3g} for the best split into two groups, {shown}.")
    return lines


def _grouping_score(z: np.ndarray, groups: list[list[int]]) -> float:
    scores = []
    for group in groups:
        for j in group:
            onto = [z[i, j] for i in group if i != j and np.isfinite(z[i, j])]
            scores.append(float(np.mean(onto)) if onto else 0.0)
    return float(np.mean(scores))


def _two_groups(k: int) -> Iterator[list[list[int]]]:
    """Every split of tasks 0..k-1 into two non-empty groups, each once (task k-1 in the second)."""
    for bits in range(1, 2 ** (k - 1)):
        first = [i for i in range(k - 1) if bits >> i & 1]
        yield [first, [i for i in range(k) if i not in first]]


def nanmean(matrices: Sequence[np.ndarray], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The element-wise mean over the finite entries (NaN where there is none)."""
    if not matrices:
        return np.full(shape, np.nan)
    stacked = np.stack(matrices)
    finite = np.isfinite(stacked)
    count = finite.sum(0)
    total = np.where(finite, stacked, 0.0).sum(0)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def to_json(matrix: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in matrix]


def from_json(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
