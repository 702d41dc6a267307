"""Where ingest reads its rows: ``data.source``, a built-in data set or CSV/Parquet files.

The built-in multi-task data sets are read from the shared data folder (``../shared/data`` next to
the project root, or ``$MTL_SHARED_DATA``; see its README). Each takes an optional row limit
(``data.source: multifashion:6000``) and returns an Arrow table with an ``id`` column.

- ``multifashion``: MultiFashion as in Pareto MTL (Lin et al. 2019, "Pareto Multi-Task
  Learning", after Sabour et al. 2017's MultiMNIST): two Fashion-MNIST items on a 36x36 canvas.
- ``tweets``: Donald Trump's tweets (dslabs): source device, retweets and favourites from text.
- ``adult``: UCI Adult (census income): income, never-married and hours-per-week.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mtl.errors import UserError
from mtl.io import Scan, read_table, scan_table

PROJECT_ROOT = Path(__file__).resolve().parents[1]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CANVAS = 36
PAIRING_SEED = 0

TWEET_SOURCES = {"Twitter for Android": "Android", "Twitter for iPhone": "iPhone",
                 "Twitter Web Client": "Web Client"}  # every other source is "other"

ADULT_COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
                 "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
                 "hours_per_week", "native_country", "income")
ADULT_NUMERIC = ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week")


def shared_data() -> Path:
    """``$MTL_SHARED_DATA``, or ``../shared/data`` relative to the project root."""
    return Path(os.environ.get("MTL_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


def shared_file(relative: str, source: str) -> Path:
    path = shared_data() / relative
    if not path.is_file():
        raise UserError(f"data.source: '{source}' needs {path}, which is missing "
                        "(set MTL_SHARED_DATA to the shared data folder)")
    return path


def gunzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: not a readable gzip file ({exc})") from None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format: magic 0x0000 08 <ndim>, big-endian
    dimensions, then the data), gzip-compressed."""
    data = gunzip(path)
    if data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except ValueError:
        raise UserError(f"{path}: holds fewer bytes than its header's shape {shape}") from None


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Items [N, h, w] -> canvases [N, 36, 36]: ``first`` in the top-left corner, ``second`` in
    the bottom-right one, overlapping pixels the brighter of the two (element-wise max)."""
    n, h, w = first.shape
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :h, :w] = first
    corner = canvas[:, CANVAS - h:, CANVAS - w:]
    np.maximum(corner, second, out=corner)
    return canvas


def multifashion(limit: int | None = None) -> pa.Table:
    """MultiFashion from the Fashion-MNIST training file: canvas i puts item i in the top-left
    and item ``partner[i]`` in the bottom-right, ``partner`` a permutation seeded by
    ``PAIRING_SEED`` (so a limit keeps the first ``limit`` canvases of the full set; the two
    items may share a class). Columns: ``id``, ``image`` (36*36 bytes, row-major), ``left``
    and ``right`` (the items' class names)."""
    images = read_idx(shared_file("fashion-mnist/train-images-idx3-ubyte.gz", "multifashion"))
    labels = read_idx(shared_file("fashion-mnist/train-labels-idx1-ubyte.gz", "multifashion"))
    partner = np.random.default_rng(PAIRING_SEED).permutation(len(images))
    n = len(images) if limit is None else min(limit, len(images))
    canvas = compose(images[:n], images[partner[:n]])
    names = np.array(FASHION_CLASSES)
    return pa.table({
        "id": pa.array([f"mf{i:05d}" for i in range(n)], pa.string()),
        "image": pa.array([c.tobytes() for c in canvas], pa.binary()),
        "left": pa.array(names[labels[:n]].tolist(), pa.string()),
        "right": pa.array(names[labels[partner[:n]]].tolist(), pa.string()),
    })


def tweets(limit: int | None = None) -> pa.Table:
    """The tweets in file order, less any flagged ``is_retweet`` (another account's text;
    the shipped file flags none). Columns: ``id`` (the tweet's id), ``text``, ``source``
    (Android, iPhone, Web Client or other), ``log_retweets`` = log1p(retweet_count) and
    ``log_favorites`` = log1p(favorite_count)."""
    path = shared_file("tweets/trump_tweets.csv.gz", "tweets")
    raw = gunzip(path).replace(b"\r", b" ")  # some texts hold a bare CR
    try:
        table = pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(column_types={"id_str": pa.string()}))
    except pa.ArrowException as exc:
        raise UserError(f"{path}: cannot be read as a table: {str(exc).splitlines()[0]}") from None
    table = table.filter(pc.invert(pc.fill_null(table["is_retweet"], False)))
    if limit is not None:
        table = table.slice(0, limit)
    log1p = lambda name: np.log1p(table[name].to_numpy(zero_copy_only=False).astype("float64"))
    return pa.table({
        "id": table["id_str"],
        "text": table["text"],
        "source": pa.array([TWEET_SOURCES.get(s, "other") for s in table["source"].to_pylist()], pa.string()),
        "log_retweets": log1p("retweet_count"),
        "log_favorites": log1p("favorite_count"),
    })


def adult(limit: int | None = None) -> pa.Table:
    """UCI Adult, ``adult.data`` then ``adult.test`` (ids ``data-<row>`` and ``test-<row>``):
    the 15 columns of ``adult.names`` (``-`` spelt ``_``), '?' read as missing, the test file's
    trailing '.' dropped from ``income`` (``<=50K`` or ``>50K``), plus ``never_married``
    (``yes`` or ``no``, from ``marital_status``)."""
    parts = []
    for name, skip in (("data", 0), ("test", 1)):  # adult.test starts with a "|1x3 Cross validator" line
        path = shared_file(f"adult/adult.{name}", "adult")
        try:
            table = pacsv.read_csv(
                path, read_options=pacsv.ReadOptions(column_names=list(ADULT_COLUMNS), skip_rows=skip),
                convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(ADULT_COLUMNS, pa.string())))
        except pa.ArrowException as exc:
            raise UserError(f"{path}: cannot be read as a table: {str(exc).splitlines()[0]}") from None
        columns = {"id": pa.array([f"{name}-{i}" for i in range(table.num_rows)], pa.string())}
        for column in ADULT_COLUMNS:
            values = pc.utf8_trim_whitespace(table[column])
            values = pc.if_else(pc.equal(values, "?"), pa.scalar(None, pa.string()), values)
            columns[column] = values.cast(pa.float64()) if column in ADULT_NUMERIC else values
        columns["income"] = pc.utf8_rtrim(columns["income"], characters=".")
        parts.append(pa.table(columns))
    table = pa.concat_tables(parts)
    if limit is not None:
        table = table.slice(0, limit)
    never = pc.equal(table["marital_status"], "Never-married")
    return table.append_column("never_married", pc.if_else(never, "yes", "no"))


def penguins_csv() -> Path:
    """The Palmer penguins CSV shipped inside the ``palmerpenguins`` package (no download)."""
    import palmerpenguins

    return Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"


def penguins(limit: int | None = None) -> pa.Table:
    table = read_table(penguins_csv())
    return table if limit is None else table.slice(0, limit)


# Built-in data sets: name -> reader taking an optional row limit ("name:N" in data.source).
BUILTIN_SOURCES = {"penguins": penguins, "multifashion": multifashion,
                   "tweets": tweets, "adult": adult}


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

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        wanted = pa.schema([schema.field(c) for c in columns]) if columns else schema
        for scan in scans:
            for batch in scan.batches():
                yield pa.RecordBatch.from_arrays(
                    [batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                     else pa.nulls(batch.num_rows, f.type) for f in wanted], schema=wanted)

    return Scan(schema, batches)
