"""Prefect flows over the DVC pipeline: ``pipeline`` (on demand or scheduled), ``sweep`` and ``tune``.

Prefect runs *over* DVC, not around it, and behaves like ``dvc repro``, only parallel (see
``pipelines/schedule.py``): DVC's graph orders the stages, DVC says which are stale or can be
restored from the run-cache, the stale stages' commands (the ``cmd`` of ``dvc.yaml``) run as
Prefect tasks with retries, and this process alone records them in dvc.lock. After a flow,
``dvc status`` is clean and ``dvc repro`` is a no-op. One flow run at a time works on a project:
the others wait for its Prefect concurrency limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from mtl import paths
from mtl.config import load_params
from mtl.errors import UserError
from mtl.io import read_json
from pipelines import params_file, workspace
from pipelines import repo as dvc
from pipelines.schedule import bring_up_to_date
from pipelines.stage import run_stage

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


def limit_name(project: Path) -> str:
    """The name of the project's Prefect global concurrency limit (one per project directory)."""
    digest = hashlib.sha256(str(project).encode()).hexdigest()[:10]
    readable = re.sub(r"[^\w.-]", "-", project.name)
    return f"mtl-project-{readable}-{digest}"


@contextlib.contextmanager
def one_run_per_project(project: Path) -> Iterator[None]:
    """Hold the project's concurrency limit (1 slot, created if missing), waiting while another
    flow run holds it: two runs on one project queue instead of meeting on a stage's lock.
    Prefect leases the slot; a run that dies releases it when its lease expires (5 min)."""
    name = limit_name(project)
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    get_run_logger().info("waiting for concurrency limit %s (one flow run per project)", name)
    with concurrency(name, occupy=1, strict=True):
        get_run_logger().info("acquired %s", name)
        yield


def up_to_date(project: Path, retries: int, runner: str, workers: int | None,
               dask_address: str | None) -> list[str]:
    """Run the stale stages of ``project`` (see ``schedule.bring_up_to_date``); first put back the
    last good dvc.lock if a kill left it unreadable. Returns the stages that ran."""
    logger = get_run_logger()
    problem = dvc.repair_lock(project)
    if problem:
        logger.warning("dvc.lock was unreadable (%s): restored the copy kept before the last "
                       "commit (%s)", problem, dvc.GOOD_LOCK)
    ran = bring_up_to_date(project, task_runner(runner, workers, dask_address), retries,
                           share_cores=runner != "dask")
    logger.info("up to date; ran %d stage(s): %s", len(ran), ", ".join(ran) or "none")
    return ran


@flow(name="pipeline", log_prints=True)
def pipeline(root: str = ".", params: str | None = None, overrides: list[str] | None = None,
             retries: int = 1, runner: str = "threads", workers: int | None = None,
             dask_address: str | None = None, serve_variant: str | None = None) -> list[str]:
    """Bring the DVC pipeline up to date: run the stale stages, each as soon as its inputs are
    ready, and record them in dvc.lock. ``params`` replaces params.yaml and ``overrides``
    (``a.b=value``) are written into it first, as ``dvc exp run -S`` does. Then, with
    ``serve_variant``, release that variant's model (its first seed) to the ``mtl serve``
    servers of the project, which load it without dropping a request. Returns the stages it ran
    (stages restored from the run-cache did not run)."""
    project = Path(root).resolve()
    with one_run_per_project(project):
        params_file.update(project / "params.yaml", source=params, overrides=overrides or [])
        loaded = load_params(project / "params.yaml")  # a bad configuration fails here, naming the key
        if serve_variant is not None and serve_variant not in loaded.all_variants:
            raise UserError(f"serve_variant: '{serve_variant}' is not in variants or grouped")
        ran = up_to_date(project, retries, runner, workers, dask_address)
        if serve_variant is not None:
            release_for_serving(project, serve_variant, loaded.seeds[0])
        return ran


def release_for_serving(project: Path, variant: str, seed: int) -> None:
    """Release the model of ``variant`` and ``seed`` to the project's ``mtl serve`` servers of
    it (torch backend): each of their processes loads it within a second (``mtl.serving``)."""
    from mtl.serving.model import Source
    from mtl.serving.release import release

    served = release(Source(variant, seed, root=str(project)))
    get_run_logger().info("released %s seed %d (model %s) to its servers", variant, seed,
                          served.metadata["model_sha256"][:12])


