"""Bring a DVC pipeline up to date on a Prefect task runner, as ``dvc repro`` would, only parallel.

There are no level barriers: each stage is checked as soon as its own upstream stages are done
(``evaluate@a`` does not wait for ``train@b-0``). The check is DVC's (``repo.check``): a stage
is up to date, restored from the run-cache, or stale. A stale stage's commands become a Prefect
task, submitted with ``wait_for`` its upstream tasks (so the UI draws the graph) once its torch
threads fit in the cores beside the stages running: each stage runs on the threads params.yaml
gives it, and stages side by side do not oversubscribe the cores. When a task finishes, this
thread records the stage in dvc.lock, then checks the stages it unblocked.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from dvc.repo import Repo
from dvc.stage import Stage
from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner

from mtl.config import Params, cpu_count, load_params
from pipelines import repo as dvc
from pipelines.stage import run_stage


def bring_up_to_date(root: Path, runner: TaskRunner, retries: int, share_cores: bool) -> list[str]:
    """Run the stale stages of the DVC project at ``root`` on ``runner``; return those that ran.
    A failed stage stops new stages from starting; those running finish and are recorded, then
    the failure is raised. ``share_cores``: a stage starts only when the torch threads of the
    stages running side by side (``runtime.threads``, ``train.threads``), its own included, fit
    in this machine's cores; one stage always runs, whatever its threads."""
    stage_task = run_stage.with_options(retries=retries)
    params = load_params(root / "params.yaml")
    cores = cpu_count() if share_cores else math.inf
    with dvc.opened(root) as repo, runner:
        upstream, stages = dvc.load(repo)
        waiting, done = set(upstream), set()
        futures: dict[str, PrefectFuture] = {}
        running: dict[PrefectFuture, tuple[str, int]] = {}  # -> (stage, its threads)
        ready: list[tuple[str, list[str], int]] = []  # stale: (stage, commands, threads)
        ran, failures = [], []
        while waiting or running:
            if not failures:
                for name, commands in _settle(repo, stages, upstream, waiting, done).items():
                    ready.append((name, commands, stage_threads(params, commands)))
            start = startable([t for *_, t in ready], sum(t for _, t in running.values()), cores)
            for name, commands, threads in ready[:start]:
                after = [futures[u] for u in upstream[name] if u in futures]
                futures[name] = runner.submit(stage_task, {"name": name, "commands": commands,
                                                           "root": str(root)}, wait_for=after)
                running[futures[name]] = (name, threads)
            del ready[:start]
            if not running:
                break
            finished = next(as_completed(list(running)))
            name, _ = running.pop(finished)
            finished.wait()  # the task's final state, as the task runner returned it
            if not finished.state.is_completed():
                failures.append(finished)
                ready.clear()
                continue
            dvc.record(repo, name)
            done.add(name)
            ran.append(name)
        if failures:
            failures[0].result()  # raises the stage's own error
    return ran


def startable(threads: list[int], busy: int, cores: float) -> int:
    """How many of the ready stages, whose torch threads are ``threads`` (in the order they
    start), may start now while stages with ``busy`` threads run: as many as fit in ``cores``,
    and the first one anyway when nothing runs."""
    count = 0
    for wanted in threads:
        if busy and busy + wanted > cores:
            break
        busy, count = busy + wanted, count + 1
    return count


def stage_threads(params: Params, commands: list[str]) -> int:
    """The torch threads a stage's commands run on (``Params.threads``): ``train.threads`` of the
    variant ``mtl train --variant`` names, else ``runtime.threads``."""
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["mtl", "train"] and "--variant" in words[:-1]:
            return params.threads(words[words.index("--variant") + 1])
    return params.threads()


def _settle(repo: Repo, stages: dict[str, Stage], upstream: dict[str, set[str]],
            waiting: set[str], done: set[str]) -> dict[str, list[str]]:
    """Check every waiting stage whose upstream stages are all done, again and again as stages
    found up to date or restored unblock others; return the stale ones with their commands."""
    stale: dict[str, list[str]] = {}
    while ready := sorted(n for n in waiting if upstream[n] <= done):
        waiting.difference_update(ready)
        verdicts, commands = dvc.check(repo, stages, ready)
        stale |= commands
        for name, verdict in verdicts.items():
            if verdict == "stale":
                continue
            done.add(name)
            if verdict == "restored":
                get_run_logger().info("%s: restored from the run-cache (a run with the same inputs)", name)
    return stale
