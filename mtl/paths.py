"""Where each stage reads and writes, relative to the project root (as declared in dvc.yaml)."""

from pathlib import Path

INGESTED = Path("data/ingested/table.parquet")
SCHEMA = Path("data/ingested/schema.json")
AUGMENTED = Path("data/augmented/table.parquet")
SPLIT_DIR = Path("data/split")
SPLITS = ("train", "val", "test")
METRICS_DIR = Path("metrics/variants")
COMPARE_JSON = Path("metrics/compare.json")
REPORT = Path("reports/compare.md")

# Reserved columns written by ingest and augment.
ID = "_id"  # stable key of the row
SOURCE_ID = "_source_id"  # id of the original row an augmented row came from (its own id otherwise)
AUGMENTED_FLAG = "_augmented"
RESERVED = (ID, SOURCE_ID, AUGMENTED_FLAG)


def split_path(split: str) -> Path:
    return SPLIT_DIR / f"{split}.parquet"


def model_dir(variant: str) -> Path:
    return Path("models") / variant


def live_dir(variant: str) -> Path:
    return Path("dvclive") / variant


def variant_metrics(variant: str) -> Path:
    return METRICS_DIR / f"{variant}.json"
