"""The report's verdict: what the measurements support, in a few sentences.

The measured Δm of the trained variants decides (``compare``'s mean over seeds and Welch's test
against the baseline). Task affinity only adds a grouping to try, and only where the seeds bear
it out (``mtl.engine.affinity_summary.Grouping``): a grouping that no variant trains is a
hypothesis, never a recommendation; a grouping a ``grouped`` variant trains (``arch: groups``)
is named with that variant and its measured Δm. The gradient-boosting reference is not a
variant: a sentence says where it stands against the networks (``standing``), after the
verdict on them.
"""

from __future__ import annotations

from mtl.config import REFERENCES
from mtl.engine.affinity_summary import Grouping
from mtl.stages.compare import shown as shown_groups


def verdict(table: dict, baseline: str, groupings: dict[str, tuple[Grouping | None, list[str]]],
            trained: dict[str, list[str]] | None = None, ref: dict | None = None) -> list[str]:
    """Sentences on ``table`` (compare.json without the reference), the reference's row ``ref``
    and the affinity ``groupings`` of the variants that recorded them (variant -> its
    ``Grouping`` or None, and the task names); ``trained``: per such variant, the grouped
    variants whose groups were chosen from its affinity."""
    return [measured(table, baseline), *standing(table, ref),
            *suggested(groupings, table, trained or {})]


def measured(table: dict, baseline: str) -> str:
    """What Δm says: which variant to use, or that sharing did not pay (or hurt) here."""
    rows = {v: row["delta_m"] for v, row in table.items()
            if v != baseline and row["delta_m"]["mean"] is not None}
    if not rows:
        return f"Only `{baseline}` has a Δm: nothing was measured against it."
    ranked = sorted(rows, key=lambda v: rows[v]["mean"], reverse=True)
    best = ranked[0]
    better = [v for v in ranked if rows[v]["within_noise"] is False and rows[v]["mean"] > 0]
    worse = [v for v in ranked if rows[v]["within_noise"] is False and rows[v]["mean"] < 0]
    if better:
        also = f" {_names(better[1:])} also beat it." if better[1:] else ""
        return (f"`{better[0]}` beats `{baseline}` beyond noise ({_dm(rows[better[0]])}) and is the "
                f"best variant measured: use it.{also}")
    if all(rows[v]["within_noise"] is None for v in ranked):
        return (f"No difference from `{baseline}` can be told from noise with one seed; the best "
                f"mean Δm is `{best}`'s ({_dm(rows[best])}). Train on several `seeds` before "
                f"choosing.")
    if len(worse) == len(ranked):
        return (f"Sharing hurt here: every variant is worse than `{baseline}` beyond noise, the "
                f"best measured, `{best}`, too ({_dm(rows[best])}). Keep `{baseline}`.")
    hurt = f" {_names(worse)} {'is' if len(worse) == 1 else 'are'} worse beyond noise." if worse else ""
    return (f"No variant beats `{baseline}` beyond noise: the best measured is `{best}` "
            f"({_dm(rows[best])}, within noise).{hurt} Sharing showed no gain here: keep "
            f"`{baseline}`, the simpler model, unless more seeds show one.")


def standing(table: dict, ref: dict | None) -> list[str]:
    """Where the reference's Δm stands among the networks' mean Δm (the baseline's included);
    nothing when there is no trained reference."""
    if not ref or ref.get("delta_m", {}).get("mean") is None:
        return []
    dm = ref["delta_m"]["mean"]
    means = {v: row["delta_m"]["mean"] for v, row in table.items() if row["delta_m"]["mean"] is not None}
    beaten = [v for v in means if dm > means[v]]
    if len(beaten) == len(means):
        where = "better than every network: on this data the networks have yet to match the trees"
    elif not beaten:
        where = "worse than every network"
    else:
        where = (f"better than {_names(beaten)}, worse than "
                 f"{_names([v for v in means if v not in beaten])}")
    return [(f"{REFERENCES[ref['method']]} reference (one tree model per task, one seed, not a "
            f"variant): Δm {dm:+.2f} %, {where}.")]


def suggested(groupings: dict[str, tuple[Grouping | None, list[str]]], table: dict,
              trained: dict[str, list[str]]) -> list[str]:
    """What task affinity adds: the grouped variants trained from it with their Δm, else a
    grouping to test where it is conclusive, else that it suggests none."""
    lines, silent = [], []
    for variant, (found, names) in groupings.items():
        measured_groups = [g for g in trained.get(variant, []) if "groups" in table.get(g, {})]
        for g in measured_groups:
            dm, groups = table[g]["delta_m"], shown_groups(table[g]["groups"])
            lines.append(f"`{variant}`'s task affinity chose the groups {groups} (TAG), trained as "
                         f"`{g}`: "
                         f"{_dm(dm) if dm['mean'] is not None else 'no Δm'} against the baseline.")
        if measured_groups:
            continue
        if found is None or not found.conclusive:
            silent.append(variant)
            continue
        shown = found.shown(names)
        if found.gain > 0:
            lines.append(f"A hypothesis to test, from `{variant}`'s task affinity: {shown} as two "
                         f"networks (the split gains {found.gain:+.1%} of a task's own step, p = "
                         f"{found.p:.2g}). No variant trains that grouping, so the measurements "
                         f"above stand until one does: a `grouped` variant with `from: {variant}` "
                         f"trains it.")
        else:
            lines.append(f"`{variant}`'s task affinity favours one network for all tasks over "
                         f"{shown} ({found.gain:+.1%} of a task's own step, p = {found.p:.2g}); "
                         f"the measured Δm above decides.")
    if silent:
        lines.append(f"The task affinity of {_names(silent)} is inconclusive and suggests no "
                     f"grouping (see Task affinity).")
    return lines


def _dm(stat: dict) -> str:
    spread = f" ± {stat['std']:.2f}" if stat.get("std") is not None else ""
    p = f", p = {stat['p']:.2g}" if stat.get("p") is not None else ""
    return f"Δm {stat['mean']:+.2f}{spread} %{p}"


def _names(variants: list[str]) -> str:
    return ", ".join(f"`{v}`" for v in variants)
