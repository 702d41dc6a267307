"""Streaming preprocessing fit (``Moments``, fitting on chunks) and the memory-mapped split
store (``encode_split``, ``open_split``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from mtl.engine.encoders import Moments, Preprocessor, TabularPreprocessor
from mtl.engine.store import encode_split, open_split
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData
from tests.helpers import env
from tests.test_faults import tmpfs

FEATURES = {"x": {"kind": "numeric", "n_missing": 3}, "z": {"kind": "numeric", "n_missing": 0},
            "color": {"kind": "categorical", "n_missing": 2}, "note": {"kind": "text", "n_missing": 1}}
HASHING = {"buckets": 512, "max_tokens": 64}
TASKS = [Task("flag", "binary", "flag", classes=("no", "yes")),
         Task("species", "multiclass", "species", classes=("a", "b", "c")),
         Task("size", "regression", "size", mean=1.5, std=2.0),
         Task("tags", "multilabel", ("t1", "t2"), classes=("t1", "t2"))]


def split_table(n: int = 30) -> pa.Table:
    """Rows whose texts are short in the first third, long in the second, medium in the last."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    x[[2, 11, 25]] = np.nan
    size = rng.normal(size=n)
    size[[0, 13]] = np.nan
    words = lambda k: " ".join(f"w{j}" for j in range(k))
    notes = [words(1 + i % 2) if i < n // 3 else words(30 + i % 5) if i < 2 * n // 3 else words(5 + i % 3)
             for i in range(n)]
    notes[4] = None
    return pa.table({
        "x": x, "z": rng.integers(0, 5, n).astype("float64"),
        "color": [None if i in (1, 17) else ["red", "green", "blue", "teal"][i % 4] for i in range(n)],
        "note": notes,
        "flag": [None if i % 7 == 3 else ["no", "yes"][i % 2] for i in range(n)],
        "species": [None if i % 9 == 5 else "abc"[i % 3] for i in range(n)],
        "size": size,
        "t1": [None if i % 4 == 0 else float(i % 2) for i in range(n)],
        "t2": [float(i % 3 == 0) for i in range(n)],
    })


def thirds(table: pa.Table) -> list[pa.RecordBatch]:
    n = table.num_rows // 3
    return [table.slice(start, n).combine_chunks().to_batches()[0] for start in (0, n, 2 * n)]


def old_statistics(values: np.ndarray) -> tuple[float, float]:
    """The mean and standard deviation ``TabularPreprocessor.fit`` computed on a whole table."""
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if len(finite) else 0.0
    std = float(finite.std()) if len(finite) > 1 else 0.0
    return mean, std if std > 0 else 1.0


def test_moments_match_numpy_on_values_with_nan_and_inf():
    rng = np.random.default_rng(1)
    values = rng.normal(loc=1e3, scale=7.0, size=10_000)
    values[rng.integers(0, len(values), 300)] = np.nan
    values[rng.integers(0, len(values), 50)] = np.inf
    values[rng.integers(0, len(values), 50)] = -np.inf
    finite = values[np.isfinite(values)]
    for pieces in (1, 3, 17):
        moments = Moments()
        for piece in np.array_split(values, pieces):
            moments.update(piece)
        assert moments.count == len(finite)
        assert moments.mean == pytest.approx(finite.mean(), rel=1e-12)
        assert moments.std == pytest.approx(finite.std(), rel=1e-12)
    empty = Moments()
    empty.update(np.array([np.nan, np.inf]))
    assert (empty.count, empty.mean, empty.std) == (0, 0.0, 0.0)


def test_tabular_fit_on_one_table_matches_the_whole_table_statistics():
    rng = np.random.default_rng(2)
    columns = {"normal": rng.normal(3.0, 2.0, 500), "none": np.full(500, np.nan),
               "one": np.r_[5.0, np.full(499, np.nan)], "constant": np.full(500, 4.0)}
    columns["normal"][::7] = np.nan
    columns["normal"][::11] = np.inf
    table = pa.table(columns | {"c": rng.choice(["x", "y", "z"], 500)})
    prep = TabularPreprocessor.fit(table, list(columns), ["c"], indicators=[])
    expected = [old_statistics(v) for v in columns.values()]
    assert prep.means == pytest.approx([m for m, _ in expected], rel=1e-12)
    assert prep.stds == pytest.approx([s for _, s in expected], rel=1e-12)
    assert prep.means[1:] == (0.0, 5.0, 4.0) and prep.stds[1:] == (1.0, 1.0, 1.0)
    assert prep.vocabularies == (("x", "y", "z"),)


def test_fit_on_three_chunks_gives_the_whole_table_preprocessor():
    table = split_table()
    whole = Preprocessor.fit(table, FEATURES, hashing=HASHING)
    streamed = Preprocessor.fit(iter(thirds(table)), FEATURES, hashing=HASHING)  # one pass
    assert streamed.tabular.vocabularies == whole.tabular.vocabularies == (("blue", "green", "red", "teal"),)
    assert streamed.tabular.means == pytest.approx(whole.tabular.means, rel=1e-12)
    assert streamed.tabular.stds == pytest.approx(whole.tabular.stds, rel=1e-12)
    assert streamed.tabular.indicators == ("x",) and streamed.text == whole.text


