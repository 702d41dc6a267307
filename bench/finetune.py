"""Fine-tuned MiniLM against frozen MiniLM and hashed text, on tweets (issue 17).

    python bench/finetune.py                      # defaults: --rows 1500 --seeds 0 --epochs 4
    python bench/finetune.py --rows 20761 --seeds 0 1 2 --epochs 8 --threads 16   # full size

Trains ``stl`` and ``hps-ew`` on the first ``--rows`` tweets of ../shared/data (the tweet's text
the only feature; the tweets example's tasks: device, log retweets, log favourites), in-process
(ingest and split once, then train and evaluate; torch at ``--threads`` threads, CPU), for each
text encoder: ``hashed`` (the defaults), ``minilm frozen``, and ``minilm top N`` (the top
``--layers`` layers fine-tuned, ``finetune.max_length`` ``--max-length``). Prints, as the mean
over seeds, each task's test metric that Δm counts (AUROC, MAE), Δm in % against ``stl`` with
hashed text, and the seconds per epoch (training and validation); the table goes to stdout and
bench/results/finetune-<host>.json with the machine's load (``Machine``), rewritten after each
encoder setting. Fine-tuning on a CPU is slow: ``stl`` runs three transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from bench.text import TASKS, VARIANTS
from mtl import paths
from mtl.config import Params
from mtl.io import read_json
from mtl.sources import tweets
from mtl.stages import augment, compare, evaluate, ingest, split, train

REFERENCE = ("hashed", "stl")


def settings(layers: int, max_length: int) -> dict[str, dict]:
    """Setting name -> its ``encoders`` section."""
    return {"hashed": {}, "minilm frozen": {"text": "minilm"},
            f"minilm top {layers}": {"text": "minilm",
                                     "finetune": {"layers": layers, "max_length": max_length}}}


def params(encoders: dict, seeds: list[int], epochs: int) -> Params:
    return Params.model_validate({
        "data": {"source": "tweets.parquet", "id_column": "id", "tasks": TASKS, "text": ["text"]},
        "augment": {"copies": 0}, "split": {"val": 0.1, "test": 0.2},
        "train": {"epochs": epochs, "batch_size": 64, "hidden": [64], "head_hidden": [32],
                  "patience": 0, "affinity_batches": 0, "device": "cpu"},
        "seeds": seeds, "variants": VARIANTS, "encoders": encoders})


def measure(p: Params) -> dict:
    """Train and evaluate every variant and seed; per variant, one record a seed."""
    for stage in (ingest, augment, split):
        stage.run(p)
    out = {}
    for variant in VARIANTS:
        out[variant] = []
        for seed in p.seeds:
            with contextlib.redirect_stdout(None):
                train.run(p, variant, seed, resume=False)
                evaluate.run(p, variant, seed)
            info = read_json(paths.model_dir(variant, seed) / "train.json")
            out[variant].append({"metrics": read_json(paths.variant_metrics(variant, seed)),
                                 "s_per_epoch": info["train_seconds"] / info["epochs_run"]})
    return out


def table(results: dict) -> str:
    """Markdown: per setting and variant, the primary metrics, Δm against ``REFERENCE`` (mean
    and each seed's) and seconds per epoch, means over seeds."""
    mean = statistics.mean
    primary = {t: [compare.PRIMARY[spec["kind"]]] for t, spec in TASKS.items()}
    reference = results[REFERENCE[0]][REFERENCE[1]]
    base = {t: {m[0]: mean(r["metrics"][t][m[0]] for r in reference)} for t, m in primary.items()}
    head = " | ".join(f"{t} {m[0]}" for t, m in primary.items())
    lines = [f"| text | variant | {head} | Δm % (per seed) | s / epoch |",
             "|---|---|" + "---|" * (len(primary) + 2)]
    for setting, per_variant in results.items():
        for variant, runs in per_variant.items():
            dms = [compare.delta_m(r["metrics"], base, primary) for r in runs]
            cells = [f"{mean(r['metrics'][t][m[0]] for r in runs):.4f}" for t, m in primary.items()]
            cells += [f"{mean(dms):+.2f} ({', '.join(f'{d:+.2f}' for d in dms)})",
                      f"{mean(r['s_per_epoch'] for r in runs):.1f}"]
            lines.append(f"| {setting} | `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = Machine()
    command = shlex.join(["python", "bench/finetune.py", *sys.argv[1:]])
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtl-bench-finetune-") as tmp:
        os.chdir(tmp)
        pq.write_table(tweets(args.rows), Path(tmp) / "tweets.parquet")
        for name, encoders in settings(args.layers, args.max_length).items():
            results[name] = measure(params(encoders, args.seeds, args.epochs))
            save_result("finetune", {"command": command, "machine": machine.finish(),
                                     "args": vars(args), "results": results})  # so far
            print(f"{name}: done", file=sys.stderr)
    print(table(results) + f"\nRegenerate: `{command}`; {machine.info['total_s'] / 60:.1f} min on "
          f"{machine.info['cpu']} ({args.threads} threads; other load "
          f"{machine.info['other_load_cores']} cores).")


if __name__ == "__main__":
    main()
