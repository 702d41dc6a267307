"""ingest, augment and split on the real penguins data: ids, schema, leakage and split stability."""

import numpy as np
import pyarrow as pa
import pytest

from mtl import paths
from mtl.config import SplitConfig, load_params
from mtl.io import read_table, write_table
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


def test_augmented_rows_follow_their_source_and_stay_in_train(ingested, params):
    table, schema = ingested
    out = augment.augment(table, schema, params)
    flag = out[paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False)
    assert flag.sum() == params.augment.copies * (split.assign(table[paths.ID], params.split) == "train").sum()
    which = split.assign(out[paths.SOURCE_ID], params.split)
    assert set(which[flag]) == {"train"}
    originals = dict(zip(table[paths.ID].to_pylist(), table["species"].to_pylist()))
    for source, species in zip(out[paths.SOURCE_ID].filter(pa.array(flag)).to_pylist(),
                               out["species"].filter(pa.array(flag)).to_pylist()):
        assert originals[source] == species  # class labels are the source row's


def test_interpolation_partners_are_training_rows_of_the_same_class():
    classes = np.array(["a", "b", "a", "b", "a", None, "b"], dtype=object)
    pool = np.array([0, 1, 2, 3, 5])  # rows 4 and 6 are validation/test rows
    partner = augment._partners(pool, classes, pool, np.random.default_rng(0))
    for src, p in zip(pool, partner):
        assert p in pool
        assert classes[p] == classes[src] or (classes[src] is None and p == src)


def test_split_stage_writes_original_rows_only_to_val_and_test(tmp_path, monkeypatch, ingested, params):
    monkeypatch.chdir(tmp_path)
    table, schema = ingested
    write_table(augment.augment(table, schema, params), paths.AUGMENTED)
    split.run(params)
    parts = {name: read_table(paths.split_path(name)) for name in paths.SPLITS}
    n_augmented = int(parts["train"][paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False).sum())
    assert n_augmented > 0
    assert sum(p.num_rows for p in parts.values()) == table.num_rows + n_augmented
    for name in ("val", "test"):
        assert not parts[name][paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False).any()
    ids = [set(parts[n][paths.SOURCE_ID].to_pylist()) for n in paths.SPLITS]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
