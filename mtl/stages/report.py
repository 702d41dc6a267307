"""report: the comparison, training curves and task affinity as plots and one report ->
``reports/plots/*.png``, ``reports/report.md`` and ``reports/index.html`` (the same report as a
self-contained web page; both link the images relative to ``reports/``).

The plots (matplotlib figures rendered by Agg, no display needed), curves averaged over seeds:

- ``val_loss.png``: each task's validation loss per epoch, one panel a task, one line a variant;
- ``weights.png``: the weight each task's loss got per epoch, one panel a variant;
- ``pareto.png``: for each pair of tasks, every variant's change against the baseline on the
  task's (first) metric that Δm counts (in %, signed so that up and right are better); the
  baseline sits at the origin, and variants that no other variant beats on both tasks are filled;
- ``affinity-<variant>.png``: the task-affinity matrices of each variant that recorded them;
- ``tuning.png``: with ``tune.trials`` > 0, each variant's best objective so far over its trials.
"""

from __future__ import annotations

import html
import itertools
import math
import re
import shutil
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mtl import paths
from mtl.config import Params
from mtl.engine import HIGHER_IS_BETTER
from mtl.engine.affinity_summary import describe, grouping, mean_over_runs
from mtl.errors import UserError
from mtl.io import (
    OPTIONAL_NUMBER,
    atomic_paths,
    mismatch,
    read_json,
    read_text,
    remove_leftovers,
    replace_dirs,
    temp_dir,
)
from mtl.stages import tuned
from mtl.stages.compare import REFERENCE, delta_m_metrics
from mtl.stages.verdict import verdict

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # epochs, mean and std over seeds


def run(params: Params) -> None:
    remove_leftovers(paths.PLOTS_DIR, paths.FULL_REPORT, paths.REPORT_HTML)
    for path in (paths.COMPARE_JSON, paths.REPORT):
        if not path.is_file():
            raise UserError(f"{path}: file not found (run 'mtl compare' or 'dvc repro compare' first)")
    baseline, seeds = params.compare.baseline, params.seeds
    table, ref = read_comparison(baseline)
    tasks = list(table[baseline]["tasks"])
    used = delta_m_metrics(params, {t: list(ms) for t, ms in table[baseline]["tasks"].items()})
    firsts = {t: ms[0] for t, ms in used.items() if ms}
    runs = {v: r for v in table if (r := affinity_runs(v, seeds))}
    studies = {k: v for name in params.variants for k, v in read_studies(name).items()
               } if params.tune.trials else {}
    affinity = {v: mean_over_runs(r) for v, r in runs.items()}
    figures = {
        "val_loss.png": curves_figure(
            {t: {v: mean_curve(v, seeds, f"val/loss/{t}") for v in table} for t in tasks}, "validation loss"),
        "weights.png": curves_figure(
            {v: {t: mean_curve(v, seeds, f"weight/{t}") for t in tasks} for v in table}, "task weight"),
        "pareto.png": pareto_figure(table, baseline, firsts),
        "tuning.png": tuning_figure(studies),
    } | {f"affinity-{v}.png": affinity_figure(s, v) for v, s in affinity.items()}
    images = {name: fig for name, fig in figures.items() if fig is not None}
    alpha = params.compare.alpha
    trained = {v: [g for g, spec in params.grouped.items()
                   if spec.arch_options["groups"]["from"] == v] for v in runs}
    advice = verdict(table, baseline, {v: (grouping(r, alpha), affinity[v]["tasks"]) for v, r in runs.items()},
                     trained, ref)
    findings = {v: describe(r, alpha) for v, r in runs.items()}
    markdown = render(read_text(paths.REPORT), table, baseline, seeds, firsts, images,
                      affinity, findings, advice)
    markdown += "\n".join(tuning_section(tuned.budget(params), studies, "tuning.png" in images))
    write(images, markdown)
    print(f"report: {len(images)} plots in {paths.PLOTS_DIR} -> {paths.FULL_REPORT}, {paths.REPORT_HTML}")


