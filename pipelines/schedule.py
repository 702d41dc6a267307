"""Bring a DVC pipeline up to date on a Prefect task runner, as ``dvc repro`` would, only parallel.

There are no level barriers: each stage is checked as soon as its own upstream stages are done
(``evaluate@a-0`` does not wait for ``train@b-0``). The check is DVC's (``repo.check``): a stage
is up to date, restored from the run-cache, or stale. A stale stage's commands become a Prefect
task, submitted with ``wait_for`` its upstream tasks (so the UI draws the graph). When a task
finishes, this thread records the stage in dvc.lock, then checks the stages it unblocked.
"""

from __future__ import annotations

import os
from pathlib import Path

from dvc.repo import Repo
from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner

from pipelines import repo as dvc
from pipelines.stage import run_stage


def bring_up_to_date(root: Path, runner: TaskRunner, retries: int, workers: int | None,
                     cap_threads: bool) -> list[str]:
    """Run the stale stages of the DVC project at ``root`` on ``runner``; return those that ran.
    A failed stage stops new stages from starting; those running finish and are recorded, then
    the failure is raised. ``cap_threads`` shares the machine's cores among the stages that run
    side by side."""
    stage_task = run_stage.with_options(retries=retries)
    with dvc.opened(root) as repo, runner:
        upstream = dvc.upstream_stages(repo)
        waiting, done = set(upstream), set()
        futures: dict[str, PrefectFuture] = {}
        running: dict[PrefectFuture, str] = {}
        ran, failures = [], []
        while waiting or running:
            stale = [] if failures else _settle(repo, upstream, waiting, done)
            for name in stale:
                threads = _threads(len(running) + len(stale), workers) if cap_threads else None
                parameters = {"name": name, "commands": dvc.commands(repo, name),
                              "root": str(root), "threads": threads}
                after = [futures[u] for u in upstream[name] if u in futures]
                futures[name] = runner.submit(stage_task, parameters, wait_for=after)
                running[futures[name]] = name
            if not running:
                break
            finished = next(as_completed(list(running)))
            name = running.pop(finished)
            finished.wait()  # the task's final state, as the task runner returned it
            if not finished.state.is_completed():
                failures.append(finished)
                continue
            dvc.record(repo, name)
            done.add(name)
            ran.append(name)
        if failures:
            failures[0].result()  # raises the stage's own error
    return ran


def _settle(repo: Repo, upstream: dict[str, set[str]], waiting: set[str],
            done: set[str]) -> list[str]:
    """Check every waiting stage whose upstream stages are all done, again and again as stages
    found up to date or restored unblock others; return the stale ones."""
    stale: list[str] = []
    while ready := sorted(n for n in waiting if upstream[n] <= done):
        waiting.difference_update(ready)
        for name, verdict in dvc.check(repo, ready).items():
            if verdict == "stale":
                stale.append(name)
                continue
            done.add(name)
            if verdict == "restored":
                get_run_logger().info("%s: restored from the run-cache (a run with the same inputs)", name)
    return stale


def _threads(side_by_side: int, workers: int | None) -> int:
    """Torch threads per stage: the cores shared among the stages that run side by side
    (measured: 2 stages x 2 threads on 2 cores ran up to 7x slower than with 1 thread each)."""
    return max(1, (os.cpu_count() or 1) // min(side_by_side, workers or side_by_side))
