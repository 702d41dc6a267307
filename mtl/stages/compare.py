"""compare: every variant's test metrics -> one table with Δm against the single-task baseline
(``metrics/compare.json``, its summary ``metrics/summary.json`` and the Markdown report
``reports/compare.md``).

Δm (Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks"; Vandenhende et al. 2021):

    Δm = (1/T) Σ_t (1/M_t) Σ_m (−1)^{h_{t,m}} (M_{t,m} − B_{t,m}) / B_{t,m} × 100

with B the baseline's metric and h = 1 where lower is better, so a positive Δm is better than
single-task learning. Which metrics M_t of a task it averages is ``compare.delta_m``:

- ``primary`` (default): one threshold-free metric per task kind (``PRIMARY``): AUROC for
  binary, multiclass and multilabel tasks, MAE for regression. Accuracy and F1 are taken at a
  0.5 threshold that nobody tuned, so they move with the class balance and with where the
  scores sit, not only with how well the model ranks. On a task with few positives they can
  fall while AUROC holds, and counted in Δm they then outweigh it two to one. MAE rather than
  RMSE: in the target's units and less dominated by a few outliers.
- ``all``: every metric of the task, as Maninis et al. average.

Either way, metrics in ``compare.exclude`` (R² by default) and metrics whose baseline is 0 or
missing are left out, and a task with no metric left is left out of T. The table shows every
metric whatever Δm counts.

With several seeds, each variant's Δm is computed per seed against the baseline's mean over seeds,
and every metric and Δm is reported as mean ± sample std. A difference from the baseline counts as
within noise when Welch's two-sided t-test (unequal variances; Welch 1947) over the per-seed
values gives p >= ``compare.alpha``; for Δm the baseline's own per-seed Δm values are the
reference sample.

The gradient-boosting reference (``compare.reference``, ``mtl.stages.reference``) is one more
row, under the key ``_reference`` of compare.json and summary.json: its metrics and its Δm
against the same baseline mean, from one seeded training, so without std, p or noise mark. It
is never the baseline, and not a variant: it takes no part in the bold best of each column.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from mtl import paths
from mtl.config import REFERENCES, Params
from mtl.engine import HIGHER_IS_BETTER
from mtl.errors import UserError
from mtl.io import read_json, remove_leftovers, write_json, write_text
from mtl.stages import tuned

REFERENCE = "_reference"  # the key of the reference's row (no variant name starts with _)
PRIMARY = {"binary": "auroc", "multiclass": "auroc", "multilabel": "auroc", "regression": "mae"}


def delta_m_metrics(params: Params, metrics: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per task, those of its ``metrics`` that Δm averages under ``compare.delta_m`` (the task
    kind's ``PRIMARY`` metric, or ``all``), less ``compare.exclude``."""
    cfg, kinds = params.compare, {name: task.kind for name, task in params.data.tasks.items()}
    return {task: [m for m in names if m not in cfg.exclude
                   and (cfg.delta_m == "all" or m == PRIMARY[kinds[task]])]
            for task, names in metrics.items()}


def delta_m(metrics: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
            used: dict[str, list[str]]) -> float | None:
    """Δm in percent of ``metrics`` against ``baseline`` (both: task -> metric -> value), over
    the metrics ``used`` of each task (``delta_m_metrics``)."""
    per_task = []
    for task, base in baseline.items():
        changes = []
        for name in used.get(task, []):
            m, b = metrics.get(task, {}).get(name), base.get(name)
            if name not in HIGHER_IS_BETTER or m is None or not b:
                continue
            sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0
            changes.append(sign * (m - b) / b)
        if changes:
            per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task) if per_task else None


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that ``a`` and ``b`` have the same
    mean; None when either has fewer than 2 values. Two constant samples give 1 when equal, else 0
    (the t statistic is undefined there)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # nearly equal samples
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarise(values: list[float], baseline: list[float], alpha: float) -> dict:
    """Mean, sample std, and Welch's p against the baseline's values; ``within_noise`` is True
    when p >= alpha (the difference is not significant), None when there are too few seeds."""
    p = welch_p(values, baseline)
    return {"mean": _round(float(np.mean(values))),
            "std": _round(float(np.std(values, ddof=1))) if len(values) > 1 else None,
            "p": _round(p), "within_noise": None if p is None else bool(p >= alpha)}


def read_metrics(path: Path, tasks: list[str], writer: str) -> dict[str, dict[str, float | None]]:
    """An evaluate output: task -> metric -> value (or null), for exactly ``tasks``; ``writer``:
    the command that writes it again."""
    metrics = read_json(path)
    if isinstance(metrics, dict):
        metrics = {k: v for k, v in metrics.items() if k != paths.GROUPS}
    ok = isinstance(metrics, dict) and sorted(metrics) == sorted(tasks) and all(
        isinstance(m, dict) and all(v is None or isinstance(v, int | float) for v in m.values())
        for m in metrics.values())
    if not ok:
        raise UserError(f"{path}: not the test metrics of tasks {tasks} (re-run '{writer}')")
    return {task: {k: v for k, v in metrics[task].items() if k in HIGHER_IS_BETTER} for task in tasks}


