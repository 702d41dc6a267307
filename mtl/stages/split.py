"""split: the augmented splits -> data/split/{train,val,test}.parquet, checked and passed through.

A row's split is a function of its source row alone: by default of its stable key (a salted
hash mapped to [0, 1)); with ``split.column``, of the value that column declares (a frozen or
official split), val optionally drawn by hash from the declared train rows. So appending rows to
the raw data never moves an existing row, and every augmented copy (which carries its source's
key and declared value) lands in its source's split. Validation and test keep original rows only.

ingest assigns the splits: it writes each row to its split's file as it converts the source
(``Partition``), so the rows are read and written once, where a separate pass here read and
wrote them all again; it records the ``split`` params in schema.json. augment adds copies to
train only. This stage checks the result against the params and links the files.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import Params, SplitConfig
from mtl.errors import UserError
from mtl.io import (
    RowGroupWriter,
    atomic_paths,
    link_or_copy,
    read_json,
    remove_leftovers,
    scan_table,
)
from mtl.stages.common import require_columns
from mtl.stages.progress import Rows

GAMMA = np.uint64(0x9E3779B97F4A7C15)
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of h + γ: a bijection of 64-bit words that spreads every input bit."""
    h = h + GAMMA
    h = (h ^ (h >> np.uint64(30))) * M1
    h = (h ^ (h >> np.uint64(27))) * M2
    return h ^ (h >> np.uint64(31))


def blake2b_unit(keys: pa.Array | pa.ChunkedArray, salt: str) -> np.ndarray:
    """Each key mapped to [0, 1) by BLAKE2b of salt, a zero byte and the key (the first 8 bytes
    of the digest, big-endian, / 2^64): one Python call per key, about 1.2 µs."""
    prefix = salt.encode() + b"\x00"
    return np.array([int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "big")
                     for k in keys.to_pylist()], dtype=np.float64) / 2.0**64


def splitmix64_unit(keys: pa.Array | pa.ChunkedArray, salt: str) -> np.ndarray:
    """Each key mapped to a number in [0, 1), the same on every run, machine and version.

    h = mix(s ⊕ n), with s the first 8 bytes of BLAKE2b(salt) and n the key's length in UTF-8
    bytes; then h = mix(h ⊕ w) for each 8-byte little-endian word w of the key (the last one
    zero-padded); the result is h's top 53 bits / 2^53. Vectorised with numpy: about 0.1 µs a key.
    """
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = keys.cast(pa.large_binary())
    _, offsets, data = keys.buffers()
    offsets = np.frombuffer(offsets, np.int64)[keys.offset:keys.offset + len(keys) + 1]
    data = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(8, np.uint8)])
    words = np.ndarray(len(data) - 7, dtype="<u8", buffer=data, strides=(1,))  # the 8 bytes at each offset
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    seed = np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little"))
    h = _mix(seed ^ lengths.astype(np.uint64))
    for j in range(0, int(lengths.max(initial=0)), 8):
        rest = np.clip(lengths - j, 0, 8).astype(np.uint64)
        mask = np.where(rest == 8, ~np.uint64(0), (np.uint64(1) << (rest * np.uint64(8))) - np.uint64(1))
        h = np.where(rest > 0, _mix(h ^ (words[np.minimum(starts + j, len(words) - 1)] & mask)), h)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


def assign(keys: pa.Array | pa.ChunkedArray, config: SplitConfig,
           declared: pa.Array | pa.ChunkedArray | None = None) -> np.ndarray:
    """The split name of each row. Hash split: test where the key's number is below ``test``,
    val below ``test + val``, else train. Declared split (``config.column``, whose values are
    ``declared``): the split that ``config.values`` names for the row's value; without a ``val``
    entry there, a declared train row goes to val where its key's number is below ``val``."""
    if config.column is None:
        u = unit(keys, config)
        return np.where(u < config.test, "test", np.where(u < config.test + config.val, "val", "train"))
    which = _declared(declared, config)
    if "val" not in config.values and config.val > 0:
        which = np.where((which == "train") & (unit(keys, config) < config.val), "val", which)
    return which


def unit(keys: pa.Array | pa.ChunkedArray, config: SplitConfig) -> np.ndarray:
    """Each key's number in [0, 1) by ``config.hash`` and ``config.salt``."""
    return (splitmix64_unit if config.hash == "splitmix64" else blake2b_unit)(keys, config.salt)


def _declared(column: pa.Array | pa.ChunkedArray, config: SplitConfig) -> np.ndarray:
    """The split that ``config.values`` names for each value of ``column``; one line naming the
    column and the value when a row has none, or one that ``config.values`` does not list."""
    names = [(value, name) for name, values in config.values.items() for value in values]
    index = pc.index_in(column, value_set=pa.array([value for value, _ in names], pa.string()))
    if index.null_count:
        first = column.filter(pc.is_null(index))[0].as_py()  # the first bad row, in row order
        listed = "; ".join(f"{name}: {', '.join(values)}" for name, values in config.values.items())
        if first is None:
            raise UserError(f"split.column: column '{config.column}' has a row without a value; "
                            f"give every row its split ({listed})")
        raise UserError(f"split.column: column '{config.column}' holds '{first}', which "
                        f"split.values does not name ({listed})")
    return np.array([name for _, name in names])[index.to_numpy(zero_copy_only=False)]


def record(config: SplitConfig) -> dict:
    """What ``assign`` depends on, as ingest records it in schema.json (``split``)."""
    return config.model_dump(mode="json")


