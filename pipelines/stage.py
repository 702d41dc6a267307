"""One stage's commands as a Prefect task, its output streamed to the flow's log line by line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task


class StageStopped(RuntimeError):
    """A stage's shell was killed by a signal: its process group was stopped (``make stop``, a
    cancelled run), so it is not retried. (A command killed alone, say by the kernel out of
    memory, makes the shell exit with 128 + the signal: an ordinary failure.)"""


def _not_stopped(task, task_run, state) -> bool:
    return not isinstance(state.data, StageStopped)


@task(name="stage", task_run_name="{name}", retry_condition_fn=_not_stopped)
def run_stage(name: str, commands: list[str], root: str) -> None:
    """Run a stage's commands in ``root`` with ``/bin/sh -c``, one after the other, as DVC runs
    them (with ``DVC_ROOT`` and ``DVC_STAGE`` set). Each line of output (stdout and stderr) goes to
    the flow's log as it is printed, prefixed with the stage name. A failure names the stage and
    its last ``error:`` line; a stage killed by a signal is not retried. Each stage sets its own
    torch threads from params.yaml (``runtime.threads``, ``train.threads``)."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1", "DVC_ROOT": root, "DVC_STAGE": name}
    for command in commands:
        _stream(name, command, root, env)


def _stream(name: str, command: str, root: str, env: dict[str, str]) -> None:
    logger = get_run_logger()
    last, error = "", None
    with subprocess.Popen(["/bin/sh", "-c", command], cwd=root, env=env, text=True, bufsize=1,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            last = line.rstrip("\n")
            logger.info("%s | %s", name, last)
            if last.startswith("error:"):
                error = last
    if process.returncode < 0:
        raise StageStopped(f"stage {name} stopped by signal {-process.returncode}")
    if process.returncode > 0:
        cause = error or last or "no output"
        raise RuntimeError(f"stage {name} failed (exit {process.returncode}): {cause}")
