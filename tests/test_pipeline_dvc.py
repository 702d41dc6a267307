"""The whole pipeline through real DVC (`dvc repro`) in a temporary git copy of the project."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mtl import paths
from tests.helpers import BIN, REPO, env, run

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


def repro(root: Path, *targets: str) -> set[str]:
    """Run `dvc repro` (of ``targets`` and what they depend on); return the stages it ran."""
    out = run(["dvc", "repro", *targets], root).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("project"))
    edit_params(root, lambda p: (p["train"].update(FAST), p.update(seeds=[0, 1])))
    commit(root, "fast training for tests")
    ran = repro(root)
    return root, ran


@pytest.fixture
def restored_params(project):
    """The project, its params.yaml restored after the test (so tests may run in any order)."""
    root, _ = project
    original = (root / "params.yaml").read_text()
    yield root
    (root / "params.yaml").write_text(original)
    repro(root)  # the outputs of the original params again (mostly from DVC's run-cache)


def test_repro_runs_every_stage_and_compares_variants_over_seeds(project):
    root, ran = project
    variants = ["stl", "hps-ew", "hps-static"]
    assert ran == {"check", "ingest", "augment", "split", "reference", "compare", "report", "tune-baseline",
                   *(f"tune@{v}" for v in variants),  # tune.trials 0: a file saying "not tuned"
                   *(f"train@{v}-{s}" for v in variants for s in (0, 1)), *(f"evaluate@{v}" for v in variants)}
    result = json.loads((root / paths.COMPARE_JSON).read_text())
    assert result.pop("_reference")["method"] == "lightgbm"  # the default reference: its own row
    assert set(result) == set(variants)
    assert result["stl"]["delta_m"]["mean"] == pytest.approx(0.0, abs=1e-6)
    for v in variants:
        delta = result[v]["delta_m"]
        assert len(delta["per_seed"]) == 2 and delta["std"] is not None and 0 <= delta["p"] <= 1
        assert set(result[v]["tasks"]) == {"species", "sex", "body_mass"}
        assert set(result[v]["tasks"]["body_mass"]) == {"mae", "rmse", "r2"}
    seed0, seed1 = (json.loads((root / paths.variant_metrics("hps-ew", s)).read_text()) for s in (0, 1))
    assert seed0 != seed1  # the seed reaches training
    assert result["hps-ew"]["tasks"]["body_mass"]["mae"]["mean"] == pytest.approx(
        (seed0["body_mass"]["mae"] + seed1["body_mass"]["mae"]) / 2, abs=1e-4)
    assert "| `hps-ew` |" in (root / paths.REPORT).read_text()
    live = json.loads((root / "dvclive/hps-ew/seed-1/metrics.json").read_text())
    assert live["step"] == FAST["epochs"] - 1 and "train" in live and "val" in live
    info = json.loads((root / "models/hps-ew/seed-1/train.json").read_text())
    assert (info["seed"], info["epochs_run"], info["resumed_at_epoch"]) == (1, FAST["epochs"], 0)
    assert info["precision"] == ("bf16" if info["device"] == "cuda" else "fp32")
    assert not (root / ".mtl/runs/hps-ew/seed-1").exists()  # a finished run leaves no checkpoint


def test_nothing_reruns_then_one_variant_or_seed_change_reruns_only_it(restored_params):
    root = restored_params
    assert repro(root) == set()
    assert "up to date" in run(["dvc", "status"], root).stdout
    edit_params(root, lambda p: p["variants"]["hps-static"]["weights"].update(body_mass=2.0))
    assert repro(root) == {"check", "tune@hps-static", "train@hps-static-0", "train@hps-static-1",
                           "evaluate@hps-static", "compare", "report"}
    edit_params(root, lambda p: p.update(seeds=[0, 1, 2]))
    assert repro(root) == {"check", "reference", "compare", "report", "tune-baseline",  # tune: the first seed
                           *(f"tune@{v}" for v in ("stl", "hps-ew", "hps-static")),
                           *(f"{stage}@{v}{seed}" for stage, seed in (("train", "-2"), ("evaluate", ""))
                             for v in ("stl", "hps-ew", "hps-static"))}
    assert len(json.loads((root / paths.COMPARE_JSON).read_text())["hps-ew"]["delta_m"]["per_seed"]) == 3
    assert repro(root) == set()


def test_a_code_change_reruns_only_the_stages_that_run_the_changed_file(restored_params):
    """`check` fingerprints each stage command's files (mtl.codedeps); a stage depends on its
    command's fingerprint, so a change to report's module re-runs the check and the report only."""
    root = restored_params
    module = root / "mtl/stages/report.py"
    original = module.read_text()
    try:
        module.write_text(original + "# a change\n")
        assert repro(root) == {"check", "report"}
        listed = (root / paths.CODE_DIR / "report.txt").read_text()
        assert "  mtl/stages/report.py\n" in listed and "  mtl/stages/train.py\n" not in listed
        (root / "mtl/__pycache__").mkdir(exist_ok=True)
        (root / "mtl/__pycache__/extra.cpython-311.pyc").write_bytes(b"bytecode")  # .dvcignore
        assert repro(root) == set()
    finally:
        module.write_text(original)


def test_reference_none_then_lightgbm_reruns_only_the_reference_and_what_reads_it(restored_params):
    """compare.reference: none leaves the trees out of compare and the report; back to lightgbm,
    the same metrics as before (seeded, deterministic), restored without training a network."""
    root = restored_params
    before = json.loads((root / paths.REFERENCE_JSON).read_text())
    assert set(before) == {"species", "sex", "body_mass"}
    edit_params(root, lambda p: p["compare"].update(reference="none"))
    assert repro(root) == {"check", "reference", "compare", "report"}
    assert "_reference" not in json.loads((root / paths.COMPARE_JSON).read_text())
    assert "(reference)" not in (root / paths.FULL_REPORT).read_text()
    edit_params(root, lambda p: p["compare"].update(reference="lightgbm"))
    repro(root)
    assert json.loads((root / paths.REFERENCE_JSON).read_text()) == before
    report = (root / paths.FULL_REPORT).read_text()
    assert "| LightGBM (reference) |" in report and "LightGBM reference (one tree model" in report


def test_metrics_plots_and_experiments_show(project):
    root, _ = project
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(metrics.values()))["data"]
    assert set(files) == {"metrics/summary.json"}  # per-seed detail stays out of the default view
    images = {p.name for p in (root / paths.PLOTS_DIR).iterdir()}
    assert {"val_loss.png", "weights.png", "pareto.png", "affinity-hps-ew.png"} <= images
    assert "affinity-stl.png" not in images  # single-task networks share nothing to measure
    run(["dvc", "plots", "show", "-o", "plots_html"], root)
    html = (root / "plots_html/index.html").read_text()
    assert all(name in html for name in ("train/loss/species.tsv", "weight/species.tsv", "pareto.png"))
    commit(root, "results")
    header, *rows = run(["dvc", "exp", "show", "--csv"], root).stdout.splitlines()
    columns = header.split(",")
    assert {"hps-ew.delta_m", "hps-ew.sex.auroc", "variants.hps-static.weights.body_mass",
            "train.epochs"} <= set(columns)
    assert sum(c.startswith(("stl.", "hps-")) for c in columns) == 3 * 5  # Δm, p, 3 tasks' metric
    assert not any("per_seed" in c or c.endswith(".std") for c in columns)
    workspace = dict(zip(columns, next(r for r in rows if ",workspace," in r).split(",")))
    assert abs(float(workspace["stl.delta_m"])) < 1e-6
    header = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "Experiment|.*delta_m"],
                 root).stdout.splitlines()[0]  # the README's readable view
    assert set(header.split(",")) == {"Experiment", "stl.delta_m", "hps-ew.delta_m",
                                      "hps-static.delta_m", "compare.delta_m",
                                      "_reference.delta_m"}  # the trees' Δm beside the networks'
    assert float(workspace["_reference.delta_m"]) == json.loads(
        (root / paths.SUMMARY_JSON).read_text())["_reference"]["delta_m"]


def test_own_csv_data_and_appended_rows_keep_their_split(tmp_path):
    """A user's CSV under data/raw with an id column; rows appended later never change split."""
    root = copy_project(tmp_path)
    rows = ["id,colour,x,y,label,score"]
    for i in range(300):
        rows.append(f"r{i},{['red', 'green', 'blue'][i % 3]},{i % 17 / 17:.3f},{(i * 7) % 11 / 11:.3f},"
                    f"{'yes' if (i * 7) % 11 > 5 else 'no'},{i % 17 / 17 + 0.5 * (i % 3):.3f}")
    csv = root / "data/raw/mine.csv"
    csv.write_text("\n".join(rows) + "\n")
    run(["dvc", "add", "data/raw/mine.csv"], root)  # tracked by DVC, as the README says
    edit_params(root, lambda p: (
        p["data"].update(source="data/raw/*.csv", id_column="id",
                         tasks={"label": {"kind": "binary", "target": "label"},
                                "score": {"kind": "regression", "target": "score"}}),
        p["train"].update(FAST), p.update(seeds=[0]), p["variants"].pop("hps-static")))
    commit(root, "own data")
    assert repro(root, "split") == {"check", "ingest", "augment", "split"}  # not training
    before = {s: set(pq.read_table(root / paths.split_path(s))["_id"].to_pylist()) for s in ("val", "test")}
    assert before["val"] and before["test"]
    with csv.open("a") as f:
        f.writelines(f"n{i},red,0.5,0.5,yes,1.0\n" for i in range(100))
    assert repro(root, "split") == {"ingest", "augment", "split"}
    for s in ("val", "test"):
        after = set(pq.read_table(root / paths.split_path(s))["_id"].to_pylist())
        assert before[s] <= after  # every old row is still in its split