def write(images: dict[str, Figure], markdown: str) -> None:
    """The plots, report.md and index.html, each replacing the previous one once all are
    written."""
    with atomic_paths(paths.FULL_REPORT, paths.REPORT_HTML) as (md, page):
        work = temp_dir(paths.PLOTS_DIR.parent, paths.PLOTS_DIR.name)
        try:
            for name, fig in images.items():
                fig.savefig(work / name, dpi=100)
            md.write_text(markdown, encoding="utf-8")
            page.write_text(to_html(markdown), encoding="utf-8")
            replace_dirs((work, paths.PLOTS_DIR))
        finally:
            shutil.rmtree(work, ignore_errors=True)


# What compare writes, as far as the report reads it: per variant, task and metric, the mean
# and std over seeds.
COMPARISON = {str: {"tasks": {str: {str: {"mean": OPTIONAL_NUMBER, "std": OPTIONAL_NUMBER}}}}}
# What train writes to models/<variant>/seed-<seed>/affinity.json (AffinityProbe.summary).
AFFINITY = {"tasks": [str], "cosine": [[OPTIONAL_NUMBER]], "lookahead": [[OPTIONAL_NUMBER]],
            "epochs": int}


def read_comparison(baseline: str) -> tuple[dict, dict | None]:
    """compare.json, with the structure compare writes and a row for ``baseline``: the variants'
    rows, and the reference's row (None without one)."""
    table = read_json(paths.COMPARE_JSON)
    ref = table.pop(REFERENCE, None) if isinstance(table, dict) else None
    if problem := _comparison_problem(table, baseline):
        raise UserError(f"{paths.COMPARE_JSON}: {problem} (run 'mtl compare' again)")
    return table, ref


def _comparison_problem(table: object, baseline: str) -> str | None:
    if problem := mismatch(table, COMPARISON):
        return problem
    if baseline not in table:
        return f"has no row for the baseline '{baseline}'"
    unknown = [m for row in table.values() for ms in row["tasks"].values() for m in ms
               if m not in HIGHER_IS_BETTER]
    return f"unknown metric '{unknown[0]}'" if unknown else None


def read_curve(path: Path, retrain: str) -> dict[int, float]:
    """Step -> value of one dvclive metric file (tab-separated, a ``step`` column, value last);
    ``retrain``: the command that writes it again."""
    try:
        header, *rows = (line.split("\t") for line in read_text(path).splitlines())
        step = header.index("step")
        return {int(row[step]): float(row[-1]) for row in rows}
    except (ValueError, IndexError):
        raise UserError(f"{path}: not a metric file of dvclive (run '{retrain}' again)") from None


def mean_curve(variant: str, seeds: list[int], metric: str) -> Curve | None:
    """Mean and std of a dvclive metric per epoch, over the seeds that logged that epoch; None
    when no seed logged the metric."""
    files = {s: paths.live_dir(variant, s) / "plots" / "metrics" / f"{metric}.tsv" for s in seeds}
    curves = [read_curve(f, retrain(variant, s)) for s, f in files.items() if f.is_file()]
    if not curves:
        return None
    steps = sorted(set().union(*curves))
    values = [[c[s] for c in curves if s in c] for s in steps]
    spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]  # sample std, as compare
    return np.array(steps), np.array([np.mean(v) for v in values]), np.array(spread)


def affinity_runs(variant: str, seeds: list[int]) -> list[dict]:
    """The variant's task-affinity summaries of the seeds that recorded one."""
    files = {s: paths.model_dir(variant, s) / "affinity.json" for s in seeds}
    summaries = {s: read_json(f) for s, f in files.items() if f.is_file()}
    first = next(iter(summaries), None)
    for seed, summary in summaries.items():
        problem = mismatch(summary, AFFINITY) or _not_square(summary)
        if problem is None and summary["tasks"] != summaries[first]["tasks"]:
            problem = (f"of tasks {summary['tasks']}, but {files[first]} of "
                       f"{summaries[first]['tasks']}")
        if problem:
            raise UserError(f"{files[seed]}: {problem} (run '{retrain(variant, seed)}' again)")
    return list(summaries.values())


def _not_square(summary: dict) -> str | None:
    k = len(summary["tasks"])
    if any(len(m) != k or any(len(row) != k for row in m)
           for m in (summary["cosine"], summary["lookahead"])):
        return f"its matrices are not {k} x {k} (a row and a column per task)"
    return None


