"""ingest, augment and split stream their tables in batches: the outputs must not depend on the
batch size (``mtl.io.BATCH_ROWS``), and the Parquet files are written in row groups."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtl import io, paths, sources
from mtl.config import SplitConfig, load_params
from mtl.errors import UserError
from mtl.stages import augment, ingest, split
from tests.helpers import REPO, env


def run_stages(root, monkeypatch, batch_rows: int, *overrides: str) -> dict:
    """Run ingest, augment and split on penguins (read from a Parquet file) in ``root``."""
    monkeypatch.setattr(io, "BATCH_ROWS", batch_rows)
    monkeypatch.chdir(root)
    pq.write_table(sources.penguins(), root / "penguins.parquet")
    params = load_params(REPO / "params.yaml", ["data.source=penguins.parquet", *overrides])
    for stage in (ingest, augment, split):
        stage.run(params)
    return {"schema": json.loads(paths.SCHEMA.read_text()),
            **{f"ingested-{name}": pq.read_table(paths.ingested_path(name)) for name in paths.SPLITS},
            "augmented": pq.read_table(paths.augmented_path("train")),
            **{name: pq.read_table(paths.split_path(name)) for name in paths.SPLITS}}


def test_batches_give_the_outputs_of_one_batch(tmp_path, monkeypatch):
    (tmp_path / "small").mkdir()
    (tmp_path / "one").mkdir()
    small = run_stages(tmp_path / "small", monkeypatch, 50)  # 344 rows: 7 batches
    # 227 training rows of 344, written when at least 50 have come: 4 row groups
    assert pq.ParquetFile(tmp_path / "small" / paths.ingested_path("train")).num_row_groups == 4
    assert pq.ParquetFile(tmp_path / "small" / paths.split_path("train")).num_row_groups > 4
    one = run_stages(tmp_path / "one", monkeypatch, 1 << 20)
    assert pq.ParquetFile(tmp_path / "one" / paths.ingested_path("train")).num_row_groups == 1
    # means and standard deviations pooled over batches agree to rounding; all else exactly
    assert _approx(small["schema"], one["schema"])
    for name in ("ingested-train", "ingested-val", "ingested-test", "val", "test"):
        assert small[name].equals(one[name]), name
    for name in ("augmented", "train"):  # the same rows; each batch's copies follow it
        assert small[name].sort_by(paths.ID).equals(one[name].sort_by(paths.ID)), name


def test_augment_without_copies_passes_the_ingested_files_through(tmp_path, monkeypatch):
    """copies 0: augment and split write nothing new (the same files)."""
    out = run_stages(tmp_path, monkeypatch, 100, "augment.copies=0")
    for name in paths.SPLITS:
        assert (tmp_path / paths.augmented_path(name)).samefile(tmp_path / paths.ingested_path(name))
        assert (tmp_path / paths.split_path(name)).samefile(tmp_path / paths.ingested_path(name))
        assert out[name][paths.SOURCE_ID].equals(out[name][paths.ID])
        assert not any(out[name][paths.AUGMENTED_FLAG].to_pylist())


def test_augment_draws_partners_from_a_bounded_pool_of_training_rows(tmp_path, monkeypatch):
    """With a pool of one row (the training row whose key hashes smallest), copies of its class
    move towards it and copies of other classes keep their source's values (noise off)."""
    monkeypatch.setattr(augment, "POOL_ROWS", 1)
    out = run_stages(tmp_path, monkeypatch, 50, "augment.noise=0", "augment.interpolate=1")
    train = out["ingested-train"]
    copies = out["augmented"].filter(out["augmented"][paths.AUGMENTED_FLAG])
    assert copies[paths.SOURCE_ID].to_pylist() == train[paths.ID].to_pylist()  # one copy each, in order
    assert copies[paths.ID].to_pylist() == [f"{i}#aug0" for i in train[paths.ID].to_pylist()]
    floats = [f.name for f in train.schema if pa.types.is_floating(f.type)]
    x, y = (np.array([t[c].to_numpy() for c in floats]) for t in (train, copies))
    label = np.array(train["species"].to_pylist(), object)
    keys = np.where(label != None, split.splitmix64_unit(train[paths.ID], "augment:0"), 2.0)
    partner = keys.argmin()
    moved = label == label[partner]
    assert moved.sum() > 1 and (~moved).sum() > 1
    np.testing.assert_array_equal(y[:, ~moved], x[:, ~moved])
    towards = x[:, [partner]] - x[:, moved]
    lam = (y[:, moved] - x[:, moved]) / np.where(towards == 0, np.nan, towards)
    lam = lam[:, ~np.isnan(lam).all(axis=0)]  # not the partner itself
    assert np.nanmax(lam, axis=0) == pytest.approx(np.nanmin(lam, axis=0))  # one λ a row, every column


def test_a_project_keeps_its_splits():
    """Penguins under the default params (row-content ids, ``split.hash: blake2b``): the first
    rows' ids and splits, as every earlier version assigned them."""
    params = load_params(REPO / "params.yaml", ["data.source=penguins"])
    assert params.split.hash == SplitConfig().hash == "blake2b"  # a params file without the key too
    table, _ = ingest.prepare(sources.penguins(), params.data, params.split.column)
    ids = table[paths.ID].slice(0, 10)
    assert ids.to_pylist() == ["8c21d60e84fb7cc7", "812faa6daf07621c", "12183e9df631f560",
                               "46d601b2e7f8a411", "72b6c7cf118a863d", "6798b758f91bdad1",
                               "c8f4341250de5022", "77781245728c19a6", "6c70deb2ed58fbd5",
                               "452dc51951e52af3"]
    assert split.assign(ids, params.split).tolist() == [
        "train", "val", "train", "test", "train", "val", "val", "val", "train", "train"]


def test_a_csv_file_is_read_in_batches_of_batch_rows(tmp_path, monkeypatch):
    """pyarrow reads a CSV file in blocks of 1 MB (here some 20,000 rows); the stages get them
    regrouped, since each batch costs them a few calls per column."""
    monkeypatch.setattr(io, "BATCH_ROWS", 50_000)
    pacsv.write_csv(pa.concat_tables([sources.penguins()] * 300), tmp_path / "p.csv")  # 103,200 rows
    assert [b.num_rows for b in io.scan_table(tmp_path / "p.csv").batches()] == [50_000, 50_000, 3_200]


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


@pytest.mark.parametrize(("hash_", "warned"), [("blake2b", True), ("splitmix64", False)])
def test_ingest_points_a_large_table_on_blake2b_to_the_vectorised_hash(tmp_path, monkeypatch, capsys,
                                                                       hash_, warned):
    monkeypatch.setattr(ingest, "SLOW_HASH_ROWS", 344)  # penguins' rows: "large" here
    run_stages(tmp_path, monkeypatch, 1 << 20, f"split.hash={hash_}")
    err = capsys.readouterr().err
    assert ("warning: split.hash: blake2b hashes one key at a time" in err) == warned, err
    assert "split.hash: splitmix64 before its first run" in err or not warned


@pytest.mark.parametrize(("pool", "expected"), [(None, "jemalloc"), ("system", "system")])
def test_the_data_stages_use_jemalloc_unless_the_user_names_a_pool(pool, expected):
    """mtl.io sets Arrow's pool (its default, mimalloc, spends twice the system time on these
    stages); an ARROW_DEFAULT_MEMORY_POOL the user sets wins."""
    environment = {k: v for k, v in env().items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    environment |= {"ARROW_DEFAULT_MEMORY_POOL": pool} if pool else {}
    code = "import pyarrow, mtl.io; print(pyarrow.default_memory_pool().backend_name)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected
