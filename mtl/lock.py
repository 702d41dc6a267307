"""One run of a stage at a time in a project. ``dvc repro`` holds DVC's own lock, but the
Prefect flows and users run stage commands directly; two runs of one stage would write the
same outputs. The lock is an ``flock`` that the kernel releases when its holder exits or dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime

from mtl import paths
from mtl.errors import UserError
from mtl.io import writing


@contextlib.contextmanager
def stage_lock(name: str) -> Iterator[None]:
    """Hold ``.mtl/locks/<name>.lock`` for the block; a ``UserError`` if another run holds it."""
    path = paths.WORK_DIR / "locks" / f"{name}.lock"
    with writing(path):  # a full disk or read-only project: one line
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+")  # noqa: SIM115 (closed below, also on error)
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "pid unknown, just started"
            raise UserError(f"stage '{name}' is already running in this project ({holder}); "
                            "wait for it to finish or stop it") from None
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        with writing(path):
            file.truncate(0)
            file.write(f"pid {os.getpid()}, since {since}")
            file.flush()
        yield
