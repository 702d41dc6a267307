"""Numeric encoders and training defaults on UCI Adult, against per-task gradient-boosted trees.

    python bench/encoders.py                       # every setting, seeds 0 1 2
    python bench/encoders.py --settings standard ple --seeds 0

Adult (../shared/data, examples/adult.yaml: income and never-married binary, hours-per-week
regression) is ingested and split once. Then, per setting and seed, ``stl`` and ``hps-ew``
train and evaluate in-process (torch at 1 thread). A setting is ``encoders.numeric`` plus
training defaults, as overrides of examples/adult.yaml with ``--epochs`` and
``affinity_batches: 0``; one setting swaps the categorical embedding width rule. LightGBM
and scikit-learn's HistGradientBoosting, default settings, train per task on the same train
split (early stopping on the same val split for LightGBM) and are scored on the same test split.
Printed: per setting and variant the mean over seeds of each task's test AUROC or MAE and the
training seconds; the rows of the trees; the table also goes to bench/results/encoders-<host>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from mtl import paths
from mtl.config import Params, apply_override
from mtl.engine import encoders
from mtl.io import read_json
from mtl.stages import augment, evaluate, ingest, split, train

RULE = encoders.embedding_width

SETTINGS = {  # name -> overrides of examples/adult.yaml
    "standard": {"encoders.numeric": "standard"},
    "ple": {"encoders.numeric": "ple"},
    "periodic": {"encoders.numeric": "periodic"},
    "ple, cosine": {"encoders.numeric": "ple", "train.schedule": "cosine"},
    "ple, 256x256, dropout 0.1": {"encoders.numeric": "ple", "train.hidden": [256, 256],
                                  "train.dropout": 0.1},
    "ple, weight decay 0.01": {"encoders.numeric": "ple", "train.weight_decay": 0.01},
    # TabM-mini (train.ensemble): k weight-sharing members, their mean prediction
    "ple, ensemble 8": {"encoders.numeric": "ple", "train.ensemble": 8},
    "ple, ensemble 32": {"encoders.numeric": "ple", "train.ensemble": 32},
    "periodic, ensemble 32": {"encoders.numeric": "periodic", "train.ensemble": 32},
    "periodic, sigma 0.1": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 0.1},
    "periodic, sigma 1": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 1.0},
    "periodic, sigma 3": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 3.0},
    "periodic, sigma 10": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 10.0},
    "periodic, sigma 30": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 30.0},
    "periodic, sigma 10, hours l1": {"encoders.numeric": "periodic", "encoders.periodic.sigma": 10.0,
                                     "data.tasks.hours.loss": "l1"},
    "periodic, sigma 10, ensemble 32, hours l1": {
        "encoders.numeric": "periodic", "encoders.periodic.sigma": 10.0, "train.ensemble": 32,
        "data.tasks.hours.loss": "l1"},
    "ple, 40 epochs, patience 10": {"encoders.numeric": "ple", "train.epochs": 40,
                                    "train.patience": 10},
    # hours trained on absolute error (data.tasks.hours.loss), as the trees' L1 objective
    "ple, hours l1": {"encoders.numeric": "ple", "data.tasks.hours.loss": "l1"},
    "ple, ensemble 32, hours l1": {"encoders.numeric": "ple", "train.ensemble": 32,
                                   "data.tasks.hours.loss": "l1"},
}
# Settings that change code rather than params: the embedding width rule.
WIDTHS = {"ple, fastai 2 embedding widths": lambda n: min(600, round(1.6 * n**0.56))}
SETTINGS |= {name: {"encoders.numeric": "ple"} for name in WIDTHS}
VARIANTS = {"stl": {"arch": "stl", "weighting": "ew"}, "hps-ew": {"arch": "hps", "weighting": "ew"}}
METRICS = {"income": "auroc", "never_married": "auroc", "hours": "mae"}


def params(setting: str, seeds: list[int], epochs: int) -> Params:
    raw = yaml.safe_load((REPO / "examples" / "adult.yaml").read_text())
    raw |= {"seeds": seeds, "variants": VARIANTS}
    raw["train"] |= {"epochs": epochs, "affinity_batches": 0, "device": "cpu", "ensemble": 1}
    raw["data"]["tasks"]["hours"].pop("loss", None)  # the settings start from squared error,
    raw["encoders"]["periodic"] = {"sigma": 0.01}    # and the package's sigma, as measured first
    for key, value in SETTINGS[setting].items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return Params.model_validate(raw)


def networks(p: Params, seeds: list[int], setting: str) -> dict:
    """Per variant, each seed's test metrics of ``METRICS`` and training seconds."""
    encoders.embedding_width = WIDTHS.get(setting, RULE)
    out = {}
    for variant in VARIANTS:
        out[variant] = []
        for seed in seeds:
            with contextlib.redirect_stdout(None):
                train.run(p, variant, seed)
                evaluate.run(p, variant, seed)
            metrics = read_json(paths.variant_metrics(variant, seed))
            info = read_json(paths.model_dir(variant, seed) / "train.json")
            out[variant].append({t: metrics[t][m] for t, m in METRICS.items()}
                                | {"seconds": info["train_seconds"]})
    return out


