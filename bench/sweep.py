"""Wall time of a Prefect sweep of 4 configurations, parallel against sequential, in one run.

    python bench/sweep.py [--repeats 2] [--epochs 40]

Two temporary copies of the project (one seed) get the same base pipeline first (not timed).
Then, for each repeat, both run the `sweep` flow over 4 architectures with a new weighting (so 4
new variants to train, evaluate and compare): one with a single worker (sequential), one with one
worker per configuration (parallel), alternating which goes first. Prints a Markdown table and writes
bench/results/sweep-<host>.json. Starts its own Prefect server on loopback.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import cpu_model, save_result
from tests.helpers import env, free_port
from tests.test_pipeline_dvc import commit, copy_project, edit_params


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = env() | {"PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    process = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    subprocess.run(["prefect", "server", "status", "--wait", "--timeout", "180"], env=server_env,
                   check=True, capture_output=True)
    return process, url


ARCHS = ["hps", "mmoe", "cgc", "ple"]
WEIGHTINGS = ["uw", "dwa", "rlw", "db_mtl"]  # one per repeat, so each repeat trains new variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtl-bench-sweep-"))
    server, url = start_server(work / "prefect-home")
    os.environ["PREFECT_API_URL"] = url
    from pipelines.flows import pipeline, sweep  # after PREFECT_API_URL is set

    try:
        projects = {}
        for mode in ("sequential", "parallel"):
            root = copy_project(work / mode)
            edit_params(root, lambda p: (p["train"].update(epochs=args.epochs, patience=0),
                                         p.update(seeds=[0])))
            commit(root, "bench settings")
            pipeline(root=str(root))  # the base variants, not timed
            projects[mode] = root
        rows = []
        for r in range(args.repeats):
            weighting = WEIGHTINGS[r % len(WEIGHTINGS)]
            order = ("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential")
            times = {}
            for mode in order:
                start = time.perf_counter()
                sweep(root=str(projects[mode]), archs=ARCHS, weightings=[weighting],
                      runner="threads", workers=1 if mode == "sequential" else len(ARCHS))
                times[mode] = time.perf_counter() - start
            rows.append({"repeat": r, "weighting": weighting, **times,
                         "speedup": times["sequential"] / times["parallel"]})
    finally:
        os.killpg(server.pid, signal.SIGTERM)

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    print(f"Sweep of 4 configurations ({', '.join(ARCHS)} x one weighting, {args.epochs} epochs, penguins) on "
          f"{machine['cpu']}, {machine['cores']} cores\n")
    print("| repeat | sequential (1 worker) s | parallel (4 workers) s | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['repeat']} | {row['sequential']:.1f} | {row['parallel']:.1f} | {row['speedup']:.2f}× |")
    save_result("sweep", {"machine": machine, "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
