"""ingest, augment and split on the real penguins data: ids, schema, leakage and split stability."""

import numpy as np
import pyarrow as pa
import pytest

from mtl import paths
from mtl.config import SplitConfig, load_params
from mtl.errors import UserError
from mtl.io import Scan, read_json, read_table
from mtl.sources import read_source
from mtl.stages import augment, ingest, split
from tests.helpers import REPO


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def ingested(params):
    return ingest.prepare(read_source("penguins"), params.data)


def test_ingest_keeps_rows_with_missing_labels(ingested):
    table, schema = ingested
    assert table.num_rows == 344
    assert schema["tasks"]["sex"]["n_missing"] == 11
    assert schema["tasks"]["sex"]["classes"] == ["female", "male"]
    assert schema["tasks"]["body_mass"]["n_missing"] == 2
    assert schema["tasks"]["species"]["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert schema["features"]["island"]["kind"] == "categorical"
    assert schema["features"]["bill_length_mm"]["kind"] == "numeric"
    assert schema["features"]["bill_length_mm"]["n_missing"] == 2
    assert set(schema["features"]) == {"island", "bill_length_mm", "bill_depth_mm",
                                       "flipper_length_mm", "year"}


def test_content_ids_do_not_depend_on_row_order(ingested):
    table, _ = ingested
    raw = read_source("penguins")
    reversed_ids = ingest.row_ids(raw.take(pa.array(np.arange(raw.num_rows)[::-1])), None)
    assert reversed_ids.to_pylist()[::-1] == table[paths.ID].to_pylist()


def test_split_is_stable_when_rows_are_appended():
    config = SplitConfig(val=0.2, test=0.2, salt="s")
    old = pa.chunked_array([pa.array([f"row{i}" for i in range(2000)])])
    new = pa.chunked_array([pa.array([f"row{i}" for i in range(2000)] + [f"new{i}" for i in range(500)])])
    before, after = split.assign(old, config), split.assign(new, config)
    assert (after[:2000] == before).all()
    shares = {name: float((before == name).mean()) for name in paths.SPLITS}
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    assert shares["val"] == pytest.approx(0.2, abs=0.03)
    assert (split.assign(old, SplitConfig(val=0.2, test=0.2, salt="other")) != before).any()


def run_stages(root, monkeypatch, *overrides: str) -> dict:
    """Run ingest, augment and split on penguins in ``root``; the tables each wrote, by stage and
    split, and the schema record."""
    monkeypatch.chdir(root)
    params = load_params(REPO / "params.yaml", ["data.source=penguins", *overrides])
    for stage in (ingest, augment, split):
        stage.run(params)
    return {"params": params, "schema": read_json(paths.SCHEMA),
            **{(stage, name): read_table(path(name)) for name in paths.SPLITS
               for stage, path in (("ingested", paths.ingested_path), ("augmented", paths.augmented_path),
                                   ("split", paths.split_path))}}


def test_ingest_writes_each_row_to_the_file_of_its_split(tmp_path, monkeypatch, ingested):
    out = run_stages(tmp_path, monkeypatch)
    table, _ = ingested
    which = split.assign(table[paths.ID], out["params"].split)
    for name in paths.SPLITS:
        part = out["ingested", name]
        assert part.drop_columns([paths.SOURCE_ID, paths.AUGMENTED_FLAG]).equals(
            table.filter(pa.array(which == name)))  # in source order
        assert part[paths.SOURCE_ID].equals(part[paths.ID])
        assert not any(part[paths.AUGMENTED_FLAG].to_pylist())
    assert out["schema"]["split"] == split.record(out["params"].split) | {
        "rows": {name: int((which == name).sum()) for name in paths.SPLITS}}


def test_augmented_rows_follow_their_source_and_stay_in_train(tmp_path, monkeypatch):
    out = run_stages(tmp_path, monkeypatch)
    train, augmented = out["ingested", "train"], out["augmented", "train"]
    copies = augmented.filter(augmented[paths.AUGMENTED_FLAG])
    assert copies.num_rows == out["params"].augment.copies * train.num_rows
    originals = dict(zip(train[paths.ID].to_pylist(), train["species"].to_pylist()))
    for source, species in zip(copies[paths.SOURCE_ID].to_pylist(), copies["species"].to_pylist()):
        assert originals[source] == species  # copies of training rows; class labels are the source's
    for name in ("val", "test"):  # passed through: the ingested files themselves
        assert (tmp_path / paths.augmented_path(name)).samefile(tmp_path / paths.ingested_path(name))


def test_interpolation_partners_are_training_rows_of_the_same_class(ingested, params):
    table, schema = ingested
    train = table.filter(pa.array(split.assign(table[paths.ID], params.split) == "train"))
    columns = [name for name, f in schema["features"].items() if f["kind"] == "numeric"]
    pool = augment._Pool.read(Scan.of(train), params, columns, len(columns))
    x = augment._matrix(table, columns)
    partner = pool.partners(table, x, np.random.default_rng(0).random(table.num_rows))
    labels = np.array(table[pool.label].to_pylist(), object)
    classes = {}  # the values of each training row -> its class
    for values, label in zip(np.nan_to_num(augment._matrix(train, columns), nan=-1.0).T,
                             train[pool.label].to_pylist()):
        classes.setdefault(tuple(values), set()).add(label)
    for i, label in enumerate(labels):
        if label is None:
            assert np.array_equal(partner[:, i], x[:, i], equal_nan=True)  # its own partner
        else:
            assert label in classes[tuple(np.nan_to_num(partner[:, i], nan=-1.0))]


def test_split_stage_writes_original_rows_only_to_val_and_test(tmp_path, monkeypatch, ingested):
    out = run_stages(tmp_path, monkeypatch)
    parts = {name: out["split", name] for name in paths.SPLITS}
    n_augmented = int(parts["train"][paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False).sum())
    assert n_augmented > 0
    assert sum(p.num_rows for p in parts.values()) == ingested[0].num_rows + n_augmented
    for name in ("val", "test"):
        assert not parts[name][paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False).any()
    ids = [set(parts[n][paths.SOURCE_ID].to_pylist()) for n in paths.SPLITS]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_split_refuses_rows_split_under_other_params(tmp_path, monkeypatch):
    """split (and augment) check the split params ingest recorded: run by hand after a change
    of split params, they say to re-run ingest rather than pass on the old splits."""
    out = run_stages(tmp_path, monkeypatch)
    changed = load_params(REPO / "params.yaml", ["data.source=penguins", "split.salt=other"])
    for stage in (augment, split):
        with pytest.raises(UserError, match=r"^split.salt: is 'other', but data/ingested was split "
                                            r"with 'mtl'; re-run ingest"):
            stage.run(changed)
    assert read_table(paths.split_path("train")).equals(out["split", "train"])  # left as it was


# -- a declared split (split.column) -----------------------------------------------------------------

def declared_config(**values) -> SplitConfig:
    return SplitConfig(column="fold", values=values or {"train": ["train"], "val": ["valid", "dev"],
                                                          "test": ["test"]}, val=0.2, salt="s")


def test_a_declared_split_is_honoured_and_stable_when_rows_are_appended():
    rng = np.random.default_rng(0)
    folds = rng.choice(["train", "valid", "dev", "test"], 2500)
    keys = pa.chunked_array([pa.array([f"row{i}" for i in range(2500)])])
    which = split.assign(keys, declared_config(), pa.chunked_array([pa.array(folds)]))
    expected = np.select([folds == "train", folds == "test"], ["train", "test"], "val")
    assert (which == expected).all()  # the column, not the hash: split.val and split.test unused
    before = split.assign(keys[:2000], declared_config(), pa.chunked_array([pa.array(folds[:2000])]))
    assert (before == which[:2000]).all()  # appending rows moves no old row


def test_without_declared_val_rows_val_is_drawn_from_the_train_rows_by_hash():
    config = declared_config(train=["train"], test=["test"])
    folds = np.array(["train", "test"] * 2000)
    keys = pa.chunked_array([pa.array([f"row{i}" for i in range(4000)])])
    which = split.assign(keys, config, pa.chunked_array([pa.array(folds)]))
    assert (which[folds == "test"] == "test").all()  # a declared test row never moves
    assert float((which[folds == "train"] == "val").mean()) == pytest.approx(0.2, abs=0.03)
    assert ((which == "val") == ((split.unit(keys, config) < 0.2) & (folds == "train"))).all()
    appended = split.assign(keys[:3000], config, pa.chunked_array([pa.array(folds[:3000])]))
    assert (appended == which[:3000]).all()


@pytest.mark.parametrize(("fold", "message"), [
    (None, "split.column: column 'fold' has a row without a value"),
    ("validation", ("split.column: column 'fold' holds 'validation', which split.values does not "
                    "name (train: train; val: valid, dev; test: test)")),
])
def test_a_row_without_a_declared_split_or_with_an_unknown_one_is_an_error(fold, message):
    keys = pa.chunked_array([pa.array(["a", "b", "c", "d"])])
    folds = pa.chunked_array([pa.array(["train", fold, "other", "test"])])
    with pytest.raises(UserError) as caught:
        split.assign(keys, declared_config(), folds)
    assert str(caught.value).startswith(message)  # the first bad row, not 'other'


@pytest.fixture(scope="module")
def by_year():
    """Penguins split by year, as a frozen split: 2007 train, 2008 val, 2009 test."""
    params = load_params(REPO / "params.yaml", ["split.column=year",
                                                 "split.values={train: [2007], val: [2008], test: [2009]}"])
    return params, *ingest.prepare(read_source("penguins"), params.data, params.split.column)


def test_ingest_carries_the_split_column_and_never_as_a_feature(by_year):
    params, table, schema = by_year
    assert "year" not in schema["features"] and "year" in table.column_names
    assert set(table["year"].to_pylist()) == {"2007", "2008", "2009"}
    _, hashed_schema = ingest.prepare(read_source("penguins"), params.data)
    assert "year" in hashed_schema["features"]  # without split.column it is a feature


def test_augment_and_split_follow_the_declared_column(tmp_path, monkeypatch, by_year):
    params, table, _ = by_year
    out = run_stages(tmp_path, monkeypatch, "split.column=year",
                     "split.values={train: [2007], val: [2008], test: [2009]}")
    parts = {name: out["split", name] for name in paths.SPLITS}
    flag = parts["train"][paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False)
    n_2007 = table["year"].to_pylist().count("2007")
    assert flag.sum() == params.augment.copies * n_2007  # copies of declared train rows only
    assert {name: set(p["year"].to_pylist()) for name, p in parts.items()} == {
        "train": {"2007"}, "val": {"2008"}, "test": {"2009"}}
    assert parts["train"].num_rows == n_2007 + flag.sum()
    for name in ("val", "test"):
        assert not any(parts[name][paths.AUGMENTED_FLAG].to_pylist())


def test_pandas_polars_and_duckdb_read_the_splits(tmp_path, monkeypatch):
    """The splits are plain Parquet files (hard links or not): the readers users reach for agree
    with pyarrow on every row and column."""
    import duckdb
    import pandas as pd
    import polars as pl

    out = run_stages(tmp_path, monkeypatch, "augment.copies=0")
    for name in paths.SPLITS:
        path, table = str(tmp_path / paths.split_path(name)), out["split", name]
        assert pd.read_parquet(path).equals(table.to_pandas())
        assert pl.read_parquet(path).to_arrow().equals(pl.from_arrow(table).to_arrow())
        rows = duckdb.sql(f"SELECT {paths.ID}, species FROM read_parquet('{path}')").fetchall()
        assert rows == list(zip(table[paths.ID].to_pylist(), table["species"].to_pylist()))
