"""Reading data sources and writing outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl import sources
from mtl.errors import UserError

# Strings read as missing values in CSV files ("?" is how UCI data sets mark them).
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds,
    so a failed or killed stage never leaves a half-written output behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_table(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj: object, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run the stage that writes it first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


def read_table(path: Path | str) -> pa.Table:
    """Read one Parquet or CSV file (by extension; ``.csv.gz`` etc. are decompressed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it first)")
    try:
        if path.suffix == ".parquet" or path.suffix == ".pq":
            return pq.read_table(path)
        options = pacsv.ConvertOptions(null_values=NULL_VALUES, strings_can_be_null=True)
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot be read as a table: {reason}") from None


def penguins_csv() -> Path:
    """The Palmer penguins CSV shipped inside the ``palmerpenguins`` package (no download)."""
    import palmerpenguins

    return Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"


def penguins(limit: int | None = None) -> pa.Table:
    table = read_table(penguins_csv())
    return table if limit is None else table.slice(0, limit)


# Built-in data sets: name -> reader taking an optional row limit ("name:N" in data.source).
BUILTIN_SOURCES = {"penguins": penguins, "multifashion": sources.multifashion,
                   "tweets": sources.tweets, "adult": sources.adult}


def read_source(source: str) -> pa.Table:
    """A built-in data set by name (``name:N`` keeps its first N rows), or every CSV/Parquet
    file matching a path or glob."""
    name, colon, limit = source.partition(":")
    if name in BUILTIN_SOURCES:
        if colon and not (limit.isdigit() and int(limit) > 0):
            raise UserError(f"data.source: '{source}': after '{name}:' put a positive number of rows")
        return BUILTIN_SOURCES[name](int(limit) if colon else None)
    paths = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
    if not paths:
        raise UserError(f"data.source: no file matches '{source}'")
    tables = [read_table(p) for p in paths]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        raise UserError(f"data.source: files matching '{source}' have incompatible columns: "
                        f"{str(exc).splitlines()[0]}") from None
