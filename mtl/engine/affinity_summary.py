"""Task-affinity summaries without torch: averaging the matrices ``AffinityProbe`` records
over runs, and describing them in words (groupings as in Fifty et al. 2021, "Efficiently
Identifying Task Groupings for Multi-Task Learning"). The report stage needs only these, so it
does not import torch.

Unlike the paper, which measures at every step of one long run, the matrices here are a few
batches an epoch over a few seeds, and affinities on tables are often tiny (1e-5 where a task's
own step gives 1e-3). So a grouping is proposed only when the seeds bear it out (``Grouping``):
its gain is distinguishable from 0 by a t-test over the seeds, as ``compare`` tests Δm, and at
least ``NEGLIGIBLE`` of a task's own step, below which the transfer between tasks is too small
next to each task's own learning to decide an architecture; otherwise the report says the
affinities are inconclusive."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mtl.engine.grouping import score as grouping_score

KINDS = ("cosine", "lookahead")
MAX_GROUPED_TASKS = 8  # describe() scores groupings of at most this many tasks
NEGLIGIBLE = 0.05
"""The smallest gain of one grouping over another, in units of a task's own step (``Grouping``),
that lets the affinities choose between them."""


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


@dataclass(frozen=True)
class Grouping:
    """The best split of the tasks into two networks set against one network for all, chosen on
    the mean affinities of several runs (seeds), and how far the runs bear the choice out.

    ``gains``: per run, the split's score minus one network's, divided by the run's mean
    self-affinity Z[j, j] (the drop of a task's loss after a step for that task itself). In
    that unit a gain of 0.05 means that the grouping changes the help each task gets from the
    others' steps by 5% of what its own step does for it."""

    split: list[list[int]]
    score_split: float
    score_one: float
    gains: list[float]
    p: float | None
    """One-sample t-test that the mean gain is 0 (None with fewer than 2 runs)."""
    alpha: float

    @property
    def gain(self) -> float:
        return float(np.mean(self.gains)) if self.gains else math.nan

    def shown(self, names: list[str]) -> str:
        """The split in words, e.g. ``{a, b} and {c}``."""
        return " and ".join("{" + ", ".join(names[i] for i in g) + "}" for g in self.split)

    @property
    def conclusive(self) -> bool:
        """The runs choose: the mean gain is distinguishable from 0 (p < alpha) and at least
        ``NEGLIGIBLE`` (5%) of a task's own step, in either direction."""
        return self.p is not None and self.p < self.alpha and abs(self.gain) >= NEGLIGIBLE


def grouping(runs: Sequence[dict], alpha: float) -> Grouping | None:
    """The ``Grouping`` of the runs' ``AffinityProbe.summary()`` dicts, or None with fewer than 2
    or more than ``MAX_GROUPED_TASKS`` tasks or no measured affinity."""
    z = from_json(mean_over_runs(runs)["lookahead"])
    k = len(z)
    if not 2 <= k <= MAX_GROUPED_TASKS or np.isnan(z).all():
        return None
    one = [list(range(k))]
    split = max(_two_groups(k), key=lambda groups: grouping_score(z, groups))
    gains = []
    for run in runs:
        zr = from_json(run["lookahead"])
        own = np.nanmean(np.diag(zr)) if np.isfinite(np.diag(zr)).any() else math.nan
        if own > 0:
            gains.append((grouping_score(zr, split) - grouping_score(zr, one)) / own)
    return Grouping(split, grouping_score(z, split), grouping_score(z, one), gains,
                    one_sample_p(gains), alpha)


def one_sample_p(values: list[float]) -> float | None:
    """Two-sided p-value of Student's one-sample t-test that the mean of ``values`` is 0; None for
    fewer than 2 values; constant values give 1 when all 0, else 0."""
    if len(values) < 2:
        return None
    if np.var(values) == 0:
        return 1.0 if values[0] == 0 else 0.0
    from scipy import stats  # here: scipy.stats costs every training 0.8 s to import

    return float(stats.ttest_1samp(values, 0.0).pvalue)


def describe(runs: Sequence[dict], alpha: float) -> list[str]:
    """Plain-language findings of several runs' affinities: the pairs that conflict (negative
    mean cosine or affinity), the pair that helps each other most, and what the affinities say
    about grouping the tasks (``Grouping``): a split to try, one network, or nothing when they
    are inconclusive.

    Groupings follow Fifty et al. 2021: a task's score in a group is the mean affinity onto it
    from the group's other tasks (Z[i, j] over i), 0 for a task alone; a grouping scores the mean
    over all tasks. The best split into two groups is set against all tasks in one network."""
    summary = mean_over_runs(runs)
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
        shares = [z[a, b] / z[b, b] for a, b in ((i, j), (j, i)) if z[b, b] > 0]
        share = (f", {np.mean(shares):.1%} of what a step for each does to its own loss"
                 if shares else "")
        lines.append(f"{names[i]} and {names[j]} help each other most (mean affinity "
                     f"{mutual[i, j]:.3g}{share}; gradient cosine {cos[i, j]:.2f}).")
    found = grouping(runs, alpha)
    return lines if found is None else [*lines, grouping_sentence(found, names)]


def grouping_sentence(found: Grouping, names: list[str]) -> str:
    """What ``found`` says about grouping the tasks ``names``, in one sentence."""
    shown = found.shown(names)
    scores = (f"score {found.score_split:.3g} against {found.score_one:.3g} for one network; the "
              f"split gains {found.gain:+.1%} of a task's own step")
    noise = (f"p = {found.p:.2g} over {len(found.gains)} seeds" if found.p is not None else
             "fewer than 2 seeds, so nothing can be said about noise")
    if not found.conclusive:
        return (f"Inconclusive: the seeds do not bear out a choice between the best split into "
                f"two networks, {shown}, and one network for all tasks ({scores}; {noise}; a "
                f"choice needs p < {found.alpha:g} and a gain of at least {NEGLIGIBLE:.0%} either "
                f"way). These affinities support no grouping.")
    if found.gain > 0:
        return f"Grouping to try: {shown} as two networks ({scores}; {noise})."
    return f"One network for all tasks scores best: better than the best split, {shown} ({scores}; {noise})."


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


def lower_bound(runs: Sequence[np.ndarray], k: float) -> np.ndarray:
    """Per entry, the mean over ``runs`` (K×K affinities, NaN = not measured) less ``k``
    standard errors of that mean (sample std / sqrt(n)); the plain mean where fewer than two
    runs measured the entry."""
    mean = nanmean(runs)
    count = np.isfinite(np.stack(runs)).sum(0)
    variance = nanmean([(m - mean) ** 2 for m in runs])  # over the n finite runs, divided by n
    return np.where(count >= 2, mean - k * np.sqrt(variance / np.maximum(count - 1, 1)), mean)


def to_json(matrix: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in matrix]


def from_json(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
