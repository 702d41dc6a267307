"""Releases: the files a server loads, copied from where training and export wrote them into
``.mtl/serve/<variant>-<seed>-<backend>/`` with a ``release.json``. A release is written as a new
folder and swapped in whole (``mtl.io.replace_dirs``), so a worker never reads half of one, and
a model trained but not released never reaches a running server. ``mtl serve`` makes one as it
starts, ``POST /reload`` and the nightly flow's ``serve_variant`` make the next ones; every
worker watches ``release.json`` and loads each new release."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from mtl import paths
from mtl.io import replace_dirs, temp_dir, write_json, writing
from mtl.serving.model import Files, Served, Source, load, read

RELEASES = paths.WORK_DIR / "serve"
STAMP = "release.json"


def folder(source: Source) -> Path:
    return Path(source.root) / RELEASES / f"{source.variant}-{source.seed}-{source.backend}"


def release(source: Source) -> Served:
    """Read the source's files once, load them (a bad one is a ``UserError`` naming it), and
    swap those same bytes in as the new release. Returns the loaded model."""
    files = read(source.paths())
    served = load(source, files)
    publish(source, files, served)
    return served


def publish(source: Source, files: Files, served: Served) -> None:
    """Swap ``files`` (as ``read`` returned them, and ``load`` made ``served`` of them) in as
    the release of ``source``."""
    where = folder(source)
    with writing(where):
        where.parent.mkdir(parents=True, exist_ok=True)
        new = temp_dir(where.parent, where.name)
        try:
            for name, (_, data) in files.items():
                (new / name).write_bytes(data)
            write_json({"model_sha256": served.metadata["model_sha256"],
                        "released_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, new / STAMP)
            replace_dirs((new, where))
        finally:
            shutil.rmtree(new, ignore_errors=True)


def current(source: Source) -> tuple[tuple | None, Served]:
    """The release of ``source`` as it is now: its stamp's ``signature`` and the loaded model."""
    where = folder(source)
    stamp = signature(source)
    return stamp, load(source, read({name: where / name for name in source.paths()}))


def signature(source: Source) -> tuple | None:
    """What changes with every release (inode and time of ``release.json``); None while there is
    none (or in the instant of a swap)."""
    try:
        stat = os.stat(folder(source) / STAMP)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
