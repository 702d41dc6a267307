"""Untuned against tuned: the same variants on a real data set, first with their params.yaml
values, then each tuned by Optuna with the same budget (``tune@<variant>``), through the real
pipeline (`dvc repro` in a temporary copy of the project). Does the ranking by Δm change?

    python bench/tune.py adult --trials 8 --epochs 10 --set data.source=adult:12000

Reports, for each way, every variant's Δm (mean ± std over the seeds) and its rank, the wall
time of the pipeline, and the tuning's trials per hour with the median pruner and without
pruning (the tune stages run a second time with ``tune.pruner: none`` on fresh studies). The
numbers go to bench/results/tune-<example>-<host>.json (``bench.engine.save_result``, with the
machine's load); the metrics do not depend on the load, the times do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from mtl.config import apply_override
from tests.helpers import run
from tests.test_pipeline_dvc import commit, copy_project

VARIANTS = {"stl": {"arch": "stl", "weighting": "ew"}, "hps-ew": {"arch": "hps", "weighting": "ew"},
            "hps-uw": {"arch": "hps", "weighting": "uw"},
            "hps-pcgrad": {"arch": "hps", "weighting": "pcgrad"},
            "mmoe-ew": {"arch": "mmoe", "weighting": "ew"}}
SPACE = {"lr": {"low": 3.0e-4, "high": 1.0e-2, "log": True},
         "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
         "dropout": {"low": 0.0, "high": 0.3}, "hidden": {"choices": [[64, 64], [128, 128]]},
         "arch_options.experts": {"low": 2, "high": 8, "int": True}}


def set_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def timed_repro(root: Path, *targets: str) -> float:
    start = time.perf_counter()
    run(["dvc", "repro", *targets], root)
    return time.perf_counter() - start


def ranking(root: Path, variants: list[str]) -> dict[str, dict]:
    """Each variant's Δm (mean, std) and its rank by mean Δm (1 = best), and the gradient-boosting
    reference's Δm (``_reference``, unranked) when compare has one."""
    table = json.loads((root / "metrics/compare.json").read_text())
    means = {v: table[v]["delta_m"]["mean"] for v in variants}
    order = sorted(variants, key=lambda v: -(means[v] if means[v] is not None else -1e9))
    ranks = {v: {"delta_m": means[v], "std": table[v]["delta_m"]["std"], "rank": order.index(v) + 1}
             for v in variants}
    if "_reference" in table:
        ranks["_reference"] = {"delta_m": table["_reference"]["delta_m"]["mean"]}
    return ranks


def studies(root: Path, variant: str) -> list[dict]:
    """The variant's studies in its tuned file (the stl baseline's: one per task)."""
    chosen = json.loads((root / f"tuned/{variant}.json").read_text())
    return list(chosen.get("studies", {"": chosen}).values())


def chosen_params(root: Path, variant: str) -> dict:
    chosen = json.loads((root / f"tuned/{variant}.json").read_text())
    return chosen.get("per_task") or chosen["params"]


def trials_per_hour(root: Path, params: dict, pruner: str, variants: list[str]) -> dict:
    """Tune every variant afresh with ``pruner``; trials per hour and the states of the trials."""
    shutil.rmtree(root / ".mtl" / "tune", ignore_errors=True)
    params["tune"]["pruner"] = pruner
    set_params(root, params)
    start = time.perf_counter()  # forced: the stages are up to date when the pruner is unchanged
    for stage in ["tune-baseline", *(f"tune@{v}" for v in variants)]:
        run(["dvc", "repro", "--force", "--single-item", stage], root)
    seconds = time.perf_counter() - start
    states: dict[str, int] = {}
    for trial in (t for v in variants for study in studies(root, v) for t in study["trials"]):
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    return {"pruner": pruner, "seconds": round(seconds, 1), "states": states,
            "trials_per_hour": round(sum(states.values()) / seconds * 3600, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=[p.stem for p in (REPO / "examples").glob("*.yaml")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="most epochs of a trial")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--pruners", nargs="*", default=["median", "none"],
                        help="re-tune with each to measure trials per hour (none given: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a parameter of the example, e.g. data.source=adult:12000")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix=f"mtl-tune-{args.example}-"))
    copy_project(root)
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    params = defaults | yaml.safe_load((REPO / "examples" / f"{args.example}.yaml").read_text())
    params |= {"variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds,
               "tune": {"trials": 0, "epochs": args.epochs, "seed": 0, "pruner": "median",
                        "space": SPACE}}
    for assignment in args.overrides:
        apply_override(params, assignment)
    set_params(root, params)
    commit(root, f"tune study {args.example}")
    machine = Machine()
    untuned_s = timed_repro(root)
    untuned = ranking(root, args.variants)
    params["tune"]["trials"] = args.trials
    set_params(root, params)
    tuned_s = timed_repro(root)
    tuned = ranking(root, args.variants)
    chosen = {v: chosen_params(root, v) for v in args.variants}
    pruning = [trials_per_hour(root, params, p, args.variants) for p in args.pruners]
    result = {"command": "python bench/tune.py " + " ".join(sys.argv[1:]), "params": params,
              "untuned": {"seconds": round(untuned_s, 1), "variants": untuned},
              "tuned": {"seconds": round(tuned_s, 1), "variants": tuned, "chosen": chosen},
              "tuning": pruning, "machine": machine.finish()}
    print(json.dumps({k: result[k] for k in ("untuned", "tuned", "tuning")}, indent=2))
    print(f"-> {save_result(f'tune-{args.example}', result)}")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