def run(params: Params) -> None:
    remove_leftovers(paths.COMPARE_JSON, paths.SUMMARY_JSON, paths.REPORT)
    runs = {variant: [read_run(variant, seed, params) for seed in params.seeds]
            for variant in params.all_variants}
    base_runs = runs[params.compare.baseline]
    used = delta_m_metrics(params, {task: list(ms) for task, ms in base_runs[0].items()})
    base_mean = {task: {k: _mean([r[task][k] for r in base_runs]) for k in ms}
                 for task, ms in base_runs[0].items()}
    base_dm = [delta_m(r, base_mean, used) for r in base_runs]
    table = {variant: compare_runs(per_seed, base_runs, base_mean, base_dm, used,
                                   params.compare.alpha)
             for variant, per_seed in runs.items()}
    for variant, spec in params.all_variants.items():
        if spec.arch == "groups":
            table[variant]["groups"] = recorded_groups(paths.variant_metrics(variant, params.seeds[0]))
    ref = reference_row(params, base_mean, used)
    extra = {REFERENCE: ref} if ref else {}
    write_json(table | extra, paths.COMPARE_JSON)
    write_json(summary(table | extra, used), paths.SUMMARY_JSON)
    report = render(table, params.compare.baseline, used, params.compare.delta_m, params.seeds,
                    params.compare.alpha, tuned.budget(params), ref)
    write_text(report, paths.REPORT)
    print(report)


def read_run(variant: str, seed: int, params: Params) -> dict[str, dict[str, float | None]]:
    """The test metrics of one run, or one line saying which evaluate stage to run."""
    path = paths.variant_metrics(variant, seed)
    if not path.is_file():
        raise UserError(f"{path}: file not found "
                        f"(run 'mtl evaluate --variant {variant} --seed {seed}' first)")
    return read_metrics(path, list(params.data.tasks),
                        f"mtl evaluate --variant {variant} --seed {seed}")


def reference_row(params: Params, base_mean: dict, used: dict[str, list[str]]) -> dict | None:
    """The reference's row: ``method``, and its ``delta_m`` and ``tasks`` as a variant's (each a
    mean alone) or the ``skipped`` note it wrote; None with ``compare.reference: none``."""
    method = params.compare.reference
    if method == "none":
        return None
    path = paths.REFERENCE_JSON
    if not path.is_file():
        raise UserError(f"{path}: file not found (run 'mtl reference' first)")
    found = read_json(path)
    if isinstance(found, dict) and isinstance(found.get(paths.REFERENCE_SKIPPED), str) and len(found) == 1:
        return {"method": method, "skipped": found[paths.REFERENCE_SKIPPED]}
    metrics = read_metrics(path, list(params.data.tasks), "mtl reference")
    alone = {"std": None, "p": None, "within_noise": None}
    return {"method": method, "delta_m": {"mean": _round(delta_m(metrics, base_mean, used))} | alone,
            "tasks": {task: {m: {"mean": _round(v)} | alone for m, v in ms.items()}
                      for task, ms in metrics.items()}}


def recorded_groups(path: Path) -> list[list[str]]:
    """The groups ``evaluate`` recorded for a run of an ``arch: groups`` variant."""
    groups = read_json(path).get(paths.GROUPS)
    if not isinstance(groups, list):
        raise UserError(f"{path}: no groups recorded for this arch: groups run (re-run its "
                        "evaluate stage)")
    return groups


def compare_runs(per_seed: list[dict], base_runs: list[dict], base_mean: dict,
                 base_dm: list[float | None], used: dict[str, list[str]], alpha: float) -> dict:
    """One variant's row of compare.json: Δm (with its per-seed values) and every task metric,
    each summarised against the baseline's runs (``base_mean``: their mean per task metric;
    ``base_dm``: their own Δm per seed)."""
    missing = {"mean": None, "std": None, "p": None, "within_noise": None}
    tasks = {}
    for task, ms in per_seed[0].items():
        tasks[task] = {}
        for metric in ms:
            values = [r[task][metric] for r in per_seed]
            base = [r.get(task, {}).get(metric) for r in base_runs]
            tasks[task][metric] = (missing if any(v is None for v in values + base)
                                   else summarise(values, base, alpha))
    dms = [delta_m(r, base_mean, used) for r in per_seed]
    delta = missing if None in dms + base_dm else summarise(dms, base_dm, alpha)
    return {"delta_m": delta | {"per_seed": [_round(d) for d in dms]}, "tasks": tasks}


