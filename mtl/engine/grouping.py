"""Choosing task groups from measured inter-task affinity (Fifty, Amid, Zhao, Yu, Anil, Finn
2021, "Efficiently Identifying Task Groupings for Multi-Task Learning", TAG): the network
selection step, without torch.

A task's score in a group is the mean affinity onto it from the group's other tasks
(``Z[i, j]`` over ``i``: how a step for task ``i`` lowers task ``j``'s loss); a grouping scores
the mean over all tasks. Where we differ from the authors' network-selection notebook
(``tag/network_selection/TAG_network_selection.ipynb``), and why:

- **Partitions, not covers.** The notebook picks up to N possibly overlapping groups and scores
  each task by its best group; we train one network per group and serve each task from it, so
  a task is in exactly one group (for a partition the two scores agree).
- **A task alone scores 0, not -1e6.** The notebook makes a group of one unselectable; 0 (no
  transfer, nothing lost) lets a task that every other task hurts stand alone, which is the
  grouping that negative affinities ask for.
- **Noise (an option, off by default).** ``affinity_summary.lower_bound`` counts each affinity
  as its mean over runs (seeds) less ``k`` standard errors of that mean, so that a transfer the
  seeds do not agree on (MultiFashion's left/right: +1e-4, -6e-4, +1e-3 against self-affinities
  of 3e-3 to 1e-2) does not merge networks; TAG itself averages (``k = 0``).
- **Search.** Exhaustive over partitions into at most ``max_groups`` groups up to
  ``MAX_EXHAUSTIVE`` tasks (4,140 partitions of 8); above, a greedy approximation: start from
  one group per task and merge the pair of groups that raises the score most while one does
  (then, while there are too many groups, the pair that lowers it least). Ties go to fewer
  groups.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_EXHAUSTIVE = 8


def score(z: np.ndarray, groups: list[list[int]]) -> float:
    """The TAG score of ``groups`` (lists of task indices) under affinities ``z`` (K×K, NaN =
    not measured): per task the mean finite affinity onto it from its group, 0 alone; their mean."""
    scores = []
    for group in groups:
        for j in group:
            onto = [z[i, j] for i in group if i != j and np.isfinite(z[i, j])]
            scores.append(float(np.mean(onto)) if onto else 0.0)
    return float(np.mean(scores))


def partitions(k: int, max_groups: int) -> Iterator[list[list[int]]]:
    """Every partition of tasks 0..k-1 into at most ``max_groups`` groups, each once (restricted
    growth strings: task i joins one of the groups so far or opens the next)."""
    def grow(i: int, groups: list[list[int]]) -> Iterator[list[list[int]]]:
        if i == k:
            yield [list(g) for g in groups]
            return
        for group in groups:
            group.append(i)
            yield from grow(i + 1, groups)
            group.pop()
        if len(groups) < max_groups:
            groups.append([i])
            yield from grow(i + 1, groups)
            groups.pop()
    return grow(0, [])


def _greedy(z: np.ndarray, max_groups: int) -> list[list[int]]:
    groups = [[i] for i in range(len(z))]
    while len(groups) > 1:
        merged = [[g for c, g in enumerate(groups) if c not in (a, b)] + [groups[a] + groups[b]]
                  for a in range(len(groups)) for b in range(a + 1, len(groups))]
        best = max(merged, key=lambda gs: score(z, gs))
        if score(z, best) <= score(z, groups) and len(groups) <= max_groups:
            break
        groups = best
    return [sorted(g) for g in sorted(groups)]


def choose(z: np.ndarray, max_groups: int, runners_up: int = 3) -> list[tuple[float, list[list[int]]]]:
    """The best partition of the tasks by ``score`` with at most ``max_groups`` groups, then up
    to ``runners_up`` next best (none above ``MAX_EXHAUSTIVE`` tasks): (score, groups) pairs."""
    if len(z) > MAX_EXHAUSTIVE:
        best = _greedy(z, max_groups)
        return [(score(z, best), best)]
    ranked = sorted(((score(z, gs), gs) for gs in partitions(len(z), max_groups)),
                    key=lambda pair: (-pair[0], len(pair[1])))
    return ranked[:1 + runners_up]