STUDY = {"objective": str, "direction": str, "params": {str: object},
         "value": OPTIONAL_NUMBER, "importances": (dict, str),
         "trials": [{"number": int, "state": str, "value": OPTIONAL_NUMBER}]}


def read_studies(variant: str) -> dict[str, dict]:
    """The studies in ``tuned/<variant>.json`` of a tuned variant, as far as the report reads
    them: ``{variant: study}``, or a per-task baseline's ``{"variant · task": study}``."""
    chosen = tuned.read(variant)
    studies = {f"{variant} · {task}": study for task, study in chosen.get("studies", {}).items()}
    studies = studies or {variant: chosen}
    for study in studies.values():
        if problem := mismatch(study, STUDY):
            raise UserError(f"{paths.tuned_path(variant)}: {problem}; "
                            f"run `mtl tune --variant {variant}`")
    return studies


def best_so_far(study: dict) -> tuple[list[int], list[float]]:
    """The trial numbers of the complete trials and the best objective up to each."""
    better = min if study["direction"] == "minimize" else max
    numbers, best = [], []
    for trial in study["trials"]:
        if trial["state"] == "complete" and trial["value"] is not None:
            numbers.append(trial["number"])
            best.append(trial["value"] if not best else better(best[-1], trial["value"]))
    return numbers, best


