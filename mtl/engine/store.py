"""A split encoded once into tensors on disk, for training on more rows than fit in memory.

``encode_split`` turns a split, chunk by chunk, into one ``.npy`` file per tensor (the inputs,
targets and masks of ``TaskData``); ``open_split`` memory-maps them back as a ``TaskData``.
One contiguous array per tensor means a random batch is a single gather that torch does directly
on the mapped file, and the data is held by the OS page cache, not the process heap: memory
stays about one chunk while encoding, and the kernel pages rows in and out while training.

The directory holds ``manifest.json``: the number of rows and, per tensor, its group (inputs,
targets or masks), key, dtype, shape and file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import TaskData
from mtl.io import temp_dir

GROUPS = ("inputs", "targets", "masks")
MANIFEST = "manifest.json"


def encode_split(chunks: Iterable[pa.Table | pa.RecordBatch], preprocessor: Preprocessor,
                 tasks: Sequence[Task], directory: Path) -> None:
    """Encode ``chunks`` with ``TaskData.from_table`` into ``directory``. A tensor whose later
    dimensions vary between chunks (the hashed text ids, as wide as a chunk's longest row) is
    padded with 0 to the widest. The directory appears whole or not at all; if another process
    made it meanwhile, that one is kept."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, directory.name)
    try:
        _encode(chunks, preprocessor, tasks, tmp)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not directory.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode(chunks: Iterable[pa.Table | pa.RecordBatch], preprocessor: Preprocessor,
            tasks: Sequence[Task], out: Path) -> None:
    """Write each chunk's tensors as ``part-<tensor>-<chunk>.npy``, then join them."""
    tensors: list[dict] = []  # group, key, dtype, shape (rows, then the widest over chunks), file
    counts: list[int] = []  # rows per chunk
    for i, chunk in enumerate(chunks):
        table = pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk
        data = TaskData.from_table(table, preprocessor, tasks)
        arrays = [(group, key, tensor.numpy()) for group in GROUPS
                  for key, tensor in getattr(data, group).items()]
        if not tensors:
            tensors = [{"group": group, "key": key, "dtype": array.dtype.name,
                        "shape": [0, *array.shape[1:]], "file": f"{group}-{j}.npy"}
                       for j, (group, key, array) in enumerate(arrays)]
        for j, (tensor, (_, _, array)) in enumerate(zip(tensors, arrays, strict=True)):
            tensor["shape"][1:] = np.maximum(tensor["shape"][1:], array.shape[1:]).tolist()
            np.save(out / f"part-{j}-{i}.npy", array)
        counts.append(table.num_rows)
    if not tensors:
        raise ValueError("no chunk to encode")
    for j, tensor in enumerate(tensors):
        tensor["shape"][0] = sum(counts)
        # a new file reads as zeros: what a narrower chunk leaves unwritten is padding
        joined = np.lib.format.open_memmap(out / tensor["file"], mode="w+",
                                           dtype=np.dtype(tensor["dtype"]), shape=tuple(tensor["shape"]))
        allocate(out / tensor["file"])
        start = 0
        for i, n in enumerate(counts):
            part_path = out / f"part-{j}-{i}.npy"
            part = np.load(part_path, mmap_mode="r")
            joined[(slice(start, start + n), *map(slice, part.shape[1:]))] = part
            start += n
            part_path.unlink()
        joined.flush()
    (out / MANIFEST).write_text(json.dumps({"rows": sum(counts), "tensors": tensors}, indent=2) + "\n",
                                encoding="utf-8")


def allocate(path: Path) -> None:
    """Reserve the disk blocks of the (sparse) file ``path``: a write into a memory map of it
    finding the disk full would kill the process with SIGBUS; here it is an OSError (ENOSPC)."""
    if hasattr(os, "posix_fallocate"):  # not on macOS
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)


def open_split(directory: Path) -> TaskData:
    """The split ``encode_split`` wrote in ``directory``, each tensor memory-mapped copy-on-write
    (writable, as ``torch.from_numpy`` wants, but never written back to the file). A damaged
    file, or one that does not match the manifest, raises ValueError naming it."""
    directory = Path(directory)
    groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in GROUPS}
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for tensor in manifest["tensors"]:
            path = directory / tensor["file"]
            array = np.load(path, mmap_mode="c")
            if list(array.shape) != tensor["shape"] or array.dtype.name != tensor["dtype"]:
                raise ValueError(f"{array.dtype.name} {list(array.shape)}, the manifest says "
                                 f"{tensor['dtype']} {tensor['shape']}")
            groups[tensor["group"]][tensor["key"]] = torch.from_numpy(array)
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: {reason}") from None
    return TaskData(**groups)
