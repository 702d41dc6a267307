"""The whole pipeline through real DVC (`dvc repro`) in a temporary git copy of the project."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mtl import paths
from tests.helpers import REPO, run

pytestmark = pytest.mark.slow
FAST = {"epochs": 4, "patience": 0, "hidden": [16], "head_hidden": [8]}


def copy_project(dest: Path) -> Path:
    """The project's files (tracked or new, not ignored) in a fresh git repository with one commit."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() and not name.startswith(("tests/", "bench/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q")
    commit(dest, "copy of the project")
    return dest


def git(cwd: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd).stdout


def commit(cwd: Path, message: str) -> None:
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "--allow-empty", "-m", message)


def edit_params(root: Path, change) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(root: Path) -> set[str]:
    """Run `dvc repro`; return the stages it ran."""
    out = run(["dvc", "repro"], root).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("project"))
    edit_params(root, lambda p: p["train"].update(FAST))
    commit(root, "fast training for tests")
    ran = repro(root)
    return root, ran


def test_repro_runs_every_stage_and_compares_variants(project):
    root, ran = project
    variants = ["stl", "hps-ew", "hps-static"]
    assert ran == {"ingest", "augment", "split", "compare",
                   *(f"{stage}@{v}" for stage in ("train", "evaluate") for v in variants)}
    result = json.loads((root / paths.COMPARE_JSON).read_text())
    assert set(result) == set(variants)
    assert result["stl"]["delta_m"] == 0.0
    for v in variants:
        assert isinstance(result[v]["delta_m"], float)
        assert set(result[v]["tasks"]) == {"species", "sex", "body_mass"}
        assert set(result[v]["tasks"]["body_mass"]) == {"mae", "rmse", "r2"}
    assert "| `hps-ew` |" in (root / paths.REPORT).read_text()
    live = json.loads((root / "dvclive/hps-ew/metrics.json").read_text())
    assert live["step"] == FAST["epochs"] - 1 and "train" in live and "val" in live


def test_nothing_reruns_then_one_variant_change_reruns_only_it(project):
    root, _ = project
    assert repro(root) == set()
    assert "up to date" in run(["dvc", "status"], root).stdout
    edit_params(root, lambda p: p["variants"]["hps-static"]["weights"].update(body_mass=2.0))
    assert repro(root) == {"train@hps-static", "evaluate@hps-static", "compare"}
    assert repro(root) == set()


def test_metrics_plots_and_experiments_show(project):
    root, _ = project
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(metrics.values()))["data"]
    assert {"metrics/compare.json", "metrics/variants/stl.json", "dvclive/hps-ew/metrics.json"} <= set(files)
    run(["dvc", "plots", "show", "-o", "plots_html"], root)
    html = (root / "plots_html/index.html").read_text()
    assert "train/loss/species.tsv" in html
    commit(root, "results")
    header, *rows = run(["dvc", "exp", "show", "--csv"], root).stdout.splitlines()
    columns = header.split(",")
    assert {"hps-ew.delta_m", "variants.hps-static.weights.body_mass",
            "train.epochs"} <= set(columns)
    workspace = dict(zip(columns, next(r for r in rows if ",workspace," in r).split(",")))
    assert float(workspace["stl.delta_m"]) == 0.0


def test_train_resumes_from_its_checkpoint(project):
    """`mtl train --resume` continues from the checkpoint `dvc repro` left (4 epochs) and ends
    as a 6-epoch run from scratch; a checkpoint of other options is refused. Runs last on
    `project`, whose outputs it changes."""
    root, _ = project
    model_dir, six = root / "models/hps-ew", ["--variant", "hps-ew", "--set", "train.epochs=6"]
    assert "resumed at epoch 4" in run(["mtl", "train", *six, "--resume"], root).stdout
    info = json.loads((model_dir / "train.json").read_text())
    assert (info["epochs_run"], info["resumed_at_epoch"]) == (6, 4)
    assert info["precision"] == ("bf16" if info["device"] == "cuda" else "fp32")
    assert info["deterministic"] is False
    assert json.loads((root / "dvclive/hps-ew/metrics.json").read_text())["step"] == 5
    resumed = torch.load(model_dir / "model.pt", weights_only=True)["state_dict"]
    run(["mtl", "train", *six], root)
    fresh = torch.load(model_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    failed = run(["mtl", "train", *six, "--set", "train.lr=0.1", "--resume"], root, check=False)
    assert failed.returncode == 2 and failed.stderr.startswith("error: --resume: ")
    assert "lr=" in failed.stderr and len(failed.stderr.splitlines()) == 1


def test_own_csv_data_and_appended_rows_keep_their_split(tmp_path):
    """A user's CSV under data/raw with an id column; rows appended later never change split."""
    root = copy_project(tmp_path)
    rows = ["id,colour,x,y,label,score"]
    for i in range(300):
        rows.append(f"r{i},{['red', 'green', 'blue'][i % 3]},{i % 17 / 17:.3f},{(i * 7) % 11 / 11:.3f},"
                    f"{'yes' if (i * 7) % 11 > 5 else 'no'},{i % 17 / 17 + 0.5 * (i % 3):.3f}")
    csv = root / "data/raw/mine.csv"
    csv.write_text("\n".join(rows) + "\n")
    edit_params(root, lambda p: (
        p["data"].update(source="data/raw/*.csv", id_column="id",
                         tasks={"label": {"kind": "binary", "target": "label"},
                                "score": {"kind": "regression", "target": "score"}}),
        p["train"].update(FAST),
        p["variants"]["hps-static"].update(weights={"label": 1.0, "score": 0.5})))
    commit(root, "own data")
    assert "ingest" in repro(root)
    before = {s: set(pq.read_table(root / paths.split_path(s))["_id"].to_pylist()) for s in ("val", "test")}
    assert before["val"] and before["test"]
    with csv.open("a") as f:
        f.writelines(f"n{i},red,0.5,0.5,yes,1.0\n" for i in range(100))
    assert {"ingest", "augment", "split", "compare"} <= repro(root)
    for s in ("val", "test"):
        after = set(pq.read_table(root / paths.split_path(s))["_id"].to_pylist())
        assert before[s] <= after  # every old row is still in its split
    assert json.loads((root / paths.COMPARE_JSON).read_text())["hps-ew"]["delta_m"] is not None
