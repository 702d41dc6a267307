"""Reading data sources and writing outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import codecs
import collections
import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl import csvread
from mtl.errors import UserError

# Strings read as missing values in CSV files ("?" is how UCI data sets mark them).
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
CSV_OPTIONS = pacsv.ConvertOptions(null_values=NULL_VALUES, strings_can_be_null=True)

# jemalloc for Arrow's buffers, where pyarrow has it and ARROW_DEFAULT_MEMORY_POOL does not say
# otherwise: measured on ingest of 1 M rows x 50 columns, Arrow's default (mimalloc) spent twice
# the system time, and took 3.5-3.8 s from Parquet against 2.4-2.6 s, 6.8-7.0 s from CSV against
# 5.8 s; the C library's malloc matched jemalloc on Parquet but took 7.3-8.0 s from CSV.
# Freed pages go back to the system after ten seconds, not at once (pyarrow's default): each
# batch's buffers then reuse earlier batches' pages instead of faulting fresh ones in (ingest of
# 2 M rows from Parquet: 3.2 s against 3.6-3.7 s, a third less system time, 8 % more peak RSS).
# A split's rows wait seconds for a row group to fill, so one second still purged and refaulted:
# at 10 M rows, 12.3 s against 13.2 s (means of 7 alternating runs), 5 % more peak RSS.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    with contextlib.suppress(NotImplementedError):  # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(10_000)

# Rows per record batch the data stages read, and per Parquet row group they write: their memory
# grows with it (a few batches at a time), not with the table.
BATCH_ROWS = 1 << 18


# What a full disk, a read-only or forbidden place, or a file where a folder should be raise
# while an output is written.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.EFBIG, errno.ENAMETOOLONG}


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a failure to write ``path`` (see ``WRITE_ERRNOS``) into one line naming it and the
    reason, e.g. ``models/hps: cannot be written: no space left on device``."""
    try:
        yield
    except Exception as exc:
        error = _write_error(exc)
        if error is None:
            raise
        reason = os.strerror(error.errno).lower()
        if error.filename and Path(error.filename) in Path(path).parents:  # e.g. a file in the way
            reason += f" ({error.filename})"
        raise UserError(f"{path}: cannot be written: {reason}") from None


def _write_error(exc: BaseException | None) -> OSError | None:
    """The OSError of ``WRITE_ERRNOS`` that ``exc`` is, or that torch's writers wrap in a
    RuntimeError; None otherwise."""
    while isinstance(exc, RuntimeError):
        exc = exc.__cause__ or exc.__context__
    return exc if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS else None


def _unique(parent: Path, name: str, make: Callable[[Path], None]) -> Path:
    """A new ``parent/.<name>.<random>.tmp``, made by ``make`` (which fails if it exists)."""
    for _ in range(100):
        path = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        with contextlib.suppress(FileExistsError):
            make(path)
            return path
    raise FileExistsError(f"{parent}: no free temporary name for {name}")


def temp_file(parent: Path, name: str) -> Path:
    """A new empty file for ``parent/name`` to be renamed from, with the mode a plain
    ``open(..., "w")`` gives (0666 less the umask)."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    return _unique(parent, name, lambda p: os.close(os.open(p, flags, 0o666)))


def temp_dir(parent: Path, name: str) -> Path:
    """A new empty folder for ``parent/name`` to be renamed from (mode 0777 less the umask)."""
    return _unique(parent, name, lambda p: os.mkdir(p, 0o777))


def remove_leftovers(*outputs: Path | str) -> None:
    """Remove the temporary files and folders (``.<name>.*.tmp``) that killed runs left next to
    ``outputs``. Call it holding the stage's lock, so that no live run is writing them."""
    for output in map(Path, outputs):
        for stale in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def check_writable(folder: Path | str) -> None:
    """Fail with one line unless files can be created in ``folder`` (made if missing): checked
    before a long run, rather than after it."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(temp_dir(folder, "probe"))


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path``, renamed onto ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds,
    so a failed or killed stage never leaves a half-written output behind (what a killed one
    leaves, ``remove_leftovers`` removes). A failure to write is one line naming ``path``."""
    path = Path(path)
    with writing(path), _temporary(path) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: Path | str) -> Iterator[list[Path]]:
    """``atomic_path`` for outputs that belong together: they are renamed into place only once
    the block has written them all, so a failure leaves every previous output as it was. A
    failure to write is one line naming their folder."""
    with writing(os.path.commonpath(paths)), contextlib.ExitStack() as stack:
        yield [stack.enter_context(_temporary(Path(path))) for path in paths]


