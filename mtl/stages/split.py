"""split: the augmented table -> train/val/test Parquet files.

A row's split is a function of its source row's stable key alone (a salted hash mapped to
[0, 1)), so appending rows to the raw data never moves an existing row, and every augmented copy
lands in its source's split. Validation and test keep original rows only.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import Params, SplitConfig
from mtl.io import read_table, write_table
from mtl.stages.common import require_columns


def unit_hash(keys: pa.ChunkedArray, salt: str) -> np.ndarray:
    """Each key mapped to a number in [0, 1) by BLAKE2b, stable across runs and machines."""
    prefix = salt.encode() + b"\x00"
    return np.array([int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "big")
                     for k in keys.to_pylist()], dtype=np.float64) / 2.0**64


def assign(keys: pa.ChunkedArray, config: SplitConfig) -> np.ndarray:
    """The split name of each key: test below ``test``, val below ``test + val``, else train."""
    u = unit_hash(keys, config.salt)
    return np.where(u < config.test, "test", np.where(u < config.test + config.val, "val", "train"))


def run(params: Params) -> None:
    table = read_table(paths.AUGMENTED)
    require_columns(table, paths.AUGMENTED, params, reserved=True)
    which = assign(table[paths.SOURCE_ID], params.split)
    augmented = table[paths.AUGMENTED_FLAG].to_numpy(zero_copy_only=False)
    counts = {}
    for name in paths.SPLITS:
        keep = (which == name) & (~augmented if name != "train" else True)
        part = table.filter(pa.array(keep))
        write_table(part, paths.split_path(name))
        counts[name] = part.num_rows
    n_aug = int(pc.sum(table[paths.AUGMENTED_FLAG]).as_py() or 0)
    print("split: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()) + f" ({n_aug} augmented, in train)")
