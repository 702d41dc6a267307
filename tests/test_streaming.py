"""ingest, augment and split stream their tables in batches: the outputs must not depend on the
batch size (``mtl.io.BATCH_ROWS``), and the Parquet files are written in row groups."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtl import io, paths, sources
from mtl.config import load_params
from mtl.errors import UserError
from mtl.stages import augment, ingest, split
from tests.helpers import REPO


def run_stages(root, monkeypatch, batch_rows: int, *overrides: str) -> dict:
    """Run ingest, augment and split on penguins (read from a Parquet file) in ``root``."""
    monkeypatch.setattr(io, "BATCH_ROWS", batch_rows)
    monkeypatch.chdir(root)
    pq.write_table(sources.penguins(), root / "penguins.parquet")
    params = load_params(REPO / "params.yaml", ["data.source=penguins.parquet", *overrides])
    for stage in (ingest, augment, split):
        stage.run(params)
    return {"schema": json.loads(paths.SCHEMA.read_text()),
            "ingested": pq.read_table(paths.INGESTED), "augmented": pq.read_table(paths.AUGMENTED),
            **{name: pq.read_table(paths.split_path(name)) for name in paths.SPLITS}}


def test_batches_give_the_outputs_of_one_batch(tmp_path, monkeypatch):
    (tmp_path / "small").mkdir()
    (tmp_path / "one").mkdir()
    small = run_stages(tmp_path / "small", monkeypatch, 50)  # 344 rows: 7 batches
    assert pq.ParquetFile(tmp_path / "small" / paths.INGESTED).num_row_groups == 7
    assert pq.ParquetFile(tmp_path / "small" / paths.split_path("train")).num_row_groups > 1
    one = run_stages(tmp_path / "one", monkeypatch, 1 << 20)
    assert pq.ParquetFile(tmp_path / "one" / paths.INGESTED).num_row_groups == 1
    # means and standard deviations pooled over batches agree to rounding; all else exactly
    assert _approx(small["schema"], one["schema"])
    for name in ("ingested", "augmented", *paths.SPLITS):
        assert small[name].equals(one[name]), name


def _approx(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return a == b


def test_checks_count_over_every_batch(tmp_path, monkeypatch):
    """A count in a message is the whole table's, whatever the batch size."""
    table = sources.penguins()
    mass = [None if v is None else str(v) for v in table["body_mass_g"].to_pylist()]
    for row in (5, 150, 300):
        mass[row] = "heavy"
    table = table.set_column(table.column_names.index("body_mass_g"), "body_mass_g", pa.array(mass))
    pacsv.write_csv(table, tmp_path / "p.csv")
    params = load_params(REPO / "params.yaml", [f"data.source={tmp_path / 'p.csv'}"])
    messages = set()
    for batch_rows in (40, 1 << 20):
        monkeypatch.setattr(io, "BATCH_ROWS", batch_rows)
        with pytest.raises(UserError) as error:
            ingest.ingest(sources.scan_source(params.data.source), params.data, lambda table: None)
        messages.add(str(error.value))
    assert len(messages) == 1
    assert "3 values that are not, e.g. 'heavy'" in messages.pop()


def test_split_hash_is_fixed():
    """The split of a key must never change between versions: these values are the contract."""
    keys = pa.array(["", "a", "row1", "abcdefghijklmnop", "é"])
    assert split.splitmix64_unit(keys, "mtl").tolist() == [
        0.5561674254532789, 0.8223657339224573, 0.38793525455566735, 0.9612077090242194, 0.6243368362534092]
    assert split.splitmix64_unit(keys.slice(2), "mtl").tolist() == split.splitmix64_unit(keys, "mtl").tolist()[2:]
    assert split.blake2b_unit(keys, "mtl").tolist() == [
        0.7784629222770458, 0.6340498242095373, 0.931441301334844, 0.0447729419513412, 0.14620764576279324]
