"""The report stage: plots, report.md and index.html from hand-made results, the Pareto front on
known points, and a real `dvc repro` that runs the stage."""

import contextlib
import html
import os
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from mtl import paths
from mtl.config import load_params
from mtl.engine.affinity_summary import describe, grouping
from mtl.io import write_json
from mtl.stages import compare, report
from mtl.stages.verdict import verdict
from tests.helpers import REPO, run
from tests.test_affinity import seeds_of

VARIANTS = ("stl", "hps-ew", "hps-uw")
SEEDS = (0, 1)
TASKS = ("species", "body_mass")
PNG = b"\x89PNG\r\n\x1a\n"


def affinity(shift: float) -> dict:
    return {"tasks": list(TASKS), "cosine": [[1.0, -0.2 + shift], [-0.2 + shift, 1.0]],
            "lookahead": [[0.05, None], [-0.01, 0.03 + shift]], "epochs": 3}


def write_curve(variant: str, seed: int, metric: str, values: list[float]) -> None:
    """A dvclive metric file, as dvclive writes it."""
    path = paths.live_dir(variant, seed) / "plots" / "metrics" / f"{metric}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{step}\t{value}\n" for step, value in enumerate(values))
    path.write_text(f"step\t{metric.rsplit('/', 1)[1]}\n" + rows)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Params, test metrics, dvclive curves and affinity summaries of 3 variants x 2 seeds, and
    the comparison of them written by the compare stage."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["tasks"] = {"species": {"kind": "multiclass", "target": "species"},
                               "body_mass": {"kind": "regression", "target": "body_mass_g"}}
    params["seeds"] = list(SEEDS)
    params["variants"] = {"stl": {"arch": "stl", "weighting": "ew"},
                          "hps-ew": {"arch": "hps", "weighting": "ew"},
                          "hps-uw": {"arch": "hps", "weighting": "uw"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    accuracy, mae = {"stl": 0.90, "hps-ew": 0.92, "hps-uw": 0.94}, {"stl": 300, "hps-ew": 310, "hps-uw": 280}
    for variant in VARIANTS:
        for seed in SEEDS:
            write_json({"species": {"accuracy": accuracy[variant] + 0.01 * seed, "f1_macro": 0.8,
                                    "auroc": accuracy[variant] + 0.01 * seed},
                        "body_mass": {"mae": mae[variant] + seed, "rmse": 400.0, "r2": 0.8}},
                       paths.variant_metrics(variant, seed))
            epochs = range(4 + seed)  # seeds that stopped at different epochs
            for task in TASKS:
                write_curve(variant, seed, f"val/loss/{task}", [1 / (e + 1) for e in epochs])
                write_curve(variant, seed, f"weight/{task}",
                            [1 / (e + 1) if variant == "hps-uw" else 1.0 for e in epochs])
            if variant != "stl":
                write_json(affinity(0.1 * seed), paths.model_dir(variant, seed) / "affinity.json")
    write_json({"species": {"accuracy": 0.97, "f1_macro": 0.9, "auroc": 0.97},  # the trees
                "body_mass": {"mae": 250.0, "rmse": 350.0, "r2": 0.85}}, paths.REFERENCE_JSON)
    compare.run(load_params(Path("params.yaml")))
    return tmp_path


def test_report_writes_png_plots_and_pages_that_link_them(project):
    result = run(["mtl", "report"], project)
    assert "reports/index.html" in result.stdout
    names = {"val_loss.png", "weights.png", "pareto.png", "affinity-hps-ew.png", "affinity-hps-uw.png"}
    assert {p.name for p in (project / paths.PLOTS_DIR).iterdir()} == names
    for name in names:
        path = project / paths.PLOTS_DIR / name
        assert path.read_bytes().startswith(PNG) and imread(path).shape[0] > 100
    assert sorted(p.name for p in (project / "reports").iterdir()) == [
        "compare.md", "index.html", "plots", "report.md"]  # no temporary file left behind
    page, markdown = (project / paths.REPORT_HTML).read_text(), (project / paths.FULL_REPORT).read_text()
    for name in names:
        assert f'<img src="plots/{name}"' in page and f"](plots/{name})" in markdown
    assert "<table>" in page and "<td><code>hps-uw</code></td>" in page
    assert "| `hps-uw` |" in markdown  # the comparison table, as compare wrote it
    assert "| LightGBM (reference) | +" in markdown and "<td>LightGBM (reference)</td>" in page
    assert "better on one): `hps-uw`." in markdown  # best on both tasks: the only one not dominated
    sentences = describe([affinity(0.0), affinity(0.1)], alpha=0.05)
    assert any("conflict" in s for s in sentences)
    for sentence in sentences:
        assert html.escape(sentence, quote=False) in page and f"- {sentence}" in markdown
    assert "dvc repro report" in page


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_report_removes_what_a_killed_run_left_and_writes_with_the_umask(project):
    """A killed report leaves its unfinished plots folder and pages under temporary names; the
    next run removes them. The plots folder gets the umask's mode, not a temporary folder's 0700."""
    (project / "reports/.plots.1a2b3c.tmp").mkdir()
    (project / "reports/.plots.1a2b3c.tmp/val_loss.png").write_bytes(PNG)
    (project / "reports/.report.md.4d5e6f.tmp").write_text("half a report")
    with umask(0o027):
        report.run(load_params(Path("params.yaml")))
    assert sorted(p.name for p in (project / "reports").iterdir()) == [
        "compare.md", "index.html", "plots", "report.md"]
    assert (project / paths.PLOTS_DIR).stat().st_mode & 0o777 == 0o750
    assert (project / paths.FULL_REPORT).stat().st_mode & 0o777 == 0o640


def test_report_without_comparison_is_one_line_error(project):
    (project / paths.COMPARE_JSON).unlink()
    result = run(["mtl", "report"], project, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "metrics/compare.json" in result.stderr
    assert "compare" in result.stderr.split("metrics/compare.json")[1]
    assert not (project / paths.REPORT_HTML).exists()


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    points = {"a": (1.0, 1.0), "a-again": (1.0, 1.0), "b": (2.0, 0.0), "c": (0.5, 0.5),
              "d": (2.0, -1.0), "e": (0.0, 3.0), "f": (0.0, 1.0)}
    # c is dominated by a, d by b, f by a (and e); equal points do not dominate each other
    assert report.pareto_front(points) == {"a", "a-again", "b", "e"}
    assert report.pareto_front({"x": (1, 2, 3), "y": (1, 2, 4), "z": (0, 5, 0)}) == {"y", "z"}


def test_relative_change_is_positive_when_better():
    table = {"stl": {"tasks": {"t": {"mae": {"mean": 2.0, "std": 0.2}, "accuracy": {"mean": 0.8, "std": None}}}},
             "mtl": {"tasks": {"t": {"mae": {"mean": 1.8, "std": 0.1}, "accuracy": {"mean": 0.72, "std": 0.08}}}}}
    assert report.relative(table, "mtl", "t", "mae", "stl") == pytest.approx((10.0, 5.0))  # lower mae
    assert report.relative(table, "mtl", "t", "accuracy", "stl") == pytest.approx((-10.0, 10.0))
    assert report.relative(table, "stl", "t", "accuracy", "stl") == pytest.approx((0.0, 0.0))


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n")[1].split("\n## ")[0]


def test_report_verdict_on_tiny_affinities_and_negative_delta_m(project):
    """Every sharing variant significantly worse than stl, affinities of 1e-5 whose sign changes
    with the seed: the verdict says sharing hurt and names the best variant measured; the affinity
    sections call the affinities inconclusive and recommend no grouping."""
    params = load_params(Path("params.yaml"))
    auroc, mae = {"stl": 0.95, "hps-ew": 0.90, "hps-uw": 0.93}, {"stl": 300, "hps-ew": 330, "hps-uw": 320}
    for variant in VARIANTS:
        for seed in SEEDS:
            write_json({"species": {"accuracy": 0.9, "f1_macro": 0.8, "auroc": auroc[variant] + 0.002 * seed},
                        "body_mass": {"mae": mae[variant] + seed, "rmse": 400.0, "r2": 0.8}},
                       paths.variant_metrics(variant, seed))
            if variant != "stl":
                tiny = 1e-5 * (1 if seed else -1)
                write_json({"tasks": list(TASKS), "cosine": [[1.0, 0.01], [0.01, 1.0]],
                            "lookahead": [[1e-3, tiny], [2 * tiny, 2e-3]], "epochs": 3},
                           paths.model_dir(variant, seed) / "affinity.json")
    compare.run(params)
    report.run(params)
    markdown = (project / paths.FULL_REPORT).read_text()
    advice = section(markdown, "Verdict").strip().split("\n\n")  # one paragraph each
    assert advice[0].startswith("Sharing hurt here: every variant is worse than `stl` beyond noise, "
                                "the best measured, `hps-uw`, too (Δm -4.")
    assert advice[0].endswith(" Keep `stl`.")
    assert advice[1].startswith("LightGBM reference (one tree model per task, one seed, not a "
                                "variant): Δm +")  # where the trees stand, not ranked as a variant
    assert advice[1].endswith(", better than every network: on this data the networks have yet to "
                              "match the trees.")
    assert advice[2] == ("The task affinity of `hps-ew`, `hps-uw` is inconclusive and suggests no "
                         "grouping (see Task affinity).")
    affinity = section(markdown, "Task affinity")
    assert affinity.count("- Inconclusive: the seeds do not bear out a choice") == 2
    for claim in ("Keep all tasks in one network", "Grouping to try", "One network for all tasks"):
        assert claim not in markdown


PLANTED = {"tasks": ["a", "b", "c"], "epochs": 10,  # a and b help each other, c conflicts with both
           "cosine": [[1, 0.6, -0.3], [0.6, 1, -0.2], [-0.3, -0.2, 1]],
           "lookahead": [[0.3, 0.2, -0.1], [0.2, 0.3, -0.1], [-0.05, -0.05, 0.2]]}


def delta(mean: float, p: float | None, within: bool | None) -> dict:
    return {"delta_m": {"mean": mean, "std": None if p is None else 0.5, "p": p, "within_noise": within},
            "tasks": {}}


def test_verdict_puts_a_clear_grouping_as_a_hypothesis_next_to_what_was_measured():
    table = {"stl": delta(0.0, 1.0, True), "hps-ew": delta(-0.4, 0.3, True),
             "mmoe-ew": delta(-2.0, 0.01, False)}
    found = grouping(seeds_of(PLANTED), alpha=0.05)
    assert found.conclusive
    lines = verdict(table, "stl", {"hps-ew": (found, PLANTED["tasks"]), "mmoe-ew": (None, PLANTED["tasks"])})
    assert lines == [
        ("No variant beats `stl` beyond noise: the best measured is `hps-ew` (Δm -0.40 ± 0.50 %, "
        "p = 0.3, within noise). `mmoe-ew` is worse beyond noise. Sharing showed no gain here: keep "
        "`stl`, the simpler model, unless more seeds show one."),
        ("A hypothesis to test, from `hps-ew`'s task affinity: {a, b} and {c} as two networks (the "
        "split gains +43.8% of a task's own step, p = 0.00027). No variant trains that grouping, so "
        "the measurements above stand until one does: a `grouped` variant with `from: hps-ew` "
        "trains it."),
        "The task affinity of `mmoe-ew` is inconclusive and suggests no grouping (see Task affinity)."]


@pytest.mark.parametrize("table,expected", [
    ({"stl": delta(0.0, 1.0, True), "hps-ew": delta(1.5, 0.01, False), "hps-uw": delta(2.5, 0.001, False),
      "mmoe-ew": delta(-1.0, 0.02, False)},
     ("`hps-uw` beats `stl` beyond noise (Δm +2.50 ± 0.50 %, p = 0.001) and is the best variant "
     "measured: use it. `hps-ew` also beat it.")),
    ({"stl": delta(0.0, None, None), "hps-ew": delta(0.3, None, None), "hps-uw": delta(-0.2, None, None)},
     ("No difference from `stl` can be told from noise with one seed; the best mean Δm is `hps-ew`'s "
     "(Δm +0.30 %). Train on several `seeds` before choosing.")),
    ({"stl": delta(0.0, 1.0, True)}, "Only `stl` has a Δm: nothing was measured against it."),
], ids=["better", "one-seed", "baseline-only"])
def test_verdict_follows_the_measured_delta_m(table, expected):
    assert verdict(table, "stl", {}) == [expected]


def a_study(variant: str, direction: str, values: list, importances) -> dict:
    states = ["pruned" if v is None else "complete" for v in values]
    return {"variant": variant, "tuned": True, "objective": "an objective", "direction": direction,
            "params": {"train.lr": 0.001, "train.hidden": [16]}, "value": 1.0,
            "importances": importances,
            "trials": [{"number": i, "state": s, "value": v, "params": {}}
                       for i, (s, v) in enumerate(zip(states, values))]}


def test_the_report_shows_each_tuned_variants_params_best_so_far_and_importances(project):
    """compare.md states the budget; the report's tuning section gives each variant's chosen
    params and importances (or why none), and the best-so-far plot."""
    text = (project / "params.yaml").read_text()
    assert "Not tuned (`tune.trials: 0`)" in (project / paths.REPORT).read_text()
    (project / "params.yaml").write_text(text.replace("  trials: 0", "  trials: 4").replace(
        "  epochs: null", "  epochs: 7"))
    params = load_params(Path("params.yaml"))
    for variant in VARIANTS:
        importances = ("only 2 complete trial(s): too few to estimate importances"
                       if variant == "hps-uw" else {"train.lr": 0.75, "train.hidden": 0.25})
        chosen = a_study(variant, "maximize", [3.0, None, 1.0, 2.0], importances)
        if variant == "stl":  # the baseline: one study per task
            studies = {t: a_study(variant, "minimize", [3.0, None, 1.0, 2.0], importances)
                       for t in params.data.tasks}
            chosen = {"variant": "stl", "tuned": True, "params": {}, "studies": studies,
                      "per_task": {t: study["params"] for t, study in studies.items()}}
        write_json(chosen, paths.tuned_path(variant))
    compare.run(params)
    report.run(params)
    budget = ("each variant 4 trials (the baseline `stl`: 4 for each task's network, on its own "
              "validation loss), ≤ 7 epochs, pruned by median")
    assert budget in (project / paths.REPORT).read_text()
    tuning = section((project / paths.FULL_REPORT).read_text(), "Tuning")
    assert budget in tuning
    assert tuning.count("- chosen: `train.lr` = 0.001, `train.hidden` = [16]") == 2 + len(TASKS)
    assert all(f"### `stl · {task}`" in tuning for task in params.data.tasks)
    assert "`train.lr` 0.75, `train.hidden` 0.25" in tuning and "too few to estimate" in tuning
    assert (project / paths.PLOTS_DIR / "tuning.png").read_bytes().startswith(PNG)
    assert report.best_so_far(a_study("stl", "minimize", [3.0, None, 1.0, 2.0], {})) == ([0, 2, 3], [3.0, 1.0, 1.0])
    assert report.best_so_far(a_study("x", "maximize", [3.0, None, 1.0, 4.0], {})) == ([0, 2, 3], [3.0, 3.0, 4.0])