def summary(table: dict, used: dict[str, list[str]]) -> dict:
    """What a user compares between experiments, declared as DVC metrics so that ``dvc metrics
    show`` and ``dvc exp show`` stay readable: per variant, Δm's mean and p-value and the mean
    of each metric Δm counts (compare.json keeps every metric, std and per-seed value)."""
    return {variant: {"delta_m": row["delta_m"]["mean"], "p": row["delta_m"]["p"],
                      **{task: {m: row["tasks"][task][m]["mean"] for m in ms}
                         for task, ms in used.items() if ms}}
            for variant, row in table.items() if "skipped" not in row}


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4) + 0.0  # + 0.0: no -0.0


def render(table: dict, baseline: str, used: dict[str, list[str]], mode: str, seeds: list[int],
           alpha: float, tuning: str, ref: dict | None = None) -> str:
    """A Markdown report: one row per variant, one column per task metric (mean ± std over
    seeds), best means in bold, differences from the baseline within noise marked ≈; then the
    reference's row (``reference_row``) or the note why it was skipped."""
    columns = [(task, metric) for task, ms in table[baseline]["tasks"].items() for metric in ms]
    best = {}
    for task, metric in columns:
        values = [r["tasks"].get(task, {}).get(metric, {}).get("mean") for r in table.values()]
        values = [v for v in values if v is not None]
        if values:
            best[task, metric] = (max if HIGHER_IS_BETTER[metric] else min)(values)
    arrow = {True: "↑", False: "↓"}
    head = ["variant", "Δm % ↑"] + [f"{t} {m} {arrow[HIGHER_IS_BETTER[m]]}" for t, m in columns]
    noise = (f" ≈ marks a difference from `{baseline}` within noise: Welch's two-sided t-test "
             f"over the seeds gives p ≥ {alpha}." if len(seeds) > 1 else
             " One seed: no spread, so nothing can be said about noise; set `seeds` to several.")
    counted = ", ".join(f"{task} {' and '.join(ms)}" for task, ms in used.items() if ms) or "none"
    intro = (f"Test-split metrics of every variant, mean ± std over seeds {seeds}. Δm is the mean "
             f"relative change against the `{baseline}` baseline's mean over tasks and their "
             f"metrics (sign-flipped where lower is better; positive = better than single-task), "
             f"per seed. Δm counts {counted} (`compare.delta_m: {mode}`{MODES[mode]}); the table "
             f"shows every metric. Best mean of each column in bold.{noise} {tuning}")
    if ref and "skipped" not in ref:
        intro += (f" The last row is the gradient-boosting reference (`compare.reference: "
                  f"{ref['method']}`, one model per task, seed {seeds[0]}): one training, so no "
                  f"spread or noise mark; never the baseline, not in the bold.")
    lines = ["# Comparison against single-task learning", "", intro, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, row in table.items():
        name = f"`{variant}`" + (f" {shown(row['groups'])}" if "groups" in row else "")
        cells = [name, "baseline" if variant == baseline else _cell(row["delta_m"], True)]
        for task, metric in columns:
            stat = row["tasks"].get(task, {}).get(metric, {})
            bold = stat.get("mean") is not None and stat["mean"] == best.get((task, metric))
            cells.append(_cell(stat, bold=bold, baseline=variant == baseline))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + reference_lines(ref, columns)) + "\n"


def reference_lines(ref: dict | None, columns: list[tuple[str, str]]) -> list[str]:
    """The reference's row of the table (``columns``: its task metrics), or the note why it was
    skipped."""
    if ref is None:
        return []
    if "skipped" in ref:
        return ["", ref["skipped"][0].upper() + ref["skipped"][1:] + "."]
    cells = [f"{REFERENCES[ref['method']]} (reference)", _cell(ref["delta_m"], True)]
    cells += [_cell(ref["tasks"].get(task, {}).get(metric, {})) for task, metric in columns]
    return ["| " + " | ".join(cells) + " |"]


def shown(groups: list[list[str]]) -> str:
    """Groups in words: ``{a, b} {c}``."""
    return " ".join("{" + ", ".join(g) + "}" for g in groups)


MODES = {"primary": ": one threshold-free metric per task kind, AUROC for classification, MAE "
                    "for regression", "all": ": every metric of a task but `compare.exclude`"}


def _cell(stat: dict, signed: bool = False, bold: bool = False, baseline: bool = False) -> str:
    text = _fmt(stat.get("mean"), signed)
    if stat.get("std") is not None:
        decimals = 2 if signed else 1 if abs(stat["mean"]) >= 100 else 4  # as the mean's
        text += f" ± {stat['std']:.{decimals}f}"
    if bold:
        text = f"**{text}**"
    if stat.get("within_noise") and not baseline:
        text += " ≈"
    return text


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{value:+.2f}" if signed else f"{value:.4f}"
