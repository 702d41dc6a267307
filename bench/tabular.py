"""Networks against gradient-boosted trees on a real table: `stl` and `hps-ew` over seeds, beside
LightGBM and scikit-learn's HistGradientBoosting per task (the `reference` stage, both methods),
all on the same split in the same run, each task's primary metric (AUROC, MAE) and the gap.

    python bench/tabular.py                                   # Adult, examples/adult.yaml, 3 seeds
    python bench/tabular.py --label ple --set encoders.numeric=ple   # another network config

The stages run in this process on a temporary copy of the example's params (``--set`` overrides
them, repeatable), so the networks and the trees read the very same splits. The result goes to
``bench/results/tabular-<label>-<host>.json`` with the load on the machine (``Machine``); the
Markdown table is printed for BENCHMARKS.md. Metrics do not depend on the load, wall times do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from mtl import paths
from mtl.cli import use_threads
from mtl.config import apply_override, load_params
from mtl.stages import augment, compare, evaluate, ingest, reference, split, train

VARIANTS = {"stl": {"arch": "stl", "weighting": "ew"}, "hps-ew": {"arch": "hps", "weighting": "ew"}}
TREES = {"lightgbm": "LightGBM", "hgb": "HistGradientBoosting"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="adult")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a parameter of the example, e.g. train.epochs=5")
    parser.add_argument("--label", default="default", help="names this network configuration")
    args = parser.parse_args()
    machine = Machine()
    with tempfile.TemporaryDirectory(prefix="mtl-tabular-") as root, contextlib.chdir(root):
        params = write_params(Path(root), args)
        result = measure(params)
    result |= {"command": "python bench/tabular.py " + " ".join(sys.argv[1:]),
               "overrides": args.overrides, "machine": machine.finish()}
    print(table(result, args.label))
    print(f"-> {save_result(f'tabular-{args.label}', result)}")


def write_params(root: Path, args: argparse.Namespace):
    raw = yaml.safe_load((REPO / "examples" / f"{args.example}.yaml").read_text())
    raw |= {"variants": VARIANTS, "seeds": args.seeds}
    for assignment in args.overrides:
        apply_override(raw, assignment)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(root / "params.yaml")


def measure(params) -> dict:
    """Every stage up to evaluate, then both trees: per model and task the primary metric (per
    seed for the networks) and the seconds each took."""
    use_threads(params.threads())
    for stage in (ingest, augment, split):
        stage.run(params)
    metric = {name: compare.PRIMARY[task.kind] for name, task in params.data.tasks.items()}
    models, seconds = {}, {}
    for variant in VARIANTS:
        start = time.perf_counter()
        runs = []
        for seed in params.seeds:
            train.run(params, variant, seed, resume=False)
            evaluate.run(params, variant, seed)
            runs.append(json.loads(paths.variant_metrics(variant, seed).read_text()))
        seconds[variant] = round(time.perf_counter() - start, 1)
        models[variant] = {t: [r[t][m] for r in runs] for t, m in metric.items()}
    for method in TREES:
        start = time.perf_counter()
        reference.run(params.model_copy(update={"compare": params.compare.model_copy(
            update={"reference": method})}))
        seconds[method] = round(time.perf_counter() - start, 1)
        found = json.loads(paths.REFERENCE_JSON.read_text())
        models[method] = {t: [found[t][m]] for t, m in metric.items()}
    return {"metric": metric, "models": models, "seconds": seconds, "seeds": params.seeds}


def table(result: dict, label: str) -> str:
    """One row per model, one column per task (mean ± std over seeds for the networks), then
    each network's gap to the better tree model (positive: the network is better)."""
    metric, models = result["metric"], result["models"]
    head = [f"{t} {m}" for t, m in metric.items()]
    lines = ["| model | " + " | ".join(head) + " | s |", "|---" * (len(head) + 2) + "|"]
    for name, per_task in models.items():
        cells = [_stat(per_task[t]) for t in metric]
        shown = TREES.get(name, f"`{name}` ({label})")
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {result['seconds'][name]} |")
    for name in VARIANTS:
        gaps = []
        for task, m in metric.items():
            trees = [models[t][task][0] for t in TREES]
            best = min(trees) if m == "mae" else max(trees)
            gap = statistics.mean(models[name][task]) - best
            gaps.append(f"{-gap if m == 'mae' else gap:+.4f}")
        lines.append(f"| gap `{name}` − better tree | " + " | ".join(gaps) + " | |")
    return "\n".join(lines)


def _stat(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread}"


if __name__ == "__main__":
    main()
