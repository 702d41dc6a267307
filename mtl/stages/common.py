"""What several stages share: the checks made before anything is written, the seeds a command
runs, and loading a trained model."""

from __future__ import annotations

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


# The Arrow type ingest writes for each kind of feature and of task.
WRITTEN_TYPES = {"numeric": pa.float64(), "categorical": pa.string(), "text": pa.string(),
                 "image": pa.binary(), "regression": pa.float64(), "binary": pa.string(),
                 "multiclass": pa.string(), "multilabel": pa.bool_()}


def check_types(columns: pa.Schema, path: Path, kinds: dict[str, str]) -> None:
    """Fail with one line naming the first column of ``kinds`` (column -> kind of feature or
    task) that does not have the type ingest writes for its kind: a split written by another
    tool, or changed by hand."""
    for name, kind in kinds.items():
        if name in columns.names and columns.field(name).type != WRITTEN_TYPES[kind]:
            raise UserError(f"{path}: column '{name}' holds {columns.field(name).type}, not the "
                            f"{WRITTEN_TYPES[kind]} ingest writes for a {kind} column (re-run the "
                            "pipeline from ingest)")


def model_kinds(bundle: Bundle) -> dict[str, str]:
    """The kind of each column a trained model reads: its features and its tasks' targets."""
    p = bundle.preprocessor
    kinds = {name: "numeric" for name in p.tabular.numeric}
    kinds |= {name: "categorical" for name in p.tabular.categorical}
    kinds |= {name: "text" for name in (p.text.columns if p.text else ())}
    kinds |= {name: "image" for name in (p.image.columns if p.image else ())}
    return kinds | {column: task.kind for task in bundle.tasks for column in task.columns}


def seeds_of(params: Params, chosen: list[str | int] | None) -> list[int]:
    """The seeds a command runs: those chosen on the command line (``--seed``, as typed), each
    one of ``seeds``; without any, each of ``seeds``."""
    seeds = []
    for text in chosen or []:
        try:
            seed = int(text)
        except ValueError:
            raise UserError(f"--seed: '{text}' is not an integer") from None
        if seed not in params.seeds:
            raise UserError(f"--seed: {seed} is not in seeds {params.seeds} of the params file")
        seeds.append(seed)
    return seeds or list(params.seeds)


def load_model(params: Params, variant: str, seed: str | int | None) -> Bundle:
    """The trained model of ``variant`` and ``seed`` (default: the first of ``seeds``)."""
    # torch: only for the stages that need a model
    from mtl.engine.checkpoint import Bundle, NotOurs

    params.variant_train(variant)  # an unknown variant fails here
    seed = params.seeds[0] if seed is None else seeds_of(params, [seed])[0]
    path = paths.model_dir(variant, seed) / "model.pt"
    if not path.is_file():
        raise UserError(f"{path}: file not found (run 'mtl train --variant {variant} --seed {seed}' first)")
    try:
        return Bundle.load(path)
    except NotOurs as exc:
        raise UserError(f"{path} is not a model written by mtl-pipeline ({exc}); "
                        f"run 'mtl train --variant {variant} --seed {seed}' again") from None


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
