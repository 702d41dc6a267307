"""The DVC side of a flow run: the stage graph, each stage's check as ``dvc repro`` does it
(up to date, restored from the run-cache, or stale), and recording a stage in ``dvc.lock``.

Only the flow's own thread calls these, each step under DVC's repository lock, so concurrent
stage commands never meet a second DVC process in the repository (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dvc.exceptions import DvcException
from dvc.fs import LocalFileSystem
from dvc.repo import Repo, lock_repo
from dvc.repo.reproduce import get_active_graph
from dvc.schema import COMPILED_LOCKFILE_SCHEMA
from dvc.stage import Stage
from dvc.stage.cache import RunCacheNotFoundError
from dvc.utils.strictyaml import load as load_strict_yaml

from mtl import paths
from mtl.errors import UserError
from mtl.io import write_text

LOCK = Path("dvc.lock")
GOOD_LOCK = paths.WORK_DIR / "dvc.lock.good"  # the last readable dvc.lock, kept before each commit


@contextlib.contextmanager
def opened(root: Path) -> Iterator[Repo]:
    """DVC's repository object; DVC's API expects the working directory inside the repository."""
    previous = Path.cwd()
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            yield repo
    finally:
        os.chdir(previous)


def load(repo: Repo) -> tuple[dict[str, set[str]], dict[str, Stage]]:
    """Each stage's name with the names of the stages it depends on directly (as in ``dvc
    repro``, a frozen stage does not wait for its dependencies), and the stages, for ``check``.
    Loaded once: DVC parses dvc.yaml again each time its repository lock is taken, which cost a
    flow with nothing to do a second of CPU per wave of stages checked."""
    with lock_repo(repo):
        graph = get_active_graph(repo.index.graph)  # an edge (a, b): stage a depends on stage b
        return ({a.addressing: {b.addressing for b in graph.successors(a)} for a in graph},
                {stage.addressing: stage for stage in repo.index.stages})


def check(repo: Repo, stages: dict[str, Stage], names: list[str]
          ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Check the ``stages`` (from ``load``) named ``names`` as ``dvc repro`` does when it reaches
    them: ``"up to date"``, ``"restored"`` (the run-cache held a run with exactly these inputs:
    its outputs are checked out and the stage is recorded) or ``"stale"`` (its outputs are
    removed, as before ``dvc repro`` runs a command). Returns the verdicts, and the commands of
    the stale stages as DVC runs them (``cmd`` is one command per line, or a list). Call it only
    once every upstream stage is up to date: a stage's recorded hashes are those of dvc.lock
    when it was loaded, which only its own run or restore changes."""
    with lock_repo(repo):
        verdicts, stale = {}, {}
        for name in names:
            stage = stages[name]
            if not stage.changed():
                verdicts[name] = "up to date"
                continue
            try:
                repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:
                stage.remove_outs(ignore_remove=False, force=False)
                verdicts[name] = "stale"
                stale[name] = stage.cmd if isinstance(stage.cmd, list) else stage.cmd.splitlines()
                continue
            record(repo, name)
            verdicts[name] = "restored"
        return verdicts, stale


def record(repo: Repo, name: str) -> None:
    """``dvc commit`` a stage that ran: its outputs go to the cache, the run to the run-cache (as
    after ``dvc repro``), and dvc.lock is rewritten. DVC rewrites dvc.lock in place; a copy of
    the last good one is kept first, for ``repair_lock``."""
    root = Path(repo.root_dir)
    if (root / LOCK).exists():
        write_text((root / LOCK).read_text(encoding="utf-8"), root / GOOD_LOCK)
    with lock_repo(repo):
        repo.commit(name, force=True)


def lock_problem(path: Path) -> str | None:
    """Why DVC cannot read a dvc.lock (empty, cut short, not a lock file), or None if it can."""
    try:
        load_strict_yaml(str(path), COMPILED_LOCKFILE_SCHEMA, LocalFileSystem())
    except DvcException as exc:
        return "empty" if not path.read_bytes().strip() else str(exc).splitlines()[0]
    return None


def repair_lock(root: Path) -> str | None:
    """Put back the last good dvc.lock if the present one is unreadable (a kill while DVC
    rewrote it leaves it empty or cut short). Returns what was wrong, or None if nothing was."""
    lock = root / LOCK
    problem = lock_problem(lock) if lock.exists() else None
    if problem is None:
        return None
    good = root / GOOD_LOCK
    if not good.exists() or lock_problem(good):
        raise UserError(f"{lock}: unreadable ({problem}) and no good copy in {good}; "
                        "restore it (git checkout dvc.lock) or delete it and run again")
    write_text(good.read_text(encoding="utf-8"), lock)
    return problem


def sources(repo: Repo) -> list[Path]:
    """The files and folders the pipeline reads that no stage writes (raw data, code, params),
    relative to the repository root."""
    with lock_repo(repo):
        stages = list(repo.index.stages)
        root = Path(repo.root_dir)
        outs = {Path(out.fs_path).relative_to(root) for stage in stages for out in stage.outs}
        deps = {Path(dep.fs_path).relative_to(root)
                for stage in stages for dep in stage.deps if dep.is_in_repo}
    return sorted(dep for dep in deps
                  if not any(dep == out or dep in out.parents or out in dep.parents for out in outs))
