"""evaluate@<variant>: a trained model and the test split -> per-task test metrics
(``metrics/variants/<variant>.json``; accuracy, macro-F1 and AUROC for classification, MAE, RMSE
and R² for regression, computed with torchmetrics over labelled rows only)."""

from __future__ import annotations

import math
import pickle
import zipfile

from mtl import paths
from mtl.config import Params
from mtl.engine.checkpoint import Bundle
from mtl.engine.trainer import TaskData, predict
from mtl.errors import UserError
from mtl.io import read_table, write_json
from mtl.stages.common import require_columns


def run(params: Params, variant: str) -> None:
    params.variant_train(variant)  # an unknown variant fails here, before anything is read
    model_path = paths.model_dir(variant) / "model.pt"
    if not model_path.is_file():
        raise UserError(f"{model_path}: file not found (run 'mtl train --variant {variant}' first)")
    try:
        bundle = Bundle.load(model_path)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{model_path}: not a loadable model ({reason[:200]})") from None
    test_path = paths.split_path("test")
    table = read_table(test_path)
    require_columns(table, test_path, params)
    data = TaskData.from_table(table, bundle.preprocessor, bundle.tasks)
    outputs = predict(bundle.model, data.inputs)
    metrics = {}
    for task in bundle.tasks:
        values = task.metrics(outputs[task.name], data.targets[task.name], data.masks[task.name])
        metrics[task.name] = {k: (round(v, 6) if math.isfinite(v) else None) for k, v in values.items()}
        metrics[task.name]["n_test"] = int(data.masks[task.name].sum())
    write_json(metrics, paths.variant_metrics(variant))
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in m.items()) for t, m in metrics.items())
    print(f"evaluate@{variant}: {summary}")