def trees(p: Params) -> dict:
    """LightGBM and HistGradientBoosting (default settings) per task on the same split."""
    import lightgbm
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import mean_absolute_error, roc_auc_score

    schema = read_json(paths.SCHEMA)
    frames = {s: pq.read_table(paths.split_path(s)).to_pandas() for s in ("train", "val", "test")}
    features = list(schema["features"])
    categorical = [f for f in features if schema["features"][f]["kind"] == "categorical"]
    for frame in frames.values():
        for column in categorical:
            frame[column] = frame[column].astype("category")
    for column in categorical:  # one category set for all splits
        cats = frames["train"][column].cat.categories
        for frame in frames.values():
            frame[column] = frame[column].cat.set_categories(cats)
    out = {"lightgbm": {}, "histgb": {}}
    for task, metric in METRICS.items():
        target = p.data.tasks[task].target
        xy = {s: (f[features][f[target].notna()], f[target][f[target].notna()]) for s, f in frames.items()}
        if metric == "auroc":
            classes = sorted(schema["tasks"][task]["classes"])
            xy = {s: (x, (y.astype(str) == classes[-1]).astype(int)) for s, (x, y) in xy.items()}
            models = {"lightgbm": lightgbm.LGBMClassifier(verbose=-1, n_estimators=2000),
                      "histgb": HistGradientBoostingClassifier(categorical_features="from_dtype")}
            score = lambda m, x, y: roc_auc_score(y, m.predict_proba(x)[:, 1])
        else:
            models = {"lightgbm": lightgbm.LGBMRegressor(verbose=-1, n_estimators=2000, objective="l1"),
                      "histgb": HistGradientBoostingRegressor(categorical_features="from_dtype",
                                                              loss="absolute_error")}
            score = lambda m, x, y: mean_absolute_error(y, m.predict(x))
        for name, model in models.items():
            fit = {"eval_set": [xy["val"]], "callbacks": [lightgbm.early_stopping(50, verbose=False)]}
            model.fit(*xy["train"], **(fit if name == "lightgbm" else {}))
            out[name][task] = float(score(model, *xy["test"]))
    return out


def table(results: dict, tree_rows: dict) -> str:
    mean = statistics.mean
    lines = ["| setting | variant | " + " | ".join(f"{t} {m}" for t, m in METRICS.items()) + " | s |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for setting, per_variant in results.items():
        for variant, runs in per_variant.items():
            cells = [f"{mean(r[t] for r in runs):.4f} ± {statistics.pstdev(r[t] for r in runs):.4f}"
                     for t in METRICS]
            lines.append(f"| {setting} | `{variant}` | " + " | ".join(cells)
                         + f" | {mean(r['seconds'] for r in runs):.0f} |")
    for name, scores in tree_rows.items():
        lines.append(f"| {name} (per task) | trees | "
                     + " | ".join(f"{scores[t]:.4f}" for t in METRICS) + " | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--name", default="encoders", help="bench/results/<name>-<host>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = Machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtl-bench-encoders-") as tmp:
        os.chdir(tmp)
        base = params(args.settings[0], args.seeds, args.epochs)
        for stage in (ingest, augment, split):
            stage.run(base)
        tree_rows = trees(base)
        for setting in args.settings:
            start = time.perf_counter()
            results[setting] = networks(params(setting, args.seeds, args.epochs), args.seeds, setting)
            print(f"{setting}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            print(table({setting: results[setting]}, {}), file=sys.stderr, flush=True)
    text = table(results, tree_rows)
    command = shlex.join(["python", "bench/encoders.py", *sys.argv[1:]])
    save_result(args.name, {"command": command, "machine": machine.finish(), "args": vars(args),
                             "settings": SETTINGS, "results": results, "trees": tree_rows})
    print(text + f"\nRegenerate: `{command}`; {machine.info['total_s'] / 60:.1f} min on "
          f"{machine.info['cpu']} (other load {machine.info['other_load_cores']} cores).")


if __name__ == "__main__":
    main()
