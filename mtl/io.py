"""Reading data sources and writing outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import codecs
import collections
import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl import sources
from mtl.errors import UserError

UMASK = os.umask(0)  # the process's umask (reading it means setting it; restored at once)
os.umask(UMASK)

# Strings read as missing values in CSV files ("?" is how UCI data sets mark them).
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
CSV_OPTIONS = pacsv.ConvertOptions(null_values=NULL_VALUES, strings_can_be_null=True)

# Rows per record batch the data stages read, and per Parquet row group they write: their memory
# grows with it (a few batches at a time), not with the table.
BATCH_ROWS = 1 << 18


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds,
    so a failed or killed stage never leaves a half-written output behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would make outputs private to their writer
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def replace_dir(src: Path | str, dst: Path | str) -> None:
    """Move the finished directory ``src`` onto ``dst``, replacing what was there; ``dst`` is
    never left half-written (at worst, after a kill, the old copy waits under ``dst.old``)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_table(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj: object, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_paths(*paths: Path | str) -> Iterator[list[Path]]:
    """``atomic_path`` for outputs that belong together: they are renamed into place only once
    the block has written them all, so a failure leaves every previous output as it was."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


class RowGroupWriter:
    """A Parquet file written row group by row group (at least ``BATCH_ROWS`` rows each, but
    the last); floating-point columns are not dictionary-encoded (it rarely pays for them, and
    trying makes writing about 3 times slower)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema, self.pending, self.rows, self.written = schema, [], 0, False
        dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
        self.writer = pq.ParquetWriter(path, schema, use_dictionary=dictionary)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.pending, self.rows, self.written = [], 0, True

    def close(self) -> None:
        """Write what is left (an empty table if nothing was written at all) and close."""
        if self.pending or not self.written:
            self._flush()
        self.writer.close()


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
    parquet = _table_file(path)
    with _readable(path):
        if parquet:
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=CSV_OPTIONS)
    _check_columns(path, table.schema, parquet)
    return table


def _table_file(path: Path) -> bool:
    """Fail unless ``path`` is a CSV or Parquet file; whether it is Parquet."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a CSV or Parquet file")
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it first)")
    parquet = path.suffix in (".parquet", ".pq")
    if not parquet and ".csv" not in path.suffixes:
        raise UserError(f"{path}: not a CSV or Parquet file (expected .csv, .csv.gz, .parquet or .pq)")
    return parquet


def _check_columns(path: Path, schema: pa.Schema, parquet: bool) -> None:
    """Fail on a CSV file that is not UTF-8 text, and on a column name given twice."""
    try:
        names = schema.names
    except UnicodeDecodeError:  # a column name that is not UTF-8
        names = None
    # pyarrow reads CSV values that are not UTF-8 text as binary
    if not parquet and (names is None or any(pa.types.is_binary(t) for t in schema.types)):
        where = _not_utf8(path)
        if where or names is None:
            raise UserError(f"{path}: not UTF-8 text: {where or 'in a column name'}; save the file as UTF-8")
    twice = [name for name, n in collections.Counter(names).items() if n > 1]
    if twice:
        raise UserError(f"{path}: column '{twice[0]}' appears more than once")


class Scan:
    """A table read in record batches of at most ``BATCH_ROWS`` rows: its ``schema``, and
    ``batches()``, a fresh pass over it at each call."""

    def __init__(self, schema: pa.Schema, batches: Callable[[], Iterator[pa.RecordBatch]]):
        self.schema, self._batches = schema, batches

    @classmethod
    def of(cls, table: pa.Table) -> Scan:
        return cls(table.schema, lambda: iter(table.to_batches(max_chunksize=BATCH_ROWS)))

    def batches(self) -> Iterator[pa.RecordBatch]:
        return (batch for batch in self._batches() if batch.num_rows)


def scan_table(path: Path | str) -> Scan:
    """Stream one Parquet or CSV file, with ``read_table``'s checks."""
    path = Path(path)
    parquet = _table_file(path)
    with _readable(path):
        if parquet:
            schema = pq.read_schema(path)
            # Row group by row group, no read-ahead: a dataset scanner (and pre_buffer) reads
            # ahead of a slow consumer without bound, so memory would grow with the table.
            batches = lambda: pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS)
        else:
            batches = lambda: pacsv.open_csv(path, convert_options=CSV_OPTIONS)
            schema = batches().schema
    _check_columns(path, schema, parquet)

    def checked() -> Iterator[pa.RecordBatch]:
        with _readable(path):
            for batch in batches():
                for start in range(0, batch.num_rows, BATCH_ROWS):  # a CSV block may hold more
                    yield batch.slice(start, BATCH_ROWS)

    return Scan(schema, checked)


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn pyarrow's errors while reading ``path`` into one line naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot be read as a table: {reason}") from None


def _not_utf8(path: Path) -> str | None:
    """Where the first byte that is not valid UTF-8 is (offset, line), or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with pa.input_stream(str(path)) as stream:  # decompresses .gz, .bz2, ... by extension
        while chunk := stream.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = exc.object[exc.start]
                lines += exc.object[:exc.start].count(b"\n")
                return f"byte 0x{bad:02x} at offset {offset - pending + exc.start} (line {lines})"
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    return None


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
    scan = scan_source(source)
    return pa.Table.from_batches(list(scan.batches()), scan.schema)


def scan_source(source: str) -> Scan:
    """``read_source`` in record batches: files are streamed, one after the other."""
    name, colon, limit = source.partition(":")
    if name in BUILTIN_SOURCES:
        if colon and not (limit.isdigit() and int(limit) > 0):
            raise UserError(f"data.source: '{source}': after '{name}:' put a positive number of rows")
        return Scan.of(BUILTIN_SOURCES[name](int(limit) if colon else None))
    paths = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
    if not paths:
        raise UserError(f"data.source: no file matches '{source}'")
    if not os.path.lexists(paths[0]):
        raise UserError(f"data.source: file '{source}' not found (nor is it a built-in data set: "
                        f"{', '.join(BUILTIN_SOURCES)})")
    scans = [scan_table(p) for p in paths]
    if len(scans) == 1:
        return scans[0]
    try:  # as pa.concat_tables(promote_options="permissive") would
        schema = pa.unify_schemas([s.schema for s in scans], promote_options="permissive")
    except pa.ArrowException as exc:
        raise UserError(f"data.source: files matching '{source}' have incompatible columns: "
                        f"{str(exc).splitlines()[0]}") from None

    def batches() -> Iterator[pa.RecordBatch]:
        for scan in scans:
            for batch in scan.batches():
                yield pa.RecordBatch.from_arrays(
                    [batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                     else pa.nulls(batch.num_rows, f.type) for f in schema], schema=schema)

    return Scan(schema, batches)