def split_ids(root: Path) -> dict[str, set[str]]:
    """The ids of the original rows in each split."""
    tables = {s: pq.read_table(root / paths.split_path(s)) for s in paths.SPLITS}
    return {s: {i for i, aug in zip(t["_id"].to_pylist(), t["_augmented"].to_pylist()) if not aug}
            for s, t in tables.items()}


def test_a_declared_split_is_honoured_and_appended_rows_keep_it(tmp_path):
    """split.column: a CSV whose column `fold` names each row's split, as an official train/test
    split does (no val rows: val is drawn from the train rows by hash); rows appended later land
    where their fold says, and every old row stays where it was."""
    root = copy_project(tmp_path)
    fold = lambda i: "test" if i % 4 == 0 else "train"
    csv = root / "data/raw/bench.csv"
    csv.write_text("id,fold,x,label\n" + "".join(
        f"r{i},{fold(i)},{i % 13 / 13:.3f},{'yes' if i % 3 else 'no'}\n" for i in range(200)))
    edit_params(root, lambda p: (
        p["data"].update(source="data/raw/*.csv", id_column="id",
                         tasks={"label": {"kind": "binary", "target": "label"}}),
        p["split"].update(column="fold", values={"train": ["train"], "test": ["test"]}, val=0.2),
        p["variants"].pop("hps-static")))
    commit(root, "a declared split")
    assert repro(root, "split") == {"check", "ingest", "augment", "split"}
    before = split_ids(root)
    assert before["test"] == {f"r{i}" for i in range(200) if fold(i) == "test"}
    assert before["val"] and len(before["val"] | before["train"]) == 150  # val: from train rows
    assert "fold" not in json.loads((root / paths.SCHEMA).read_text())["features"]
    with csv.open("a") as f:
        f.writelines(f"n{i},{fold(i)},0.5,yes\n" for i in range(40))
    assert repro(root, "split") == {"ingest", "augment", "split"}
    after = split_ids(root)
    for s in paths.SPLITS:
        assert before[s] <= after[s]  # every old row is still in its split
    assert after["test"] - before["test"] == {f"n{i}" for i in range(40) if fold(i) == "test"}
    edit_params(root, lambda p: p["split"].update(column=None))  # back to the hash split
    assert repro(root, "split") == {"check", "ingest", "augment", "split"}  # ingest: split.column
    assert "fold" in json.loads((root / paths.SCHEMA).read_text())["features"]


