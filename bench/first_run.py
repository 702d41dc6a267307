"""The README's first command without the install, and what a run with nothing to do costs:
``mtl check && dvc repro`` in a fresh copy of a revision's project, then a no-op ``dvc repro``
and a no-op Prefect ``pipeline()`` (its temporary server included: ``PREFECT_API_URL`` unset).

    python bench/first_run.py [--rev HEAD] [--before REV]

Each revision's tracked files (``git archive``, without tests/ and bench/) become a fresh git
repository, run with the installed packages. CPU seconds are user + system of the commands and
everything they started (``getrusage`` of the children), so they hold on a busy machine where
wall seconds do not. Prints a Markdown table and writes bench/results/first_run-<host>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, load_line, save_result

STEPS = {"first run": "mtl check && dvc repro",
         "no-op dvc repro": "dvc repro",
         "no-op pipeline() flow":
             f"{sys.executable} -c 'from pipelines.flows import pipeline; pipeline()'"}


def checkout(rev: str, root: Path) -> None:
    """``rev``'s project files in ``root``, a git repository with one commit."""
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "--exclude=tests", "--exclude=bench"], input=archive, cwd=root,
                   check=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", rev]):
        subprocess.run(git + args, cwd=root, check=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(root: Path, home: Path) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each of ``STEPS``, run in ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(root), "PREFECT_HOME": str(home), "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = {}
    for step, command in STEPS.items():
        cpu, start = children_cpu(), time.perf_counter()
        subprocess.run(command, shell=True, cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result[step] = {"wall_s": round(time.perf_counter() - start, 1),
                        "cpu_s": round(children_cpu() - cpu, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--before", help="an earlier revision to measure in the same run")
    args = parser.parse_args()
    machine = Machine()
    revs = [r for r in (args.before, args.rev) if r]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rev in revs:
            root, home = Path(tmp) / rev / "project", Path(tmp) / rev / "prefect"
            root.mkdir(parents=True)
            checkout(rev, root)
            results[rev] = measure(root, home)
    info = machine.finish()
    print("| step | " + " | ".join(f"{r} wall s | {r} CPU s" for r in revs) + " |")
    print("|---|" + "---|---|" * len(revs))
    for step in STEPS:
        cells = [f"{results[r][step]['wall_s']} | {results[r][step]['cpu_s']}" for r in revs]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print(f"\n{info['cpu']}, {info['cores']} cores; {load_line(info)}.")
    save_result("first_run", {"machine": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
