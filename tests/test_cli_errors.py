"""End to end through the real CLI (``python -m mtl`` in a subprocess): a user's mistake prints one
line ``error: ...`` naming the key, column or file, exits 2, shows no traceback and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

DEFAULT_PARAMS = REPO / "params.yaml"
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}

SMALL_CSV = "a,b,y\n" + "".join(
    f"{i},{(i * 7) % 5 + 0.5},{'xyz'[i % 3]}\n" for i in range(12))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A bare project directory: a copy of params.yaml, an empty data/raw/ and a small CSV."""
    shutil.copy(DEFAULT_PARAMS, tmp_path / "params.yaml")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "small.csv").write_text(SMALL_CSV, encoding="utf-8")
    return tmp_path


def mtl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtl", *args], cwd=cwd, env=ENV, check=False,
                          capture_output=True, text=True, timeout=120)


def csv_task(kind: str, target: str = "y") -> list[str]:
    """``--set`` overrides pointing the pipeline at data/raw/small.csv with one task ``t``."""
    return ["--set", "data.source=data/raw/small.csv",
            "--set", f"data.tasks={{t: {{kind: {kind}, target: {target}}}}}",
            "--set", "variants.hps-static.weights={t: 1.0}"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its kind, size and mtime."""
    listing = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        listing[str(path.relative_to(root))] = (
            ("dir", st.st_mtime_ns) if path.is_dir() else ("file", st.st_size, st.st_mtime_ns))
    return listing


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("error:"), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


CASES = {
    "unknown-train-key": (["ingest", "--set", "train.bogus=1"], ["train.bogus"]),
    "missing-target-column": (["ingest", "--set", "data.tasks.species.target=no_such_column"],
                              ["data.tasks.species.target", "no_such_column"]),
    "unknown-variant": (["train", "--variant", "nope"], ["--variant", "nope"]),
    "source-matches-nothing": (["ingest", "--set", "data.source=missing/*.csv"],
                               ["data.source", "missing/*.csv"]),
    "unknown-arch": (["ingest", "--set", "variants.hps-ew.arch=transformer"],
                     ["variants.hps-ew.arch", "transformer"]),
    "binary-with-3-classes": (["ingest", *csv_task("binary")], ["data.tasks.t.target", "'y'"]),
    "evaluate-before-train": (["evaluate", "--variant", "hps-ew"], ["models/hps-ew/model.pt"]),
    "set-without-equals": (["ingest", "--set", "train.epochs"], ["train.epochs"]),
    "set-into-non-section": (["ingest", "--set", "train.epochs.x=1"], ["train.epochs.x"]),
    "missing-params-file": (["ingest", "--params", "nowhere.yaml"], ["nowhere.yaml"]),
}


@pytest.mark.parametrize(("args", "names"), list(CASES.values()), ids=list(CASES))
def test_user_error(project: Path, args: list[str], names: list[str]) -> None:
    before = snapshot(project)
    result = mtl(project, *args)
    assert_user_error(result, *names)
    assert result.stdout == ""
    assert snapshot(project) == before, "a failed command changed the project directory"


def test_params_is_a_folder(project: Path) -> None:
    (project / "conf").mkdir()
    before = snapshot(project)
    result = mtl(project, "ingest", "--params", "conf")
    assert_user_error(result, "conf")
    assert snapshot(project) == before


def test_failed_ingest_keeps_previous_output(project: Path) -> None:
    first = mtl(project, "ingest", *csv_task("multiclass"))
    assert first.returncode == 0, first.stderr
    table = project / "data" / "ingested" / "table.parquet"
    schema = project / "data" / "ingested" / "schema.json"
    table_bytes, schema_bytes = table.read_bytes(), schema.read_bytes()
    assert json.loads(schema_bytes)["tasks"]["t"]["classes"] == ["x", "y", "z"]
    before = snapshot(project)

    result = mtl(project, "ingest", *csv_task("multiclass", target="no_such_column"))
    assert_user_error(result, "data.tasks.t.target", "no_such_column")
    assert table.read_bytes() == table_bytes
    assert schema.read_bytes() == schema_bytes
    assert snapshot(project) == before


def test_methods_json(tmp_path: Path) -> None:
    result = mtl(tmp_path, "methods", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert {"architectures", "weightings"} <= set(listing)
    assert {"hps", "stl"} <= set(listing["architectures"])
    assert {"ew", "static"} <= set(listing["weightings"])
