"""Start-up cost of a stage: ``mtl evaluate`` (and ``mtl --help``, ``mtl check``) with this
checkout's code against an earlier revision's, on the same data, machine and run.

    python bench/startup.py --before REV [--repeats 5]

A temporary project (no code in it) gets the default penguins pipeline up to ``train@hps-ew-0``
with this checkout's code. Then each repeat runs, for each code in turn (the order alternates):
``mtl evaluate --variant hps-ew --seed 0`` for its wall time, the same under
``python -X importtime`` for what its imports cost, ``mtl --help`` and ``mtl check``. The
earlier code is ``git archive REV mtl``; both run with the installed packages (torch,
torchmetrics, transformers when the ``text`` extra is installed, ...). The params file leaves
out the sections the earlier code does not know (``runtime``, ``train.threads``).

Prints Markdown tables (medians) and writes bench/results/startup-<host>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, load_line, save_result

EVALUATE = ["evaluate", "--variant", "hps-ew", "--seed", "0"]
PACKAGES = ["torch", "torchmetrics", "transformers", "scipy.signal", "matplotlib", "torchjd",
            "cvxpy", "pyarrow.dataset", "pandas"]
"""What evaluate imported (a dependency two of them share counts where it was first imported)."""


def project(root: Path) -> None:
    """The default pipeline up to train@hps-ew-0, by this checkout's code."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.pop("runtime", None)
    params["train"].pop("threads", None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["ingest"], ["augment"], ["split"], ["train", "--variant", "hps-ew", "--seed", "0"]):
        mtl(REPO, root, args)


def mtl(code: Path, root: Path, args: list[str], importtime: bool = False) -> tuple[float, str]:
    """Run ``mtl ARGS`` with ``code`` first on the import path; (wall seconds, stderr)."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "mtl", *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False,
                            env=os.environ | {"PYTHONPATH": str(code)})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} with {code} failed:\n{result.stderr[-2000:]}")
    return seconds, result.stderr


def import_seconds(log: str) -> dict[str, float]:
    """From ``-X importtime`` output: every import's total (top-level imports summed) and each
    package of ``PACKAGES`` (its cumulative time where it was first imported)."""
    seconds, total = {}, 0.0
    for line in log.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if not match:
            continue
        cumulative, name = int(match[1]) / 1e6, match[3]
        if len(match[2]) == 1:  # a top-level import
            total += cumulative
        if name in PACKAGES and name not in seconds:
            seconds[name] = cumulative
    return {"all imports": total} | seconds


def measure(codes: dict[str, Path], root: Path, repeats: int) -> dict:
    """{code: {what: median seconds}}, and every run under "runs"."""
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    names = list(codes)
    for r in range(repeats):
        for name in names[r % 2:] + names[:r % 2]:
            code = codes[name]
            run = {"mtl evaluate": mtl(code, root, EVALUATE)[0],
                   "mtl --help": mtl(code, root, ["--help"])[0],
                   "mtl check": mtl(code, root, ["check"])[0]}
            runs[name].append(run | import_seconds(mtl(code, root, EVALUATE, importtime=True)[1]))
    keys = ["mtl evaluate", "mtl --help", "mtl check", "all imports", *PACKAGES]
    return {name: {key: statistics.median(run.get(key, 0.0) for run in runs[name]) for key in keys}
            for name in names} | {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before, root = Path(tmp, "before"), Path(tmp, "project")
        before.mkdir()
        root.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "mtl"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        project(root)
        machine = Machine()
        result = measure({f"before ({args.before})": before, "after (this checkout)": REPO},
                         root, args.repeats)
        info = machine.finish()

    names = [name for name in result if name != "runs"]
    print(f"Start-up on {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python "
          f"{info['python']}; medians of {args.repeats} runs\n")
    print("| seconds | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in result[names[0]]:
        print(f"| {key} | " + " | ".join(f"{result[n][key]:.2f}" for n in names) + " |")
    print(f"\nTotal {info['total_s']} s; {load_line(info)}.")
    save_result("startup", {"machine": info, "args": vars(args), "result": result})


if __name__ == "__main__":
    main()
