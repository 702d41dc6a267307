"""A plain CSV file read in parallel. pyarrow's streaming reader parses on one thread, and from
CSV that was most of ingest's time (BENCHMARKS.md). Here the file is cut at record ends into
chunks of about ``CHUNK_BYTES``, and pyarrow's multithreaded ``read_csv`` parses each chunk, one
chunk ahead on a thread, with the column types the streaming reader inferred from the file's
first block. The values, the types and pyarrow's error messages are the streaming reader's.

A chunk ends at a line end with an even number of quote characters before it: under RFC 4180 a
quoted field's own quotes come in pairs, so a quoted field that holds a line end stays in one
chunk. A file whose quotes do not pair up (a stray quote inside an unquoted field) can leave no
such line end; if none turns up within ``SEARCH_BYTES``, the streaming reader reads the rest of
the file, as it read every file before. (Within a chunk, ``read_csv`` cuts its blocks as the
streaming reader does, at any line end.)
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

CHUNK_BYTES = 4 << 20
SEARCH_BYTES = 4 * CHUNK_BYTES


def batches(path: str, schema: pa.Schema, convert: pacsv.ConvertOptions,
            columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of the CSV file at ``path``, of the streaming reader's ``schema``, converted
    with ``convert`` (its null values and the rest), in file order; only ``columns``, if given."""
    options = copy.copy(convert)  # every option the stream had, with its types fixed
    options.column_types, options.include_columns = schema, columns or []
    names = pacsv.ReadOptions(column_names=schema.names)
    with open(path, "rb") as file, ThreadPoolExecutor(max_workers=1) as ahead:
        chunks, parsed, header = _chunks(file), None, pacsv.ReadOptions()
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop:
                rest = stop.value
                break
            following = ahead.submit(pacsv.read_csv, pa.py_buffer(chunk), read_options=header,
                                     convert_options=options)
            header = names  # only the first chunk starts with the header
            if parsed is not None:
                yield from parsed.result().to_batches()
            parsed = following
        if parsed is not None:
            yield from parsed.result().to_batches()
        if rest is not None:  # no record end found: the streaming reader takes over
            file.seek(rest)
            yield from pacsv.open_csv(file, read_options=header, convert_options=options)


def _chunks(file: BinaryIO) -> Generator[memoryview, None, int | None]:
    """``file`` in chunks that end at a record end; returns None at the end of the file, or
    the offset of the first byte not yielded if no record end turned up within SEARCH_BYTES.
    The chunks are read into two buffers in turn, so a chunk's memory is reused two chunks on:
    the caller must be done with it when it asks for the second chunk after it. (A fresh
    4 MB object a chunk faulted its pages in anew: 1.1 s of system time per 1.7 GB read.)"""
    buffer, spare = bytearray(SEARCH_BYTES + CHUNK_BYTES), bytearray(SEARCH_BYTES + CHUNK_BYTES)
    scratch = np.empty(SEARCH_BYTES + CHUNK_BYTES, bool)
    rest, offset = 0, 0  # rest: the bytes after the last record end, from offset on
    while True:
        read = file.readinto(memoryview(buffer)[rest:rest + CHUNK_BYTES])
        size = rest + read
        if not read:
            if size:
                yield memoryview(buffer)[:size]
            return None
        end = record_end(buffer, scratch, size)
        if not end:
            if size >= SEARCH_BYTES:
                return offset
            rest = size
            continue
        yield memoryview(buffer)[:end]
        spare[:size - end] = memoryview(buffer)[end:size]
        buffer, spare, rest, offset = spare, buffer, size - end, offset + end


def record_end(buffer: bytes | bytearray, scratch: np.ndarray | None = None, size: int | None = None) -> int:
    """Just past the last line end in ``buffer`` (its first ``size`` bytes, if given) with an
    even number of quote characters before it (outside any quoted field), or 0 if there is
    none; ``scratch``: a boolean array at least that long to work in (a fresh one costs page
    faults)."""
    size = len(buffer) if size is None else size
    scratch = np.empty(size, bool) if scratch is None else scratch[:size]
    quote = np.equal(np.frombuffer(buffer, np.uint8, count=size), ord('"'), out=scratch)  # 4x bytes.count's speed
    end, quotes = size, int(np.count_nonzero(quote))
    while (i := buffer.rfind(b"\n", 0, end)) >= 0:
        quotes -= int(np.count_nonzero(quote[i:end]))
        if quotes % 2 == 0:
            return i + 1
        end = i
    return 0