def check_record(schema: object, config: SplitConfig) -> None:
    """Fail when the rows were split (by ingest) under other ``split`` params than ``config``:
    the first key that differs, and its two values."""
    was = schema.get("split") if isinstance(schema, dict) else None
    if not isinstance(was, dict):
        raise UserError(f"{paths.SCHEMA}: has no split record (written by an older version; re-run ingest)")
    for key, now in record(config).items():
        if was.get(key) != now:
            raise UserError(f"split.{key}: is {now!r}, but {paths.INGESTED_DIR} was split with "
                            f"{was.get(key)!r}; re-run ingest (split params are ingest's)")


def with_source(table: pa.Table, augmented: bool) -> pa.Table:
    """``table`` (whose ``_id`` is its source's id) with the source id and the augmented flag."""
    n = table.num_rows
    return table.append_column(paths.SOURCE_ID, table[paths.ID]).append_column(
        paths.AUGMENTED_FLAG, pa.array(np.full(n, augmented)))


class Partition:
    """The Parquet files of the splits, each row of the tables given to ``write`` appended to
    the file of its split (``assign``), with the source columns (an original row is its own
    source): ingest's output, written as it converts, so the rows are read and written once."""

    def __init__(self, files: dict[str, Path], config: SplitConfig):
        self.files, self.config = files, config
        self.writers: dict[str, RowGroupWriter] = {}
        self.counts = dict.fromkeys(files, 0)

    def write(self, table: pa.Table) -> None:
        table = with_source(table, False)
        declared = table[self.config.column] if self.config.column else None
        keys = table[paths.ID]  # a missing id is refused once the whole table is read
        which = assign(keys.fill_null("") if keys.null_count else keys, self.config, declared)
        self.writers = self.writers or {name: RowGroupWriter(path, table.schema)
                                        for name, path in self.files.items()}
        for name, writer in self.writers.items():
            part = table.filter(which == name)
            self.counts[name] += part.num_rows
            writer.write(part)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def run(params: Params) -> None:
    """Check the augmented splits (every split a later stage needs has rows, every task a
    labelled training row, only train holds copies) and pass each file through (a hard link)."""
    outputs = [paths.split_path(name) for name in paths.SPLITS]
    remove_leftovers(*outputs)
    check_record(read_json(paths.SCHEMA), params.split)
    targets = [c for task in params.data.tasks.values() for c in task.columns]
    kinds = [t.target for t in params.data.tasks.values() if t.kind in ("binary", "multiclass")]
    counts = dict.fromkeys(paths.SPLITS, 0)
    labelled = {name: dict.fromkeys(targets, 0) for name in paths.SPLITS}  # rows with a label
    classes = {name: {c: set() for c in kinds} for name in paths.SPLITS}
    n_aug = 0
    with Rows("split") as progress:
        for name in paths.SPLITS:
            path = paths.augmented_path(name)
            scan = scan_table(path)
            require_columns(scan.schema, path, params, reserved=True)
            for batch in scan.batches([*targets, paths.AUGMENTED_FLAG]):
                augmented = int(pc.sum(batch.column(paths.AUGMENTED_FLAG)).as_py() or 0)
                if augmented and name != "train":
                    raise UserError(f"{path}: holds augmented rows, which only train may (re-run augment)")
                n_aug += augmented
                counts[name] += batch.num_rows
                for c in targets:
                    labelled[name][c] += batch.num_rows - batch.column(c).null_count
                for c in kinds:
                    classes[name][c].update(pc.unique(batch.column(c)).to_pylist())
                progress.add(batch.num_rows)
        check(counts, labelled, classes, params)
    with atomic_paths(*outputs) as tmps:
        for name, tmp in zip(paths.SPLITS, tmps):
            link_or_copy(paths.augmented_path(name), tmp)
    print("split: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()) + f" ({n_aug} augmented, in train)")


def check(counts: dict[str, int], labelled: dict[str, dict[str, int]], classes: dict[str, dict[str, set]],
          params: Params) -> None:
    """Fail when a split that later stages need is empty or a task has no labelled training row;
    warn (stderr) about classes that only validation or test rows have."""
    sizes = ", ".join(f"{name} {n}" for name, n in counts.items())
    config = params.split
    for name in ("train", "test", "val") if config.val > 0 else ("train", "test"):
        if counts[name] == 0 and config.column is not None and name in config.values:
            hint = ("; or leave val out of split.values to draw split.val of the train rows"
                    if name == "val" else "")
            raise UserError(f"split: no row falls in {name} ({sizes} rows): no row of column "
                            f"'{config.column}' holds {' or '.join(config.values[name])}{hint}")
        if counts[name] == 0:
            raise UserError(f"split: no row falls in {name} ({sizes} rows); add rows or change "
                            "split.val and split.test")
    for name, task in params.data.tasks.items():
        if not any(labelled["train"][c] > 0 for c in task.columns):
            raise UserError(f"data.tasks.{name}: no training row has a label (rows: {sizes}); "
                            "add labelled rows or change split.salt")
        if task.kind not in ("binary", "multiclass"):
            continue
        seen = classes["train"][task.target]
        for split_name in ("val", "test"):
            unseen = sorted(classes[split_name][task.target] - seen - {None})
            if unseen:
                print(f"warning: data.tasks.{name}: {split_name} holds class{'es' if len(unseen) > 1 else ''} "
                      f"{', '.join(map(repr, unseen))} that no training row has; the model cannot learn "
                      f"{'them' if len(unseen) > 1 else 'it'}", file=sys.stderr)
