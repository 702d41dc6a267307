"""A sweep's own copy of the project, so that a sweep leaves the user's params.yaml, dvc.lock and
outputs alone.

The copy lives in ``.mtl/sweeps/<name>/`` (git ignores it; being a DVC repository of its own, the
project's DVC does too). It holds the pipeline's sources (dvc.yaml, params.yaml, code, raw data:
hard links where possible) and shares the project's DVC cache, run-cache included. So a stage
whose inputs are the same as in a run before (ingest, split, the baseline on the same seeds) is
restored from the run-cache, not run again, and the sweep's runs are in the run-cache for the
project too.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mtl import paths
from mtl.errors import UserError
from mtl.io import write_text
from pipelines import repo as dvc

SWEEPS = paths.WORK_DIR / "sweeps"


def prepare(project: Path, name: str) -> Path:
    """The sweep workspace ``name`` of ``project``, its sources synced with the project's."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise UserError(f"sweep name: '{name}' must be letters, digits, '_', '.' or '-'")
    where = project / SWEEPS / name
    with dvc.opened(project) as repo:
        sources = dvc.sources(repo)
        cache = repo.cache.local_cache_dir
    for path in [Path("dvc.yaml"), Path(".dvcignore"), *sources]:
        _replace(project / path, where / path)
    if (project / dvc.LOCK).exists() and not (where / dvc.LOCK).exists():
        shutil.copy2(project / dvc.LOCK, where / dvc.LOCK)  # what is recorded, in the shared cache
    write_text("[core]\n    no_scm = true\n    analytics = false\n    check_update = false\n"
               f"[cache]\n    dir = {cache}\n", where / ".dvc" / "config")
    return where


def _replace(source: Path, copy: Path) -> None:
    if copy.is_dir():
        shutil.rmtree(copy)
    elif copy.exists():
        copy.unlink()
    copy.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, copy, copy_function=_link)
    elif source.exists():
        _link(source, copy)


def _link(source: str | Path, copy: str | Path) -> None:
    try:
        os.link(source, copy)
    except OSError:
        shutil.copy2(source, copy)