def replace_dirs(*moves: tuple[Path, Path]) -> None:
    """Move each finished directory ``src`` onto its ``dst``, replacing what was there: all of
    them, or none (a failed move undoes the earlier ones; a failure to write is one line naming
    its ``dst``). A ``dst`` is never left half-written (at worst, after a kill, the old copy
    waits under ``dst.old``)."""
    done: list[tuple[Path, Path]] = []  # the renames made, to undo on failure
    olds = []
    try:
        for src, dst in moves:
            src, dst = Path(src), Path(dst)
            old = dst.with_name(dst.name + ".old")
            with writing(dst):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(old, ignore_errors=True)
                if dst.exists():
                    os.replace(dst, old)
                    done.append((dst, old))
                    olds.append(old)
                os.replace(src, dst)
                done.append((src, dst))
    except BaseException:
        for a, b in reversed(done):
            os.replace(b, a)
        raise
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(source: Path | str, target: Path | str) -> None:
    """Make ``target`` the same file as ``source``: a hard link (nothing copied), or a copy where
    the file system cannot link. ``target`` is replaced if it exists."""
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_table(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj: object, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RowGroupWriter:
    """A Parquet file written row group by row group (at least ``BATCH_ROWS`` rows each, but
    the last); floating-point columns are not dictionary-encoded (it rarely pays for them, and
    trying makes writing about 3 times slower). A row group is encoded on a thread of its own
    while the caller reads and converts the next one (pyarrow releases the GIL), at most one
    at a time, so memory holds at most two row groups."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema, self.pending, self.rows, self.written = schema, [], 0, False
        dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
        self.writer = pq.ParquetWriter(path, schema, use_dictionary=dictionary)
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.busy: Future | None = None  # the row group being written

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        self._wait()
        self.busy = self.thread.submit(self.writer.write_table, table,
                                       row_group_size=max(table.num_rows, 1))
        self.pending, self.rows, self.written = [], 0, True

    def _wait(self) -> None:
        """Wait for the row group being written (raising what writing it raised)."""
        if self.busy is not None:
            busy, self.busy = self.busy, None
            busy.result()

    def close(self) -> None:
        """Write what is left (an empty table if nothing was written at all) and close."""
        if self.pending or not self.written:
            self._flush()
        self._wait()
        self.thread.shutdown()
        self.writer.close()


def read_text(path: Path | str) -> str:
    """A UTF-8 text file an earlier stage wrote; one line naming it if it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run the stage that writes it first)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (written by another tool?)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read: {os.strerror(exc.errno).lower()}") from None