# --- a bad params.yaml never costs an output -------------------------------------------------------

def stage_names(root: Path) -> set[str]:
    """The stages of dvc.yaml under the current params (ask before breaking params.yaml)."""
    return set(run(["dvc", "stage", "list", "--name-only"], root).stdout.split())


def outputs(root: Path, stages: set[str]) -> dict[str, str]:
    """The content of every output of ``stages`` that dvc.lock records (and of dvc.lock), by
    path. Stages that no longer exist (a seed another test added, then removed) keep their
    dvc.lock entries, but their files are not outputs: `dvc exp run` cleans them up."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    outs = [root / out["path"] for name in stages & set(lock) for out in lock[name].get("outs", [])]
    files = [f for out in outs for f in ([out] if out.is_file() else out.rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes().hex() for p in [*files, root / "dvc.lock"]
            if p.is_file()}


def test_a_bad_params_file_stops_dvc_repro_before_any_output_is_deleted(restored_params):
    root = restored_params
    stages = stage_names(root)
    before = outputs(root, stages)
    edit_params(root, lambda p: p["train"].update(lr="fast"))
    result = run(["dvc", "repro"], root, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: train.lr: Input should be a valid number" in result.stderr
    assert re.findall(r"Running stage '([^']+)'", result.stdout) == ["check"]
    assert outputs(root, stages) == before


def test_dvc_exp_run_with_a_bad_value_deletes_no_output(restored_params):
    root = restored_params
    stages = stage_names(root)
    before = outputs(root, stages)
    result = run(["dvc", "exp", "run", "-S", "train.lr=fast"], root, check=False)
    assert result.returncode != 0 and "error: params.yaml: train.lr" in result.stderr
    assert outputs(root, stages) == before
    assert "lr: fast" in (root / "params.yaml").read_text()  # DVC leaves its change (README)


def test_a_hostile_variant_name_runs_no_shell_command(restored_params):
    root = restored_params
    hostile = "x;touch pwned;#"
    edit_params(root, lambda p: p["variants"].update({hostile: {"arch": "hps"}}))
    result = run(["dvc", "repro"], root, check=False)
    assert result.returncode != 0 and f"variants.{hostile}: variant names may hold" in result.stderr
    # Even skipping the check, the name runs no shell command: DVC stops at the missing
    # tuned/<name>.json (tune@<name> never ran), and were it there, the quoted name would reach
    # `mtl train` as one argument, which refuses it.
    result = run(["dvc", "repro", "--single-item", f"train@{hostile}-0"], root, check=False)
    assert result.returncode != 0 and f"tuned/{hostile}.json" in result.stderr
    result = run(["mtl", "train", "--variant", hostile, "--seed", "0"], root, check=False)
    assert result.returncode == 2 and f"variants.{hostile}: variant names" in result.stderr
    assert not (root / "pwned").exists()


def test_make_run_refuses_an_alias_bomb_in_seconds_before_dvc_starts(restored_params):
    root = restored_params
    stages = stage_names(root)
    before = outputs(root, stages)
    bomb = ["lol: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n".join(bomb) + "\n")
    start = time.monotonic()
    result = subprocess.run(["make", "-o", "setup", "run", f"VENV={BIN.parent}"], cwd=root,
                            env=env(), capture_output=True, text=True, check=False,
                            timeout=120)  # DVC's own parser would take hours
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert "error: params.yaml: more than 100,000 values once its aliases are expanded" in result.stderr
    assert "dvc repro" not in result.stdout
    assert outputs(root, stages) == before


def test_a_grouped_variant_is_chosen_trained_compared_and_rechosen(restored_params):
    """arch: groups (issue 16): group@<variant> chooses the groups from the `from` variant's
    affinity.json files; they are trained and compared, and a change upstream re-chooses them."""
    root = restored_params
    grouped = {"tag": {"arch": "groups", "arch_options": {"groups": {"from": "hps-ew", "max_groups": 2}}}}
    edit_params(root, lambda p: p.update(grouped=grouped))
    assert repro(root) == {"check", "group@tag", "compare", "report",
                           *(f"train_grouped@tag-{s}" for s in (0, 1)), "evaluate_grouped@tag"}
    chosen = json.loads((root / "groupings/tag.json").read_text())
    assert chosen["from"] == "hps-ew" and chosen["seeds"] == [0, 1] and len(chosen["runners_up"]) == 3
    assert 1 <= len(chosen["groups"]) <= 2
    assert sorted(t for g in chosen["groups"] for t in g) == ["body_mass", "sex", "species"]
    info = json.loads((root / "models/tag/seed-1/train.json").read_text())
    assert info["groups"] == chosen["groups"] and info["grouping"] == chosen
    table = json.loads((root / paths.COMPARE_JSON).read_text())
    assert table["tag"]["groups"] == chosen["groups"] and "groups" not in table["hps-ew"]
    shown = " ".join("{" + ", ".join(g) + "}" for g in chosen["groups"])
    assert f"| `tag` {shown} |" in (root / paths.REPORT).read_text()
    assert f"affinity chose the groups {shown} (TAG), trained as `tag`" in (
        root / paths.FULL_REPORT).read_text()

    edit_params(root, lambda p: p["variants"]["hps-ew"].update(weighting="uw"))
    ran = repro(root)
    assert {"train@hps-ew-0", "group@tag", "train_grouped@tag-0", "compare"} <= ran
    assert not any("stl" in stage or "static" in stage for stage in ran)
    assert json.loads((root / "groupings/tag.json").read_text())["score"] != chosen["score"]
    for folder in ("models/tag", "dvclive/tag", "metrics/variants/tag", "groupings"):
        shutil.rmtree(root / folder)


@pytest.mark.parametrize("example", sorted(p.stem for p in (REPO / "examples").glob("*.yaml")))
def test_each_example_has_every_section_that_dvc_reads(example):
    """docs/data.md: copy an example to params.yaml for `dvc repro`, so each has every top-level
    section that a stage of dvc.yaml lists in ``params`` or loops over with ``foreach``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    read = {s["foreach"].strip("${}") for s in stages.values() if "foreach" in s}
    for stage in stages.values():
        for param in stage.get("do", stage).get("params", []):
            read.add(re.split(r"[.$]", param, maxsplit=1)[0])
    params = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    assert read - set(params) == set()