def tuning_figure(studies: dict[str, dict]) -> Figure | None:
    """One panel a tuned variant: its best objective so far over the trials."""
    if not studies:
        return None
    fig, axes = grid(len(studies), 4.0, 3.0)
    for ax, (variant, study) in zip(axes, studies.items()):
        numbers, best = best_so_far(study)
        ax.step(numbers, best, where="post", linewidth=1.2)
        ax.plot(numbers, best, "o", markersize=3)
        ax.set(title=variant, xlabel="trial", ylabel=f"best {study['objective']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def tuning_section(budget: str, studies: dict[str, dict], plotted: bool) -> list[str]:
    """The report's tuning section: the budget, the best-so-far plot, and per variant the chosen
    params and Optuna's parameter importances."""
    lines = ["", "## Tuning", "", budget, ""]
    if plotted:
        lines += ["![Best objective so far over trials](plots/tuning.png)", "",
                  ("Each variant's best objective so far over its complete trials (pruned and "
                   "failed trials are listed in tuned/<variant>.json)."), ""]
    for variant, study in studies.items():
        chosen = ", ".join(f"`{k}` = {v!r}" for k, v in study["params"].items()) or "none"
        value = "no complete trial" if study["value"] is None else f"{study['value']:.4g}"
        importances = study["importances"]
        if isinstance(importances, dict):
            importances = ", ".join(f"`{k}` {v:.2f}" for k, v in importances.items())
        lines += [f"### `{variant}`", "", f"- chosen: {chosen}",
                  f"- best {study['objective']} ({study['direction']}): {value}",
                  f"- parameter importances (Optuna, fANOVA): {importances}", ""]
    return lines


def retrain(variant: str, seed: int) -> str:
    return f"mtl train --variant {variant} --seed {seed}"


def grid(n: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure with ``n`` panels, at most 3 a row."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def curves_figure(panels: dict[str, dict[str, Curve | None]], ylabel: str) -> Figure | None:
    """One panel per key of ``panels``, one line per curve in it: the mean, shaded ± one std."""
    panels = {title: {k: c for k, c in curves.items() if c is not None} for title, curves in panels.items()}
    panels = {title: curves for title, curves in panels.items() if curves}
    if not panels:
        return None
    fig, axes = grid(len(panels), 4.5, 3.2)
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, (steps, mean, std) in curves.items():
            (line,) = ax.plot(steps, mean, label=label, linewidth=1.2)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return fig


def relative(table: dict, variant: str, task: str, metric: str, baseline: str) -> tuple[float, float] | None:
    """The variant's mean against the baseline's mean in % of the baseline, positive = better
    (sign-flipped where lower is better), and its std in the same unit; None when unknown."""
    stat = table[variant]["tasks"].get(task, {}).get(metric, {})
    base = table[baseline]["tasks"][task][metric]["mean"]
    if stat.get("mean") is None or not base:
        return None
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return sign * 100 * (stat["mean"] - base) / abs(base), 100 * (stat.get("std") or 0.0) / abs(base)


def pareto_front(points: dict[str, tuple[float, ...]]) -> set[str]:
    """The names of the points that no other point dominates (at least as high on every
    coordinate and not equal)."""
    return {name for name, p in points.items()
            if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in points.values())}


def pareto_points(table: dict, baseline: str, firsts: dict[str, str]) -> dict[str, tuple[tuple[float, float], ...]]:
    """Variant -> (relative change, its std) on each task's first metric, for the variants
    where each is known."""
    points = {}
    for variant in table:
        changes = tuple(relative(table, variant, t, m, baseline) for t, m in firsts.items())
        if None not in changes:
            points[variant] = changes
    return points


def pareto_figure(table: dict, baseline: str, firsts: dict[str, str]) -> Figure | None:
    """One panel per pair of tasks: each variant's relative change on both (± std over seeds),
    filled where no other variant dominates it on the pair; one legend of the variants."""
    pairs = list(itertools.combinations(range(len(firsts)), 2))
    if not pairs:
        return None
    names, points = list(firsts), pareto_points(table, baseline, firsts)
    others = [v for v in points if v != baseline]
    styles = {v: (f"C{k % 10}", "o^vD"[k // 10 % 4]) for k, v in enumerate(others)}
    styles = ({baseline: ("black", "s")} if baseline in points else {}) | styles
    fig, axes = grid(len(pairs), 4.5, 4.0)
    for ax, (i, j) in zip(axes, pairs):
        front = pareto_front({v: (p[i][0], p[j][0]) for v, p in points.items()})
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axvline(0, color="grey", linewidth=0.8)
        for variant, p in points.items():
            color, marker = styles[variant]
            ax.errorbar(p[i][0], p[j][0], xerr=p[i][1], yerr=p[j][1], color=color, marker=marker,
                        markersize=7, capsize=2, linewidth=0.8,
                        markerfacecolor=color if variant in front else "white")
        ax.set(xlabel=f"{names[i]} {firsts[names[i]]}: % vs {baseline}",
               ylabel=f"{names[j]} {firsts[names[j]]}: % vs {baseline}")
    handles = [Line2D([], [], color=c, marker=m, linestyle="none") for c, m in styles.values()]
    fig.legend(handles, list(styles), loc="outside lower center", ncols=min(len(styles), 5),
               fontsize="small")
    fig.suptitle(f"Change against {baseline} in %, mean ± std over seeds\n"
                 f"up and right are better; filled: not dominated", fontsize="medium")
    return fig


TITLES = {"cosine": "gradient cosine", "lookahead": "lookahead affinity"}


def affinity_figure(summary: dict, variant: str) -> Figure:
    """The cosine and lookahead matrices of one variant as heatmaps, values written in (row:
    the task whose step is taken, column: the task measured; see mtl.engine.affinity)."""
    names = summary["tasks"]
    panels = [(k, summary[k]) for k in ("cosine", "lookahead") if summary.get(k) is not None]
    fig, axes = grid(len(panels), 4.5, 4.0)
    for ax, (key, rows) in zip(axes, panels):
        m = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        limit = 1.0 if key == "cosine" or not np.isfinite(m).any() else float(np.nanmax(np.abs(m))) or 1.0
        image = ax.imshow(m, cmap="RdBu", vmin=-limit, vmax=limit)
        ax.set(title=f"{variant}: {TITLES[key]}", xticks=range(len(names)), yticks=range(len(names)),
               xticklabels=names, yticklabels=names, xlabel="task measured", ylabel="task stepped")
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, "–" if np.isnan(v) else f"{v:.2g}", ha="center", va="center",
                    fontsize="small", color="white" if abs(v) > 0.6 * limit else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def render(compare_md: str, table: dict, baseline: str, seeds: list[int], firsts: dict[str, str],
           images: dict, affinity: dict, findings: dict[str, list[str]], advice: list[str]) -> str:
    """The report in Markdown: the comparison and the verdict, then each plot with what it shows,
    then the task affinity of each variant with its ``findings``."""
    front = sorted(pareto_front({v: tuple(c for c, _ in p)
                                 for v, p in pareto_points(table, baseline, firsts).items()}))
    metrics = ", ".join(f"{t} {m}" for t, m in firsts.items())
    intro = (f"Every variant against the `{baseline}` baseline over seeds {seeds}. Written by "
             f"`mtl report`, the DVC stage `report`: regenerate it with `dvc repro report` (or "
             f"`mtl report` once `compare` is up to date). The same report with its images: "
             f"[index.html](index.html), in Markdown: [report.md](report.md).")
    lines = ["# Multi-task learning report", "", intro, ""]
    lines += [("#" + line if line.startswith("#") else line) for line in compare_md.strip().splitlines()]
    lines.append("")
    if firsts:
        names = ", ".join(f"`{v}`" for v in front) or "none"
        lines += [(f"Not dominated on {metrics} (no other variant at least as good on each and "
                   f"better on one): {names}."), ""]
    lines += ["## Verdict", ""] + [part for sentence in advice for part in (sentence, "")]
    for name, title, text in SECTIONS:
        if name in images:
            text = text.format(baseline=baseline, metrics=metrics)
            lines += [f"## {title}", "", f"![{title}](plots/{name})", "", text, ""]
    lines += ["## Task affinity", "", AFFINITY_TEXT, ""]
    if not affinity:
        lines += ["No variant recorded task affinity (`models/<variant>/seed-<seed>/affinity.json`).", ""]
    for variant, summary in affinity.items():
        lines += [f"### `{variant}`", "", f"![Task affinity of {variant}](plots/affinity-{variant}.png)", "",
                  f"Mean over {summary['epochs']} epochs of {summary['runs']} seeds.", ""]
        lines += [f"- {sentence}" for sentence in findings[variant]] + [""]
    return "\n".join(lines)


SECTIONS = (  # plot, heading, what it shows
    ("val_loss.png", "Validation loss per task", (
        "Each task's validation loss per epoch, one panel a task, one line a variant: the mean "
        "over the seeds that reached that epoch, shaded ± one std (early stopping can end seeds "
        "at different epochs).")),
    ("weights.png", "Task weights over time", (
        "The weight each task's loss got per epoch (the mean over the epoch's steps, as the "
        "weighting reports it), one panel a variant, the mean over seeds shaded ± one std. "
        "Constant for `ew` and `static`; dynamic weightings (`uw`, `dwa`, `famo`, gradient "
        "methods) move.")),
    ("pareto.png", "Trade-offs between tasks (Pareto)", (
        "For each pair of tasks, each variant's mean change against `{baseline}` on the task's "
        "(first) metric that Δm counts ({metrics}), in % of the baseline and sign-flipped where lower is better, "
        "so up and right are better; bars: ± one std over seeds. `{baseline}` is the black "
        "square at the origin. Filled markers: not dominated on the pair; hollow: dominated.")),
)
AFFINITY_TEXT = (
    "Measured while training on a few fixed training batches after the first epoch and every "
    "`train.affinity_every`-th (`train.affinity_batches`; single-task variants share nothing and "
    "record none), mean over the epochs measured and seeds. Gradient cosine: between two tasks' "
    "gradients on the shared layers; below 0 they pull the shared layers apart. Lookahead affinity (Fifty et al. 2021): the relative "
    "drop of the column task's loss after one step for the row task alone; positive means the "
    "step helps.")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
       "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}"
       "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
       "code{background:#f3f3f3;padding:0 3px}")


def to_html(markdown: str) -> str:
    """A self-contained web page of the Markdown ``render`` writes: headings, paragraphs, bullet
    lists, images, tables, and inline code, bold and links."""
    body = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = block.splitlines()
        first = lines[0]
        if first.startswith("#"):
            level = len(first) - len(first.lstrip("#"))
            body.append(f"<h{level}>{inline(first[level:].strip())}</h{level}>")
        elif first.startswith("|"):
            rows = [[inline(c.strip()) for c in line.strip().strip("|").split("|")]
                    for i, line in enumerate(lines) if i != 1]
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif first.startswith("- "):
            body.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in lines) + "</ul>")
        elif image := IMAGE.fullmatch(block.strip()):
            alt, src = html.escape(image[1]), html.escape(image[2])
            body.append(f'<p><a href="{src}"><img src="{src}" alt="{alt}"></a></p>')
        else:
            body.append(f"<p>{inline(' '.join(lines))}</p>")
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def inline(text: str) -> str:
    """Markdown's `code`, **bold** and [links](url) as HTML, everything else escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