def test_encoded_split_equals_the_whole_table_encoding(tmp_path):
    table = split_table()
    prep = Preprocessor.fit(table, FEATURES, hashing=HASHING)
    chunks = thirds(table)
    widths = [prep.transform(pa.Table.from_batches([c]))["text"].shape[1] for c in chunks]
    assert len(set(widths)) == 3  # the text ids are padded to a different width in each chunk
    encode_split(iter(chunks), prep, TASKS, tmp_path / "train")
    stored, expected = open_split(tmp_path / "train"), TaskData.from_table(table, prep, TASKS)
    assert len(stored) == table.num_rows
    width = stored.inputs["text"].shape[1]
    assert width == max(widths)
    expected.inputs["text"] = F.pad(expected.inputs["text"], (0, width - expected.inputs["text"].shape[1]))
    for group in ("inputs", "targets", "masks"):
        got, want = getattr(stored, group), getattr(expected, group)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (group, key)
    assert not [p for p in tmp_path.iterdir() if p.name != "train"]
    assert {p.name for p in (tmp_path / "train").iterdir()} == {"manifest.json"} | {
        f"{g}-{j}.npy" for j, g in enumerate(["inputs"] * 3 + ["targets"] * 4 + ["masks"] * 4)}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_opened_tensors_are_mapped_from_the_files_with_their_dtypes(tmp_path):
    table = split_table()
    prep = Preprocessor.fit(table, FEATURES, hashing=HASHING)
    encode_split(thirds(table), prep, TASKS, tmp_path / "train")
    data = open_split(tmp_path / "train")
    dtypes = {"num": torch.float32, "cat": torch.int64, "text": torch.int64, "flag": torch.float32,
              "species": torch.int64, "size": torch.float32, "tags": torch.float32}
    assert {k: v.dtype for k, v in (data.inputs | data.targets).items()} == dtypes
    assert all(m.dtype == torch.bool for m in data.masks.values())
    assert data.masks["tags"].shape == (30, 2)
    mapped: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            mapped.setdefault(fields[5], []).append((start, end))
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["rows"] == 30 and len(manifest["tensors"]) == 11
    for entry in manifest["tensors"]:
        tensor = getattr(data, entry["group"])[entry["key"]]
        assert list(tensor.shape) == entry["shape"] and str(tensor.dtype) == f"torch.{entry['dtype']}"
        ranges = mapped[str(tmp_path / "train" / entry["file"])]
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in ranges)
    data.inputs["num"][0] = 99.0  # copy-on-write: the file keeps its values
    assert open_split(tmp_path / "train").inputs["num"][0, 0] != 99.0


def test_a_failing_chunk_iterator_leaves_nothing_behind(tmp_path):
    table = split_table()
    prep = Preprocessor.fit(table, FEATURES, hashing=HASHING)

    def chunks():
        yield from thirds(table)[:2]
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        encode_split(chunks(), prep, TASKS, tmp_path / "train")
    assert os.listdir(tmp_path) == []


def test_a_split_made_meanwhile_by_another_process_is_kept(tmp_path):
    table = split_table()
    prep = Preprocessor.fit(table, FEATURES, hashing=HASHING)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "theirs").write_text("kept")

    def chunks():
        yield from thirds(table)

    encode_split(chunks(), prep, TASKS, tmp_path / "train")
    assert os.listdir(tmp_path) == ["train"] and os.listdir(tmp_path / "train") == ["theirs"]


FULL_DISK = """
import sys
from pathlib import Path
import numpy as np, pyarrow as pa
from mtl.engine.encoders import Preprocessor
from mtl.engine.store import encode_split
from mtl.engine.tasks import Task

n = 100_000  # the parts take about 0.9 MB, the joined arrays as much again
table = pa.table({"x": np.arange(n, dtype="float64"), "size": np.ones(n)})
prep = Preprocessor.fit(table, {"x": {"kind": "numeric", "n_missing": 0}})
try:
    encode_split([table], prep, [Task("size", "regression", "size")], Path(sys.argv[1]) / "train")
except OSError as exc:
    print(exc.strerror)
"""


def test_a_full_disk_while_joining_the_parts_is_an_os_error_not_sigbus(tmp_path):
    """The joined arrays are written through a memory map: a page the disk has no room for would
    kill the process with SIGBUS; their blocks are reserved first, so it is ENOSPC instead."""
    with tmpfs(tmp_path / "disk", "1200k") as disk:  # room for the parts, not for the joined arrays
        result = subprocess.run([sys.executable, "-c", FULL_DISK, str(disk)], env=env(),
                                capture_output=True, text=True, check=False)
        assert (result.returncode, result.stdout) == (0, "No space left on device\n"), result.stderr
        assert list(disk.iterdir()) == []
