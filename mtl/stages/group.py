"""group@<variant>: the task groups of a ``grouped`` variant, chosen from the task affinity of
the variant it names (``arch_options.groups.from``): ``models/<from>/seed-<seed>/affinity.json``
of every seed, averaged (less ``standard_errors`` standard errors of the mean, if set), then the
partition of the tasks into at most ``max_groups`` groups with the best TAG score
(``mtl.engine.grouping``) -> ``groupings/<variant>.json`` (the groups, their score and the
runners-up), which ``train_grouped@<variant>-<seed>`` reads."""

from __future__ import annotations

from mtl import paths
from mtl.config import Params
from mtl.engine.affinity_summary import from_json, lower_bound
from mtl.engine.grouping import choose
from mtl.errors import UserError
from mtl.io import read_json, write_json


def run(params: Params, variant: str) -> None:
    result = chosen(params, variant)
    write_json(result, paths.grouping(variant))
    print(f"group@{variant}: {result['groups']} (score {result['score']:.3g}) -> "
          f"{paths.grouping(variant)}")


def chosen(params: Params, variant: str) -> dict:
    """The grouping of ``variant`` (in ``grouped``) from its source's affinity.json files."""
    if variant not in params.grouped:
        raise UserError(f"--variant: '{variant}' is not in grouped (known: "
                        f"{', '.join(params.grouped) or 'none'})")
    source = params.grouped[variant].arch_options["groups"]
    tasks = list(params.data.tasks)
    files = [paths.model_dir(source["from"], seed) / "affinity.json" for seed in params.seeds]
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: missing; train the variant '{source['from']}' first "
                            f"(dvc repro train@{source['from']}-<seed>)")
    runs = [read_json(file) for file in files]
    if any(not isinstance(r, dict) or r.get("tasks") != tasks for r in runs):
        raise UserError(f"{files[0].parent.parent}: affinity.json not of the tasks {tasks}; "
                        f"re-train the variant '{source['from']}'")
    margin = source.get("standard_errors", 0)
    z = lower_bound([from_json(r["lookahead"]) for r in runs], margin)
    most = source.get("max_groups", len(tasks))
    ranked = [{"groups": [[tasks[i] for i in g] for g in groups], "score": score}
              for score, groups in choose(z, most)]
    return {"from": source["from"], "seeds": params.seeds, "max_groups": most,
            "standard_errors": margin, **ranked[0], "runners_up": ranked[1:]}


def read_groups(params: Params, variant: str) -> list[list[str]]:
    """The groups of ``variant``: its ``arch_options.groups`` list, or for a ``grouped`` variant
    the groups ``group@<variant>`` chose."""
    groups = params.all_variants[variant].arch_options["groups"]
    if isinstance(groups, list):
        return groups
    path = paths.grouping(variant)
    found = read_json(path)
    if not isinstance(found, dict) or found.get("from") != groups["from"]:
        raise UserError(f"{path}: not the grouping of '{variant}' from '{groups['from']}'; "
                        f"run mtl group --variant {variant}")
    return found["groups"]
