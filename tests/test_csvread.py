"""A plain CSV file is read in chunks cut at record ends and parsed in parallel
(``mtl.csvread``): the rows, types and errors must be the streaming reader's, whatever the
chunk size, and a quoted field must never be cut."""

import gzip
import random
import threading
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from mtl import csvread, io
from mtl.errors import UserError


def write_csv(path, rows: list[str], header: str = "id,note,x,flag") -> str:
    text = header + "\n" + "".join(row + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return text


def chunked(path, monkeypatch, chunk_bytes: int, columns=None) -> pa.Table:
    monkeypatch.setattr(csvread, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(csvread, "SEARCH_BYTES", 4 * chunk_bytes)
    schema = pacsv.open_csv(path, convert_options=io.CSV_OPTIONS).schema
    return pa.Table.from_batches(list(csvread.batches(str(path), schema, io.CSV_OPTIONS, columns)),
                                 schema=schema if columns is None else None)


def streamed(path) -> pa.Table:
    return pacsv.open_csv(path, convert_options=io.CSV_OPTIONS).read_all()


def test_record_end_skips_line_ends_inside_quotes():
    assert csvread.record_end(b'a,b\n1,"x\ny"\n2,"z\n') == len(b'a,b\n1,"x\ny"\n')
    assert csvread.record_end(b'a,"he said ""hi""\nthere"\n3') == len(b'a,"he said ""hi""\nthere"\n')
    assert csvread.record_end(b'"x\ny') == 0
    assert csvread.record_end(b"no line end") == 0


def test_quoted_fields_with_line_ends_stay_whole(tmp_path, monkeypatch):
    """Fields holding line ends, commas and quotes, cut into chunks of a few records: the rows
    are those of a reader that allows line ends in values."""
    rng = random.Random(0)
    notes = ["plain", '"two\nlines"', '"a, b"', '"say ""hi"""', '"x\n\ny, ""z""\n"', ""]
    rows = [f"r{i},{rng.choice(notes)},{rng.uniform(-5, 5):.3f},{rng.choice(['true', 'false'])}"
            for i in range(400)]
    path = tmp_path / "t.csv"
    write_csv(path, rows)
    expected = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                              convert_options=io.CSV_OPTIONS)
    for chunk_bytes in (64, 333, 1 << 20):
        assert chunked(path, monkeypatch, chunk_bytes).equals(expected)


def test_many_chunks_give_the_stream_s_rows_and_types(tmp_path, monkeypatch):
    rows = [f"r{i},{'' if i % 7 == 0 else f'n{i % 5}'},{i / 3:.4f},{'true' if i % 2 else 'false'}"
            for i in range(5000)]
    path = tmp_path / "t.csv"
    write_csv(path, rows)
    expected = streamed(path)
    assert expected.schema.types == [pa.string(), pa.string(), pa.float64(), pa.bool_()]
    with open(path, "rb") as file:
        monkeypatch.setattr(csvread, "CHUNK_BYTES", 1000)
        assert len(list(csvread._chunks(file))) > 50
    assert chunked(path, monkeypatch, 1000).equals(expected)
    assert chunked(path, monkeypatch, 1000, ["x", "id"]).equals(expected.select(["x", "id"]))


def test_a_value_that_does_not_convert_gives_the_stream_s_error(tmp_path, monkeypatch):
    """Types come from the first block, as the stream's do: a later value of another type is
    refused with the same message."""
    rows = [f"r{i},n,{i},true" for i in range(3000)] + ["r3000,n,lots,true"]
    path = tmp_path / "t.csv"
    write_csv(path, rows)
    with pytest.raises(pa.ArrowInvalid) as stream_error:
        pacsv.open_csv(path, convert_options=io.CSV_OPTIONS,
                       read_options=pacsv.ReadOptions(block_size=4096)).read_all()
    schema = pacsv.open_csv(path, convert_options=io.CSV_OPTIONS,
                            read_options=pacsv.ReadOptions(block_size=4096)).schema
    monkeypatch.setattr(csvread, "CHUNK_BYTES", 2048)
    with pytest.raises(pa.ArrowInvalid) as error:
        list(csvread.batches(str(path), schema, io.CSV_OPTIONS))
    assert str(error.value) == str(stream_error.value)
    assert "CSV conversion error to int64: invalid value 'lots'" in str(error.value)


def test_a_stray_quote_hands_the_rest_to_the_stream(tmp_path, monkeypatch):
    """A quote inside an unquoted field (a 15" screen) leaves no line end with paired quotes
    before it: from the last good record end on, the streaming reader reads the file."""
    rows = [f"r{i},n{i},{i},true" for i in range(200)] + ['r200,15" screen,1,false'] + \
           [f"r{i},n{i},{i},true" for i in range(201, 600)]
    path = tmp_path / "t.csv"
    text = write_csv(path, rows)
    monkeypatch.setattr(csvread, "CHUNK_BYTES", 512)
    monkeypatch.setattr(csvread, "SEARCH_BYTES", 2048)
    with open(path, "rb") as file:
        chunks = csvread._chunks(file)
        yielded = []
        with pytest.raises(StopIteration) as stop:
            while True:
                yielded.append(bytes(next(chunks)))
    rest = stop.value.value
    assert rest is not None and b"".join(yielded) == text.encode()[:rest]
    assert 'r200,15"' in text[rest:]
    assert chunked(path, monkeypatch, 512).equals(streamed(path))


def test_scan_table_reads_a_plain_csv_file_in_chunks(tmp_path, monkeypatch):
    """A .csv file goes through csvread, regrouped into batches of BATCH_ROWS on a thread of
    its own; a compressed one is streamed."""
    rows = [f"r{i},n{i % 3},{i},true" for i in range(2000)]
    path = tmp_path / "t.csv"
    text = write_csv(path, rows)
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(text.encode()))
    calls, threads = [], set()
    read = csvread.batches

    def reading(path, *args):
        calls.append(path)
        for batch in read(path, *args):
            threads.add(threading.get_ident())
            yield batch

    monkeypatch.setattr(csvread, "batches", reading)
    monkeypatch.setattr(csvread, "CHUNK_BYTES", 700)
    monkeypatch.setattr(io, "BATCH_ROWS", 300)
    batches = list(io.scan_table(path).batches())
    assert [b.num_rows for b in batches] == [300] * 6 + [200]
    assert pa.Table.from_batches(batches).equals(streamed(path))
    assert pa.Table.from_batches(list(io.scan_table(tmp_path / "t.csv.gz").batches())).equals(streamed(path))
    assert calls == [str(path)]
    assert threads and threading.get_ident() not in threads


def test_read_ahead_makes_the_next_batch_while_the_caller_works():
    made = []

    def source():
        for i in range(3):
            made.append(i)
            yield i
        raise pa.ArrowInvalid("broken")

    batches = io.read_ahead(source())
    assert next(batches) == 0
    deadline = time.monotonic() + 10
    while made != [0, 1]:  # made on the thread, not asked for yet
        assert time.monotonic() < deadline, made
        time.sleep(0.01)
    assert [next(batches), next(batches)] == [1, 2]
    with pytest.raises(pa.ArrowInvalid, match="broken"):  # raised to the caller, in order
        next(batches)


def test_a_late_value_that_does_not_convert_names_its_column(tmp_path):
    """Past the first block (1 MB), where the types were taken, a value of another type is one
    line naming the file, the column and the value."""
    rows = [f"r{i},n,{i},true" for i in range(60_000)] + ["r60000,n,lots,true"]
    path = tmp_path / "t.csv"
    write_csv(path, rows)
    assert path.stat().st_size > 1 << 20
    with pytest.raises(UserError) as error:
        list(io.scan_table(path).batches())
    assert str(error.value) == (f"{path}: cannot be read as a table: column 'x': "
                                "CSV conversion error to int64: invalid value 'lots'")
