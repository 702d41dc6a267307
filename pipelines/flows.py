"""Prefect flows over the DVC pipeline: ``pipeline`` (on demand or scheduled) and ``sweep``.

Prefect runs *over* DVC, not around it. DVC's graph says which stages come before which. At each
level of that graph, DVC says which stages are stale. The flow runs those stages' commands (the
``cmd`` of ``dvc.yaml``, so exactly what ``dvc repro`` would run) as Prefect tasks in parallel,
with retries. It then records them in ``dvc.lock`` with ``dvc commit``, one stage at a time, from
this process alone. Concurrent ``dvc repro`` processes in one repository would fight over DVC's
lock, and a single serialized commit step does not. After a flow, ``dvc status`` is clean and
``dvc repro`` is a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from mtl.config import load_params
from mtl.errors import UserError
from pipelines import params_file

RUNNERS = ("threads", "processes", "dask")


def task_runner(kind: str, workers: int | None = None, dask_address: str | None = None) -> TaskRunner:
    """The task runner for a flow run: threads (default), processes, or an existing Dask cluster."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        if not dask_address:
            raise UserError("runner 'dask' needs dask_address, e.g. tcp://scheduler:8786")
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    raise UserError(f"runner: '{kind}' is not one of {', '.join(RUNNERS)}")


@contextlib.contextmanager
def dvc_repo(root: Path) -> Iterator[Repo]:
    """DVC's repository object; DVC's API expects the working directory inside the repository.
    Only the flow's own thread calls it, while no stage task is running."""
    previous = Path.cwd()
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            yield repo
    finally:
        os.chdir(previous)


def stage_levels(root: Path) -> list[list[tuple[str, str]]]:
    """The pipeline's stages as (name, cmd), grouped so that each group only depends on earlier
    groups: the stages of one group can run in parallel."""
    with dvc_repo(root) as repo:
        graph = repo.index.graph  # an edge (a, b): stage a depends on stage b
        depth: dict = {}
        for stage in reversed(list(nx.topological_sort(graph))):
            depth[stage] = 1 + max((depth[d] for d in graph.successors(stage)), default=-1)
        levels: list[list[tuple[str, str]]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for stage, level in depth.items():
            levels[level].append((stage.addressing, stage.cmd))
    return [sorted(level) for level in levels]


def stale(root: Path, names: list[str]) -> list[str]:
    """The stages among ``names`` that DVC reports as changed (deps, params, outs or command)."""
    with dvc_repo(root) as repo:
        changed = repo.status(targets=names)
    return [n for n in names if n in changed]


def record(root: Path, names: list[str]) -> None:
    """``dvc commit`` the stages just run, one at a time, so dvc.lock stays the one record."""
    with dvc_repo(root) as repo:
        for name in names:
            repo.commit(name, force=True)


@task(name="stage", task_run_name="{name}")
def run_stage(name: str, cmd: str, root: str, threads: int | None = None) -> str:
    """Run one stage's command; its output goes to the flow's log; a failure names the stage.
    ``threads`` caps torch's threads, so that stages running side by side share the cores
    instead of oversubscribing them (measured: 2 stages × 2 threads on 2 cores ran up to 7×
    slower than with 1 thread each)."""
    logger = get_run_logger()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(shlex.split(cmd), cwd=root, env=env, capture_output=True, text=True, check=False)
    for line in (result.stdout + result.stderr).splitlines():
        logger.info("%s | %s", name, line)
    if result.returncode != 0:
        cause = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise RuntimeError(f"stage {name} failed (exit {result.returncode}): {cause}")
    return result.stdout


@flow(name="stage-level")
def run_level(names_cmds: list[tuple[str, str]], root: str, retries: int,
              threads: int | None = None) -> None:
    """Run independent stages in parallel on this flow's task runner."""
    futures = [run_stage.with_options(retries=retries).submit(n, c, root, threads)
               for n, c in names_cmds]
    for future in futures:
        future.result()


@flow(name="pipeline", log_prints=True)
def pipeline(root: str = ".", params: str | None = None, overrides: list[str] | None = None,
             retries: int = 1, runner: str = "threads", workers: int | None = None,
             dask_address: str | None = None) -> list[str]:
    """Bring the DVC pipeline up to date: run the stale stages, independent variants in parallel,
    and record them in dvc.lock. ``params`` replaces params.yaml and ``overrides`` (``a.b=value``)
    are written into it first, as ``dvc exp run -S`` does. Returns the stages it ran."""
    logger = get_run_logger()
    project = Path(root).resolve()
    params_file.update(project / "params.yaml", source=params, overrides=overrides or [])
    load_params(project / "params.yaml")  # a bad configuration fails here, naming the key
    level_flow = run_level.with_options(task_runner=task_runner(runner, workers, dask_address))
    ran: list[str] = []
    for level in stage_levels(project):
        todo = stale(project, [name for name, _ in level])
        if not todo:
            continue
        logger.info("running %s", ", ".join(todo))
        side_by_side = min(len(todo), workers or len(todo))
        threads = None if runner == "dask" else max(1, (os.cpu_count() or 1) // side_by_side)
        level_flow([(n, c) for n, c in level if n in todo], str(project), retries, threads)
        record(project, todo)
        ran += todo
    logger.info("up to date; ran %d stage(s): %s", len(ran), ", ".join(ran) or "none")
    return ran


@flow(name="sweep", log_prints=True)
def sweep(root: str = ".", archs: list[str] | None = None, weightings: list[str] | None = None,
          seeds: list[int] | None = None, retries: int = 1, runner: str = "threads",
          workers: int | None = None, dask_address: str | None = None) -> dict[str, dict]:
    """Train every arch × weighting as a variant (``sweep-<arch>-<weighting>``) on every seed, in
    parallel, then compare them all. Grids not given come from params.yaml (``sweep``, ``seeds``);
    ``seeds`` given here replaces params.yaml's ``seeds``, so the baseline trains on them too.
    Returns each sweep variant's Δm (mean, std, p, per seed)."""
    project = Path(root).resolve()
    grid = load_params(project / "params.yaml").sweep
    points = list(itertools.product(archs or grid.archs, weightings or grid.weightings))
    variants = {f"sweep-{a}-{w}": {"arch": a, "weighting": w} for a, w in points}
    params_file.set_variants(project / "params.yaml", variants, prefix="sweep-")
    pipeline(root=str(project), overrides=[f"seeds={list(seeds)}"] if seeds else None,
             retries=retries, runner=runner, workers=workers, dask_address=dask_address)
    from mtl import paths
    from mtl.io import read_json

    result = read_json(project / paths.COMPARE_JSON)
    return {name: result[name]["delta_m"] for name in variants}
