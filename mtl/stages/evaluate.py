"""evaluate@<variant>: each seed's trained model and the test split -> per-task test metrics
(``metrics/variants/<variant>/seed-<seed>.json``, with ``_groups`` for ``arch: groups``; accuracy, macro-F1 and AUROC for classification, MAE, RMSE
and R² for regression, over labelled rows only, as torchmetrics defines them:
``mtl.engine.metrics``).

``score_file`` (``mtl evaluate --input FILE --output OUT.json``) scores any labelled file with the
same ``score``, for every variant and seed at once."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import torch

from mtl import paths
from mtl.config import Params
from mtl.engine.checkpoint import Bundle
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData, predict
from mtl.errors import UserError
from mtl.io import check_writable, read_table, remove_leftovers, write_json
from mtl.stages.common import seeds_of
from mtl.stages.trained import as_labelled, check_labelled, load_model


def run(params: Params, variant: str, seed: int) -> None:
    remove_leftovers(paths.variant_metrics(variant, seed))
    bundle = load_model(params, variant, seed)
    test_path = paths.split_path("test")
    table = read_table(test_path)
    check_labelled(table, test_path, params, bundle)
    metrics = score(bundle, table)
    if bundle.arch == "groups":  # compare shows a grouped variant's groups next to its Δm
        metrics[paths.GROUPS] = bundle.layers["options"]["groups"]
    write_json(metrics, paths.variant_metrics(variant, seed))
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in m.items())
                        for t, m in metrics.items() if t != paths.GROUPS)
    print(f"evaluate@{variant}-{seed}: {summary}")


def score(bundle: Bundle, table: pa.Table) -> dict[str, dict[str, float | int | None]]:
    """Each task's metrics over the labelled rows of ``table`` (rounded to 6 decimals, None where
    undefined), with ``n_test``, the rows with a label (with at least one, for multilabel)."""
    data = TaskData.from_table(table, bundle.preprocessor, bundle.tasks)
    return score_outputs(bundle.tasks, predict(bundle.model, data.inputs), data.targets, data.masks)


def score_outputs(tasks: list[Task], outputs: dict[str, torch.Tensor],
                  targets: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
                  ) -> dict[str, dict[str, float | int | None]]:
    """Each task's metrics of the model ``outputs`` (raw scores, as the model's forward pass
    gives them) against ``targets`` over the rows ``masks`` marks labelled, as ``score`` writes
    them; the gradient-boosting reference (``mtl.stages.reference``) is scored here too."""
    metrics = {}
    for task in tasks:
        mask = masks[task.name]
        values = task.metrics(outputs[task.name], targets[task.name], mask)
        metrics[task.name] = {k: (round(v, 6) if math.isfinite(v) else None) for k, v in values.items()}
        metrics[task.name]["n_test"] = int(mask.reshape(len(mask), -1).any(1).sum())
    return metrics


def score_file(params: Params, input_path: Path | None, output: Path | None, variant: str | None,
               seeds: list[int] | None) -> None:
    """The metrics of the labelled file ``input_path`` for ``variant`` (default: every variant)
    and each of ``seeds`` (default: every seed) -> ``output``, a JSON object variant -> seed ->
    task -> metric. Every model is loaded and the file checked against each before anything is
    scored. It takes no stage lock: it writes no pipeline output, and ``train`` replaces a model
    folder by a rename, so a model is read whole."""
    if input_path is None or output is None:
        raise UserError(f"{'--output' if output is None else '--input'}: --input FILE and --output "
                        "FILE.json go together (to score a labelled file)")
    if Path(output).suffix != ".json":
        raise UserError(f"--output: '{output}' must end in .json")
    variants = [variant] if variant else list(params.all_variants)
    runs = [(v, s) for v in variants for s in seeds_of(params, seeds)]
    bundles = {run: load_model(params, *run) for run in runs}
    table = read_table(input_path)
    tables = {run: as_labelled(table, input_path, bundle) for run, bundle in bundles.items()}
    check_writable(Path(output).parent)
    metrics: dict[str, dict[str, dict]] = {}
    for (v, s), bundle in bundles.items():
        metrics.setdefault(v, {})[str(s)] = score(bundle, tables[v, s])
    write_json(metrics, output)
    models = f"{len(runs)} model{'s' if len(runs) > 1 else ''}"
    print(f"evaluate: {input_path}, {table.num_rows} rows, scored by {models} -> {output}")
