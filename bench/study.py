"""The seed study: single-task against multi-task variants on a real data set, over 3 seeds,
through the real pipeline (`dvc repro` in a temporary copy of the project).

    python bench/study.py multifashion --set data.source=multifashion:3000   # or tweets, adult
    python bench/study.py adult --variants stl hps-ew mmoe-ew --docs docs/adult   # the full report
    python bench/study.py tweets --variants stl hps-ew --grouped tag=hps-ew:2 --name grouped

The example's params (examples/<name>.yaml) are used as they are, with the study's variants and
seeds. The comparison (mean ± std over seeds, Δm, Welch's t-test) is copied to
bench/results/study-<example>[-<name>].md and .json, with the machine and the wall time; with
``--docs DIR`` the whole report (reports/: report.md, index.html, plots) is copied to DIR instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import cpu_model
from mtl.config import apply_override
from tests.helpers import run
from tests.test_pipeline_dvc import commit, copy_project

VARIANTS = {
    "stl": {"arch": "stl", "weighting": "ew"},
    "hps-ew": {"arch": "hps", "weighting": "ew"},
    "mmoe-ew": {"arch": "mmoe", "weighting": "ew"},
    "hps-uw": {"arch": "hps", "weighting": "uw"},
    "hps-pcgrad": {"arch": "hps", "weighting": "pcgrad"},
    "hps-famo": {"arch": "hps", "weighting": "famo"},
    "hps-upgrad": {"arch": "hps", "weighting": "upgrad"},
    "hps-gradnorm": {"arch": "hps", "weighting": "gradnorm"},
    "mmoe-gradnorm": {"arch": "mmoe", "weighting": "gradnorm"},
    "hps-nash_mtl": {"arch": "hps", "weighting": "nash_mtl"},
}


def grouped(specs: list[str]) -> dict[str, dict]:
    """The ``grouped`` section from ``NAME=FROM:MAX[:SE]`` arguments (SE: ``standard_errors``)."""
    section = {}
    for spec in specs:
        name, _, source = spec.partition("=")
        source, most, *margin = source.split(":")
        groups = {"from": source, "max_groups": int(most)} | (
            {"standard_errors": float(margin[0])} if margin else {})
        section[name] = {"arch": "groups", "weighting": "ew", "arch_options": {"groups": groups}}
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=[p.stem for p in (REPO / "examples").glob("*.yaml")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a parameter of the example, e.g. train.epochs=5")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--grouped", nargs="+", default=[], metavar="NAME=FROM:MAX[:SE]",
                        help="a grouped variant (arch groups, ew): at most MAX groups chosen by "
                             "TAG from variant FROM's task affinity, less SE standard errors")
    parser.add_argument("--docs", type=Path, help="copy the full report here")
    parser.add_argument("--name", help="results to bench/results/study-<example>-<NAME>.md/.json")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix=f"mtl-study-{args.example}-"))
    root.mkdir(parents=True, exist_ok=True)
    copy_project(root)
    params = yaml.safe_load((REPO / "examples" / f"{args.example}.yaml").read_text())
    variants = {name: VARIANTS[name] for name in args.variants}
    params |= {"variants": variants, "seeds": args.seeds, "grouped": grouped(args.grouped)}
    for assignment in args.overrides:
        apply_override(params, assignment)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(root, f"study {args.example}")
    start = time.perf_counter()
    run(["dvc", "repro"], root)
    seconds = time.perf_counter() - start
    command = "python bench/study.py " + " ".join(sys.argv[1:])
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
    footer = (f"\n---\nRegenerate: `{command}` (`dvc repro` of {len(variants) + len(args.grouped)} variants × "
              f"{len(args.seeds)} seeds took {seconds / 60:.1f} min on {machine}).\n")
    if args.docs:
        target = REPO / args.docs
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "reports", target, ignore=shutil.ignore_patterns(".gitignore"))
        (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        with (target / "report.md").open("a") as f:
            f.write(footer)
    else:
        out = REPO / "bench" / "results" / "-".join(filter(None, ["study", args.example, args.name]))
        out.with_suffix(".md").write_text((root / "reports/compare.md").read_text() + footer)
        out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "machine": machine, "seconds": round(seconds, 1), "params": params,
             "compare": json.loads((root / "metrics/compare.json").read_text())}, indent=2) + "\n")
    print((root / "reports/compare.md").read_text())
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
