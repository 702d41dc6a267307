"""evaluate@<variant>-<seed>: a trained model and the test split -> per-task test metrics
(``metrics/variants/<variant>/seed-<seed>.json``; accuracy, macro-F1 and AUROC for classification, MAE, RMSE
and R² for regression, over labelled rows only, as torchmetrics defines them:
``mtl.engine.metrics``)."""

from __future__ import annotations

import math

from mtl import paths
from mtl.config import Params
from mtl.engine.trainer import TaskData, predict
from mtl.io import read_table, remove_leftovers, write_json
from mtl.stages.trained import check_labelled, load_model


def run(params: Params, variant: str, seed: int) -> None:
    remove_leftovers(paths.variant_metrics(variant, seed))
    bundle = load_model(params, variant, seed)
    test_path = paths.split_path("test")
    table = read_table(test_path)
    check_labelled(table, test_path, params, bundle)
    data = TaskData.from_table(table, bundle.preprocessor, bundle.tasks)
    outputs = predict(bundle.model, data.inputs)
    metrics = {}
    for task in bundle.tasks:
        values = task.metrics(outputs[task.name], data.targets[task.name], data.masks[task.name])
        metrics[task.name] = {k: (round(v, 6) if math.isfinite(v) else None) for k, v in values.items()}
        # rows with a label (with at least one, for a multilabel task)
        metrics[task.name]["n_test"] = int(data.masks[task.name].reshape(len(data), -1).any(1).sum())
    write_json(metrics, paths.variant_metrics(variant, seed))
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in m.items()) for t, m in metrics.items())
    print(f"evaluate@{variant}-{seed}: {summary}")