def read_json(path: Path | str) -> object:
    """A JSON file an earlier stage wrote (its shape is the caller's to check)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


NUMBER = (int, float)
OPTIONAL_NUMBER = (type(None), int, float)


def mismatch(value: object, structure: object, where: str = "") -> str | None:
    """Where ``value`` (as read from a file) departs from ``structure``, in a few words, or None.
    ``structure`` is a type or a tuple of types, ``[item]`` for a list (or tuple) of items,
    ``{key: structure}`` for a dict with at least those keys, or ``{str: structure}`` for a dict
    whose every value has that structure."""
    name = f"field '{where}'" if where else "the file"
    if isinstance(structure, dict):
        if not isinstance(value, dict):
            return f"{name} holds {type(value).__name__}, expected a dict"
        pairs = [(key, structure[str]) for key in value] if str in structure else structure.items()
        for key, inner in pairs:
            inner_where = f"{where}.{key}" if where else str(key)
            if key not in value:
                return f"field '{inner_where}' is missing"
            if problem := mismatch(value[key], inner, inner_where):
                return problem
        return None
    if isinstance(structure, list):
        if not isinstance(value, list | tuple):
            return f"{name} holds {type(value).__name__}, expected a list"
        return next(filter(None, (mismatch(item, structure[0], f"{where}[{i}]")
                                  for i, item in enumerate(value))), None)
    if not isinstance(value, structure):
        types = structure if isinstance(structure, tuple) else (structure,)
        return f"{name} holds {type(value).__name__}, expected {' or '.join(t.__name__ for t in types)}"
    return None


def read_table(path: Path | str) -> pa.Table:
    """Read one Parquet or CSV file (by extension; ``.csv.gz`` etc. are decompressed)."""
    path = Path(path)
    parquet = _table_file(path)
    with _readable(path):
        if parquet:  # not pq.read_table: it imports pyarrow.dataset, 0.3 s a stage, for one file
            table = pq.ParquetFile(path).read()
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
    ``batches()``, a fresh pass over it (over some ``columns`` only, if given) at each call."""

    def __init__(self, schema: pa.Schema,
                 batches: Callable[[list[str] | None], Iterator[pa.RecordBatch]]):
        self.schema, self._batches = schema, batches

    @classmethod
    def of(cls, table: pa.Table) -> Scan:
        return cls(table.schema, lambda columns: iter(
            (table.select(columns) if columns else table).to_batches(max_chunksize=BATCH_ROWS)))

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        return (batch for batch in self._batches(columns) if batch.num_rows)


def scan_table(path: Path | str) -> Scan:
    """Stream one Parquet or CSV file, with ``read_table``'s checks."""
    path = Path(path)
    parquet = _table_file(path)
    parallel = path.suffix == ".csv"  # a plain CSV file is parsed in parallel, a compressed one streamed
    with _readable(path):
        if parquet:
            schema = pq.read_schema(path)
            # Row group by row group, no read-ahead: a dataset scanner (and pre_buffer) reads
            # ahead of a slow consumer without bound, so memory would grow with the table.
            batches = lambda columns: pq.ParquetFile(path, pre_buffer=False).iter_batches(
                batch_size=BATCH_ROWS, columns=columns)
        else:
            schema = pacsv.open_csv(path, convert_options=CSV_OPTIONS).schema  # types from the first block
            if parallel:
                batches = lambda columns: csvread.batches(str(path), schema, CSV_OPTIONS, columns)
            else:
                batches = lambda columns: (batch if columns is None else batch.select(columns)
                                           for batch in pacsv.open_csv(path, convert_options=CSV_OPTIONS))
    _check_columns(path, schema, parquet)

    def checked(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        with _readable(path, None if parquet else schema.names):
            coalesced = _coalesce(batches(columns))
            yield from read_ahead(coalesced) if parallel else coalesced

    return Scan(schema, checked)


def read_ahead(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches``, the next one made on a thread while the caller works on this one. For a
    plain CSV file: csvread then parses on while ingest converts a batch, instead of one chunk
    (ingest of 2 M rows, six alternating pairs: 6.36 s against 6.59 s). From Parquet it
    measured within noise."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        coming = thread.submit(next, batches, None)
        while (batch := coming.result()) is not None:
            coming = thread.submit(next, batches, None)
            yield batch


def _coalesce(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches`` regrouped into batches of ``BATCH_ROWS`` rows (the last one fewer): a CSV
    block, or a small Parquet row group, holds a few thousand rows, and each batch costs the
    stages a few Python calls per column."""
    pending, rows = [], 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= BATCH_ROWS:
            table = pa.Table.from_batches(pending)
            yield from table.slice(0, BATCH_ROWS).combine_chunks().to_batches()
            rest = table.slice(BATCH_ROWS)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield from pa.Table.from_batches(pending).combine_chunks().to_batches()


@contextlib.contextmanager
def _readable(path: Path, names: list[str] | None = None) -> Iterator[None]:
    """Turn pyarrow's errors while reading ``path`` into one line naming the file (and the
    column by its name, where pyarrow gives a CSV column's position among ``names``)."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if names and (number := re.match(r"In CSV column #(\d+): ", reason)) and int(number[1]) < len(names):
            reason = f"column '{names[int(number[1])]}': {reason[number.end():]}"
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
