"""Checks every data-reading stage makes before it writes anything."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from mtl import paths
from mtl.config import Params
from mtl.errors import UserError


def require_columns(table: pa.Table, path: Path, params: Params, reserved: bool = False) -> None:
    """Fail with one line if a task's target (or a reserved column) is missing from ``table``."""
    for name, task in params.data.tasks.items():
        if task.target not in table.column_names:
            raise UserError(f"data.tasks.{name}.target: column '{task.target}' is not in {path} "
                            "(re-run ingest after changing data.tasks)")
    for column in paths.RESERVED if reserved else (paths.ID,):
        if column not in table.column_names:
            raise UserError(f"{path}: column '{column}' is missing (written by an older or other tool?)")
