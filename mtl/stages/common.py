"""What several stages share: the checks made before anything is written, the seeds a command
runs, and loading a trained model."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError

if TYPE_CHECKING:
    from mtl.engine.checkpoint import Bundle
    from mtl.engine.encoders import Preprocessor


def require_columns(table: pa.Table | pa.Schema, path: Path, params: Params,
                    reserved: bool = False) -> None:
    """Fail with one line if a task's target column (or a reserved column) is missing from
    ``table`` (or a table of that schema)."""
    names = (table if isinstance(table, pa.Schema) else table.schema).names
    for name, task in params.data.tasks.items():
        for column in task.columns:
            if column not in names:
                raise UserError(f"data.tasks.{name}.target: column '{column}' is not in {path} "
                                "(re-run ingest after changing data.tasks)")
    for column in paths.RESERVED if reserved else (paths.ID,):
        if column not in names:
            raise UserError(f"{path}: column '{column}' is missing (written by an older or other tool?)")


def seeds_of(params: Params, chosen: list[int] | None) -> list[int]:
    """The seeds a command runs: those chosen on the command line, each one of ``seeds``."""
    for seed in chosen or []:
        if seed not in params.seeds:
            raise UserError(f"--seed: {seed} is not in seeds {params.seeds} of the params file")
    return list(chosen or params.seeds)


def load_model(params: Params, variant: str, seed: int | None) -> Bundle:
    """The trained model of ``variant`` and ``seed`` (default: the first of ``seeds``)."""
    from mtl.engine.checkpoint import Bundle  # torch: only for the stages that need a model

    params.variant_train(variant)  # an unknown variant fails here
    seed = params.seeds[0] if seed is None else seeds_of(params, [seed])[0]
    path = paths.model_dir(variant, seed) / "model.pt"
    if not path.is_file():
        raise UserError(f"{path}: file not found (run 'mtl train --variant {variant} --seed {seed}' first)")
    try:
        return Bundle.load(path)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a loadable model ({reason[:200]})") from None


def feature_columns(preprocessor: Preprocessor) -> list[str]:
    p = preprocessor
    return [*p.tabular.numeric, *p.tabular.categorical,
            *(p.text.columns if p.text else ()), *(p.image.columns if p.image else ())]


def check_features(table: pa.Table, path: Path, preprocessor: Preprocessor) -> None:
    """One line naming the first feature column the model needs that ``table`` lacks, or the
    first numeric one that does not hold numbers."""
    for name in feature_columns(preprocessor):
        if name not in table.column_names:
            raise UserError(f"{path}: feature column '{name}' is missing (the model reads "
                            f"{feature_columns(preprocessor)})")
    for name in preprocessor.tabular.numeric:
        try:
            table[name].cast(pa.float64())
        except pa.ArrowException:
            raise UserError(f"{path}: column '{name}' must hold numbers "
                            f"(it holds {table[name].type})") from None
