"""Where each stage reads and writes, relative to the project root (as declared in dvc.yaml)."""

from pathlib import Path

CHECKED = Path("data/checked/params.ok")  # check: its stamp, which every other stage depends on
CODE_DIR = Path("data/checked/code")  # check: <command>.txt, the files each stage command runs
INGESTED_DIR = Path("data/ingested")  # ingest: <split>.parquet, the rows bound for each split
SCHEMA = INGESTED_DIR / "schema.json"
AUGMENTED_DIR = Path("data/augmented")  # augment: <split>.parquet, train with its copies
SPLIT_DIR = Path("data/split")
SPLITS = ("train", "val", "test")
METRICS_DIR = Path("metrics/variants")
REFERENCE_JSON = Path("metrics/reference.json")  # reference: the gradient-boosted trees' test metrics
REFERENCE_SKIPPED = "_skipped"  # its only key when no trees were trained (no task name starts with _)
GROUPS = "_groups"  # evaluate: an ``arch: groups`` model's groups beside its tasks' metrics
                    # (never a task name: those start with a letter or digit)
COMPARE_JSON = Path("metrics/compare.json")  # compare: every metric, per seed too
SUMMARY_JSON = Path("metrics/summary.json")  # compare: what DVC shows as metrics (Δm, primary metrics)
REPORT = Path("reports/compare.md")
PLOTS_DIR = Path("reports/plots")  # report: the PNG images
FULL_REPORT = Path("reports/report.md")  # report: comparison, plots and affinity in Markdown
REPORT_HTML = Path("reports/index.html")  # report: the same as a web page
TUNED_DIR = Path("tuned")  # tune: the chosen params of each variant, which train applies
TUNED_BASELINE = TUNED_DIR / "_baseline.json"  # tune-baseline: the baseline's, whose validation
#   metrics the other variants' objective is measured against (no variant name starts with _)
WORK_DIR = Path(".mtl")  # scratch space of unfinished runs, stage locks, encoded splits; never tracked
ENCODED_DIR = WORK_DIR / "encoded"  # train: the splits encoded once, one folder per data hash

# Reserved columns written by ingest and augment.
ID = "_id"  # stable key of the row
SOURCE_ID = "_source_id"  # id of the original row an augmented row came from (its own id otherwise)
AUGMENTED_FLAG = "_augmented"
RESERVED = (ID, SOURCE_ID, AUGMENTED_FLAG)


def split_path(split: str) -> Path:
    return SPLIT_DIR / f"{split}.parquet"


def ingested_path(split: str) -> Path:
    return INGESTED_DIR / f"{split}.parquet"


def augmented_path(split: str) -> Path:
    return AUGMENTED_DIR / f"{split}.parquet"


def model_dir(variant: str, seed: int) -> Path:
    return Path("models") / variant / f"seed-{seed}"


def live_dir(variant: str, seed: int) -> Path:
    return Path("dvclive") / variant / f"seed-{seed}"


def variant_metrics(variant: str, seed: int) -> Path:
    return METRICS_DIR / variant / f"seed-{seed}.json"


def run_dir(variant: str, seed: int) -> Path:
    """Where an unfinished training run keeps its checkpoint and logs: outside every DVC output,
    so that a killed ``dvc repro`` resumes there instead of starting afresh."""
    return WORK_DIR / "runs" / variant / f"seed-{seed}"


def grouping(variant: str) -> Path:
    """group@<variant>: the groups chosen for a variant of the ``grouped`` section."""
    return Path("groupings") / f"{variant}.json"


def tuned_path(variant: str) -> Path:
    return TUNED_DIR / f"{variant}.json"


def study_path(variant: str) -> Path:
    """tune: the Optuna journal of the variant's study, outside DVC outputs, so a killed tune resumes."""
    return WORK_DIR / "tune" / f"{variant}.log"
