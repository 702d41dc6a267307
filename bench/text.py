"""The hashed text encoder's settings, measured on a long and a short text (tweets).

    python bench/text.py                          # defaults: --rows 6000 --seeds 0 1 --epochs 30
    python bench/text.py --cases short --settings "old default" "2^12 x 16"

Each case trains ``stl`` and ``hps-ew`` on the first ``--rows`` tweets of ../shared/data for
each encoder setting and seed, in-process (ingest and split once a case, then train and
evaluate; torch at 1 thread), with early stopping (``--patience``) on the validation loss:

- ``long``: the tweet's whole text is the only feature (about 20 words a row);
- ``short``: a title, the tweet's first 4 words, next to 6 numeric features counted on the
  whole tweet (words, characters, hashtags, mentions, links, exclamation marks); the setting
  ``no text`` trains on the numeric features alone, the reference for "does the title help".

The tasks are the tweets example's: the device (multiclass), log retweets and log favourites
(regression). Per case, setting and variant it prints, as the mean over seeds, the test
metric that Δm counts by default for each task (AUROC, MAE), Δm in % against the case's
reference setting, the best validation epoch (from 1; the mean over tasks and seeds) and the
training time; the table goes to stdout and bench/results/text-<host>.json. A setting
``WxD`` is ``encoders.hashing.buckets`` W and ``encoders.hashing.dim`` D; the rest as
``OLD``, the defaults before this measurement; ``new default`` is the current defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from mtl import paths
from mtl.config import Params, apply_override
from mtl.io import read_json
from mtl.sources import tweets
from mtl.stages import augment, compare, evaluate, ingest, split, train

OLD = {"buckets": 2**16, "word_ngrams": [1, 2], "char_ngrams": [3, 5], "max_tokens": 512, "dim": 32}


def hashing(**change) -> dict:
    """Overrides setting ``encoders.hashing`` to the old defaults with ``change``."""
    return {"encoders.hashing": OLD | change}


SETTINGS = {  # name -> overrides of params; "no text" trains on the short case's numbers alone
    "old default": hashing(),
    "2^12 x 32": hashing(buckets=2**12),
    "2^12 x 16": hashing(buckets=2**12, dim=16),
    "2^16 x 32, words only": hashing(char_ngrams=None),
    "2^12 x 16, words only": hashing(buckets=2**12, dim=16, char_ngrams=None),
    "2^10 x 16": hashing(buckets=2**10, dim=16),
    "2^12 x 8": hashing(buckets=2**12, dim=8),
    "2^12 x 16, 64 tokens": hashing(buckets=2**12, dim=16, max_tokens=64),
    "2^16 x 32, dropout 0.3": hashing() | {"train.dropout": 0.3},
    "2^16 x 32, weight decay 0.01": hashing() | {"train.weight_decay": 0.01},
    "new default": {},
    "no text": {},
}
REFERENCE = {"long": "old default", "short": "no text"}
VARIANTS = {"stl": {"arch": "stl", "weighting": "ew"}, "hps-ew": {"arch": "hps", "weighting": "ew"}}
TASKS = {"source": {"kind": "multiclass", "target": "source"},
         "retweets": {"kind": "regression", "target": "log_retweets"},
         "favorites": {"kind": "regression", "target": "log_favorites"}}
COUNTS = {"n_words": r"\S+", "n_chars": r".", "n_hashtags": r"#\w", "n_mentions": r"@\w",
          "n_links": r"https?://", "n_exclaims": r"!"}


def write_cases(rows: int, root: Path) -> None:
    """The long and short tables of the first ``rows`` tweets, as Parquet under ``root``."""
    table = tweets(rows)
    texts = [t or "" for t in table["text"].to_pylist()]
    pq.write_table(table, root / "long.parquet")
    short = table.drop_columns(["text"]).append_column(
        "title", pa.array([" ".join(t.split()[:4]) for t in texts]))
    for name, pattern in COUNTS.items():
        counts = [float(len(re.findall(pattern, t))) for t in texts]
        short = short.append_column(name, pa.array(counts))
    pq.write_table(short, root / "short.parquet")


def params(case: str, setting: str, seeds: list[int], epochs: int, patience: int) -> Params:
    raw = {"data": {"source": f"{case}.parquet", "id_column": "id", "tasks": TASKS,
                    "text": [] if setting == "no text" else ["text" if case == "long" else "title"],
                    "drop": ["title"] if setting == "no text" else []},
           "augment": {"copies": 0}, "split": {"val": 0.1, "test": 0.2},
           "train": {"epochs": epochs, "batch_size": 256, "hidden": [64], "head_hidden": [32],
                     "patience": patience, "affinity_batches": 0, "device": "cpu"},
           "seeds": seeds, "variants": VARIANTS}
    for key, value in SETTINGS[setting].items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return Params.model_validate(raw)


def measure(case: str, setting: str, seeds: list[int], epochs: int, patience: int) -> dict:
    """Train and evaluate every variant and seed of one setting; its rows of the table."""
    p = params(case, setting, seeds, epochs, patience)
    for stage in (ingest, augment, split):
        stage.run(p)
    out = {}
    for variant in VARIANTS:
        runs = []
        for seed in seeds:
            with contextlib.redirect_stdout(None):
                train.run(p, variant, seed)
                evaluate.run(p, variant, seed)
            info = read_json(paths.model_dir(variant, seed) / "train.json")
            runs.append({"metrics": read_json(paths.variant_metrics(variant, seed)),
                         "best_epoch": statistics.mean(info["best_epochs"].values()) + 1,
                         "epochs_run": info["epochs_run"], "seconds": info["train_seconds"]})
        out[variant] = runs
    return out


def table(case: str, results: dict, kinds: dict[str, str]) -> str:
    """Markdown: per setting and variant, the primary metrics, Δm against the reference (the mean
    and each seed's), the best epoch, the epochs run and the seconds, means over seeds."""
    mean = statistics.mean
    primary = {t: [compare.PRIMARY[k]] for t, k in kinds.items()}
    head = " | ".join(f"{t} {m[0]}" for t, m in primary.items())
    lines = [f"**{case}** (Δm against `{REFERENCE[case]}` of the same variant)", "",
             f"| setting | variant | {head} | Δm % (per seed) | best epoch | epochs run | s |",
             "|---|---|" + "---|" * (len(primary) + 4)]
    for setting, per_variant in results.items():
        for variant, runs in per_variant.items():
            reference = results[REFERENCE[case]][variant]
            base = {t: {m[0]: mean(r["metrics"][t][m[0]] for r in reference)}
                    for t, m in primary.items()}
            dms = [compare.delta_m(r["metrics"], base, primary) for r in runs]
            cells = [f"{mean(r['metrics'][t][m[0]] for r in runs):.4f}" for t, m in primary.items()]
            cells.append(f"{mean(dms):+.2f} ({', '.join(f'{d:+.2f}' for d in dms)})")
            cells += [f"{mean(r[k] for r in runs):.1f}"
                      for k in ("best_epoch", "epochs_run", "seconds")]
            lines.append(f"| {setting} | `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=list(REFERENCE), default=list(REFERENCE))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = Machine()
    kinds = {t: spec["kind"] for t, spec in TASKS.items()}
    results, text = {}, ""
    with tempfile.TemporaryDirectory(prefix="mtl-bench-text-") as tmp:
        os.chdir(tmp)
        write_cases(args.rows, Path(tmp))
        for case in args.cases:
            settings = [s for s in args.settings if s != "no text" or case == "short"]
            settings = list(dict.fromkeys([REFERENCE[case], *settings]))
            results[case] = {}
            for setting in settings:
                start = time.perf_counter()
                results[case][setting] = measure(case, setting, args.seeds, args.epochs,
                                                 args.patience)
                print(f"{case} / {setting}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            text += table(case, results[case], kinds) + "\n"
    command = shlex.join(["python", "bench/text.py", *sys.argv[1:]])
    save_result("text", {"command": command, "machine": machine.finish(), "args": vars(args),
                            "settings": SETTINGS, "results": results})
    print(text + f"Regenerate: `{command}`; {machine.info['total_s'] / 60:.1f} min on "
          f"{machine.info['cpu']} (other load {machine.info['other_load_cores']} cores).")


if __name__ == "__main__":
    main()
