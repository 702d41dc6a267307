"""``tuned/<variant>.json``, the params that ``tune@<variant>`` chose: written by tune, applied
over the variant's params by train. Free of torch and Optuna, so that an untuned pipeline
(``tune.trials: 0``) writes and reads it in no time."""

from __future__ import annotations

from pathlib import Path

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError
from mtl.io import mismatch, read_json, write_json

SECTIONS = ("train", "arch_options", "weighting_options")
TUNED = {"variant": str, "tuned": bool, "params": {str: object}}


def with_values(params: Params, variant: str, values: dict[str, object],
                epochs: int | None = None) -> Params:
    """``params`` with ``values`` (``train.lr``, ``arch_options.experts``, ...) set in
    ``variants.<variant>``, and its ``train.epochs`` set to ``epochs`` when given."""
    spec = params.variants[variant]
    sections = {name: dict(getattr(spec, name)) for name in SECTIONS}
    for key, value in values.items():
        section, _, option = key.partition(".")
        sections[section][option] = value
    if epochs is not None:
        sections["train"]["epochs"] = epochs
    changed = spec.model_copy(update=sections)
    return params.model_copy(update={"variants": {**params.variants, variant: changed}})


def apply(params: Params, variant: str) -> Params:
    """``params`` with the values of ``tuned/<variant>.json`` applied (unchanged when
    ``tune.trials`` is 0, and for a ``grouped`` variant: no stage tunes those yet); a per-task
    baseline's as ``variants.<variant>.per_task``."""
    if params.tune.trials == 0 or variant not in params.variants:
        return params
    chosen = read(variant)
    path = paths.tuned_path(variant)
    space = params.search_space(variant)
    per_task = chosen.get("per_task", {})
    for values in [chosen["params"], *per_task.values()]:
        unknown = [k for k in values if k not in space]
        if unknown:
            raise UserError(f"{path}: '{unknown[0]}' is not in the search space of '{variant}'; "
                            f"run `mtl tune --variant {variant}`")
    if not per_task:
        return with_values(params, variant, chosen["params"])
    spec = params.variants[variant].model_copy(update={"per_task": {
        task: {k.removeprefix("train."): v for k, v in values.items()}
        for task, values in per_task.items()}})
    return params.model_copy(update={"variants": {**params.variants, variant: spec}})


def read(variant: str, path: Path | None = None) -> dict:
    """The tuned file (``path``, default ``tuned/<variant>.json``) of a tuned ``variant``; a
    ``UserError`` when it is missing or not one."""
    path = path or paths.tuned_path(variant)
    if not path.is_file():
        output = f" --output {path}" if path != paths.tuned_path(variant) else ""
        raise UserError(f"{path}: not found; tune.trials > 0, so run `mtl tune --variant {variant}"
                        f"{output}` first")
    chosen = read_json(path)
    problem = mismatch(chosen, TUNED)
    if problem or not chosen["tuned"] or chosen["variant"] != variant:
        raise UserError(f"{path}: not the params tune chose for '{variant}' "
                        f"({problem or 'untuned, or another variant'}); run `mtl tune --variant {variant}`")
    return chosen


def write_untuned(variant: str, path: Path | None = None) -> None:
    """The file of a variant that is not tuned (``tune.trials: 0``)."""
    path = path or paths.tuned_path(variant)
    write_json({"variant": variant, "tuned": False, "params": {}}, path)
    print(f"tune@{variant}: tune.trials is 0, not tuned -> {path}")


def budget(params: Params) -> str:
    """One sentence on whether and how the variants were tuned (compare.md and the report)."""
    cfg = params.tune
    if cfg.trials == 0:
        return ("Not tuned (`tune.trials: 0`): every variant trained with its params.yaml values, "
                "which favours whichever method those values happen to suit.")
    pruned = "not pruned" if cfg.pruner == "none" else f"pruned by {cfg.pruner}"
    epochs = f"≤ {cfg.epochs} epochs" if cfg.epochs else "≤ train.epochs"
    baseline = params.compare.baseline
    per_task = (f" (the baseline `{baseline}`: {cfg.trials} for each task's network, on its own "
                f"validation loss)" if params.variants[baseline].arch == "stl" else "")
    return (f"Tuned with the same budget (`tune@<variant>`, tuned/<variant>.json): each variant "
            f"{cfg.trials} trials{per_task}, {epochs}, {pruned}, on the validation split.")
