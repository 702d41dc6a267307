"""compare: every variant's test metrics -> one table with Δm against the single-task baseline
(``metrics/compare.json`` and the Markdown report ``reports/compare.md``).

Δm (Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks"; Vandenhende et al. 2021):

    Δm = (1/T) Σ_t (1/M_t) Σ_m (−1)^{h_{t,m}} (M_{t,m} − B_{t,m}) / B_{t,m} × 100

with B the baseline's metric and h = 1 where lower is better, so a positive Δm is better than
single-task learning. Metrics in ``compare.exclude`` (R² by default) and metrics whose baseline is
0 or missing are left out of the average; a task with no metric left is left out of T.
"""

from __future__ import annotations

from mtl import paths
from mtl.config import Params
from mtl.engine import HIGHER_IS_BETTER
from mtl.errors import UserError
from mtl.io import read_json, write_json, write_text


def delta_m(metrics: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
            exclude: list[str] = ()) -> float | None:
    """Δm in percent of ``metrics`` against ``baseline`` (both: task -> metric -> value)."""
    per_task = []
    for task, base in baseline.items():
        changes = []
        for name, b in base.items():
            m = metrics.get(task, {}).get(name)
            if name in exclude or name not in HIGHER_IS_BETTER or m is None or not b:
                continue
            sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0
            changes.append(sign * (m - b) / b)
        if changes:
            per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task) if per_task else None


def run(params: Params) -> None:
    baseline_name = params.compare.baseline
    results = {}
    for variant in params.variants:
        path = paths.variant_metrics(variant)
        if not path.is_file():
            raise UserError(f"{path}: file not found (run 'mtl evaluate --variant {variant}' first)")
        results[variant] = {task: {k: v for k, v in m.items() if k in HIGHER_IS_BETTER}
                            for task, m in read_json(path).items()}
    baseline = results[baseline_name]
    table = {v: {"delta_m": _round(delta_m(m, baseline, params.compare.exclude)), "tasks": m}
             for v, m in results.items()}
    write_json(table, paths.COMPARE_JSON)
    report = render(table, baseline_name, params.compare.exclude)
    write_text(report, paths.REPORT)
    print(report)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def render(table: dict, baseline: str, exclude: list[str]) -> str:
    """A Markdown report: one row per variant, one column per task metric, best values in bold."""
    columns = [(task, metric) for task, ms in table[baseline]["tasks"].items() for metric in ms]
    best = {}
    for task, metric in columns:
        values = [r["tasks"].get(task, {}).get(metric) for r in table.values()]
        values = [v for v in values if v is not None]
        if values:
            best[task, metric] = (max if HIGHER_IS_BETTER[metric] else min)(values)
    arrow = {True: "↑", False: "↓"}
    head = ["variant", "Δm % ↑"] + [f"{t} {m} {arrow[HIGHER_IS_BETTER[m]]}" for t, m in columns]
    intro = (f"Test-split metrics of every variant. Δm is the mean relative change against the "
             f"`{baseline}` baseline over tasks and their metrics (sign-flipped where lower is "
             f"better; positive = better than single-task). Left out of Δm: "
             f"{', '.join(exclude) or 'nothing'}. Best value of each column in bold.")
    lines = ["# Comparison against single-task learning", "", intro, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, row in table.items():
        dm = row["delta_m"]
        cells = [f"`{variant}`", "baseline" if variant == baseline else _fmt(dm, signed=True)]
        for task, metric in columns:
            value = row["tasks"].get(task, {}).get(metric)
            text = _fmt(value)
            cells.append(f"**{text}**" if value is not None and value == best.get((task, metric)) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{value:+.2f}" if signed else f"{value:.4f}"