@flow(name="sweep", log_prints=True)
def sweep(root: str = ".", archs: list[str] | None = None, weightings: list[str] | None = None,
          seeds: list[int] | None = None, name: str = "sweep", in_place: bool = False,
          retries: int = 1, runner: str = "threads", workers: int | None = None,
          dask_address: str | None = None) -> dict[str, dict]:
    """Train every arch × weighting as a variant (``sweep-<arch>-<weighting>``) on every seed, in
    parallel, and compare them with the baseline and the other variants. Grids not given come
    from params.yaml (``sweep``, ``seeds``); ``seeds`` replaces ``seeds``, so the baseline trains
    on them too. It runs in the workspace ``.mtl/sweeps/<name>/`` (see ``workspace``) and leaves
    the project's params.yaml, dvc.lock and outputs alone; ``in_place`` runs it in the project
    instead. Returns each sweep variant's Δm (mean, std, p, per seed)."""
    project = Path(root).resolve()
    with one_run_per_project(project):
        grid = load_params(project / "params.yaml").sweep
        points = itertools.product(archs or grid.archs, weightings or grid.weightings)
        variants = {f"sweep-{a}-{w}": {"arch": a, "weighting": w} for a, w in points}
        where = project if in_place else workspace.prepare(project, name)
        params_file.set_variants(where / "params.yaml", variants, prefix="sweep-")
        params_file.update(where / "params.yaml", overrides=[f"seeds={list(seeds)}"] if seeds else [])
        up_to_date(where, retries, runner, workers, dask_address)
        get_run_logger().info("the comparison: %s", os.path.relpath(where / paths.REPORT, project))
        result = read_json(where / paths.COMPARE_JSON)
    return {variant: result[variant]["delta_m"] for variant in variants}


@flow(name="tune", log_prints=True)
def tune(root: str = ".", shares: int | None = None, runner: str = "threads",
         workers: int | None = None, dask_address: str | None = None) -> dict[str, float | None]:
    """Tune every variant (``tune`` of params.yaml) with its trials fanned out as tasks on the
    task runner, Dask included: the baseline's study first (the others measure Δm against it),
    then every other variant's side by side. Each task is one worker of ``mtl tune``: one
    ``study.optimize`` on the study's shared storage (the journal under ``.mtl/tune/``, or
    ``tune.storage``, a database URL, for workers on several machines); ``shares`` tasks per
    study (default ``tune.jobs``) run ``tune.trials`` trials between them (``mtl tune --worker W
    --workers N``). Then each variant's ``tuned/<variant>.json`` is written; ``dvc repro`` (or
    the ``pipeline`` flow) records them, its tune stages finding every study complete. Needs
    the split data (``dvc repro split``). Returns each variant's best objective."""
    project = Path(root).resolve()
    with one_run_per_project(project):
        params = load_params(project / "params.yaml")
        if params.tune.trials == 0:
            raise UserError("tune.trials: 0, nothing to tune; set it to the trials per variant")
        baseline, share = params.compare.baseline, shares or params.tune.jobs
        others = [v for v in params.variants if v != baseline]
        quote = shlex.quote
        with task_runner(runner, workers, dask_address) as pool:
            run_tasks(pool, project, tune_workers(baseline, share))
            run_tasks(pool, project, {"tune-baseline": f"mtl tune --variant {quote(baseline)} "
                                                       f"--output {paths.TUNED_BASELINE}"})
            run_tasks(pool, project, {k: c for v in others for k, c in tune_workers(v, share).items()})
            run_tasks(pool, project, {f"tune@{v}": f"mtl tune --variant {quote(v)}"
                                      for v in params.variants})
    return {v: read_json(project / paths.tuned_path(v))["value"] for v in params.variants}


def tune_workers(variant: str, shares: int) -> dict[str, str]:
    """The commands of ``shares`` workers on the variant's study, by task name."""
    return {f"tune@{variant}-{w}": f"mtl tune --variant {shlex.quote(variant)} --worker {w} "
                                   f"--workers {shares}" for w in range(shares)}


def run_tasks(pool: TaskRunner, project: Path, commands: dict[str, str]) -> None:
    """Run each command as a stage task on ``pool``, side by side, and wait for them all."""
    futures = [pool.submit(run_stage, {"name": name, "commands": [command], "root": str(project)})
               for name, command in commands.items()]
    for future in futures:
        future.result()
