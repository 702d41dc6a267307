"""Faults and reproducibility: non-finite losses, one run of a stage at a time, what killed runs
leave behind, a full disk, read-only outputs, identical results from identical runs, and a
killed training run that resumes."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mtl import io as mtl_io
from mtl import paths
from mtl.config import load_params
from mtl.engine import weighting
from mtl.engine.trainer import FitOptions, NonFiniteLoss, TaskData, fit
from mtl.errors import UserError
from mtl.lock import stage_lock
from mtl.stages import augment, encoded, ingest, split
from tests.helpers import REPO, env, run
from tests.test_engine import TASKS, make_bundle, make_table
from tests.test_pipeline_dvc import FAST, commit, copy_project, edit_params

NAMES = [t.name for t in TASKS]
BATCH, POISONED = 16, 5  # the row whose regression target overflows the loss


def options(**kw) -> FitOptions:
    return FitOptions(**({"epochs": 6, "batch_size": BATCH, "lr": 1e-2, "seed": 0,
                          "progress": False} | kw))


def poisoned(rows: list[int] | slice) -> TaskData:
    """The test table with an enormous ``size`` target in ``rows``: its squared error is inf."""
    table = make_table()
    data = TaskData.from_table(table, make_bundle("hps", table).preprocessor, TASKS)
    data.targets["size"] = data.targets["size"].clone()
    data.targets["size"][rows] = 1e30
    return data


def train(data: TaskData, checkpoint=None, resume=False, **kw):
    """Train on ``data``, validate on the clean table."""
    model, logs = make_bundle("hps", make_table()).model, []
    result = fit(model, TASKS, weighting.build("ew", NAMES), data, poisoned([]), options(**kw),
                 on_epoch=lambda e, log: logs.append(log), checkpoint=checkpoint, resume=resume)
    return model, result, logs


def step_of(row: int, n: int, epoch: int) -> int:
    """The step of ``epoch`` whose batch holds ``row`` (the trainer's batch order for seed 0)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(epoch + 1):
        batches = torch.randperm(n, generator=generator).split(BATCH)
    return next(i for i, b in enumerate(batches) if row in b.tolist())


# --- non-finite losses -----------------------------------------------------------------------------

def test_an_overflowing_loss_stops_naming_the_task_epoch_and_step(tmp_path):
    data = poisoned([POISONED])
    step = step_of(POISONED, len(data), epoch=0)
    with pytest.raises(NonFiniteLoss, match=re.escape(
            f"non-finite loss in task 'size' at epoch 0, step {step} (inf); lower train.lr")):
        train(data)
    # Two clean epochs, then the poisoned row: the error names epoch 2 and its step there.
    checkpoint, step = tmp_path / "checkpoint.pt", step_of(POISONED, len(data), epoch=2)
    train(poisoned([]), checkpoint, epochs=2)
    with pytest.raises(NonFiniteLoss, match=re.escape(f"'size' at epoch 2, step {step} (inf)")):
        train(data, checkpoint, resume=True)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_skips_exactly_the_poisoned_steps(accumulate):
    data = poisoned([POISONED])
    model, result, logs = train(data, nonfinite="skip", accumulate=accumulate)
    assert result.skipped_steps == 6  # the poisoned row is in one batch of each epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in logs)
    assert logs[-1]["val/loss/kind"] < 0.75 * logs[0]["val/loss/kind"]  # the rest still trains


def test_skipped_steps_survive_a_resume(tmp_path):
    data, checkpoint = poisoned([POISONED]), tmp_path / "checkpoint.pt"
    assert train(data, checkpoint, nonfinite="skip", epochs=3)[1].skipped_steps == 3
    result = train(data, checkpoint, resume=True, nonfinite="skip")[1]
    assert (result.resumed_at, result.skipped_steps) == (3, 6)


def test_skip_still_stops_when_every_step_of_an_epoch_is_non_finite():
    with pytest.raises(NonFiniteLoss, match=r"every step of epoch 0 had a non-finite loss "
                                            r"\(the last in task 'size' at epoch 0, step 7 \(inf\)\)"):
        train(poisoned(slice(None)), nonfinite="skip")


# --- one run of a stage at a time ------------------------------------------------------------------

def test_a_second_run_of_a_stage_fails_fast_while_the_first_holds_it(tmp_path, monkeypatch):
    root = copy_project(tmp_path)
    run(["mtl", "ingest"], root)
    outputs = [root / "data/ingested/train.parquet", root / "data/ingested/schema.json"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in outputs]
    monkeypatch.chdir(root)
    with stage_lock("ingest"):
        blocked = run(["mtl", "ingest"], root, check=False)
        run(["mtl", "augment"], root)  # another stage is not blocked
    assert blocked.returncode == 2
    assert re.fullmatch(rf"error: stage 'ingest' is already running in this project \(pid "
                        rf"{os.getpid()}, since \S+\); wait for it to finish or stop it\n",
                        blocked.stderr), blocked.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in outputs] == before
    run(["mtl", "ingest"], root)  # released
    assert [p.stat().st_mtime_ns for p in outputs] != [m for _, m in before]


# --- what killed runs leave behind ----------------------------------------------------------------

LEFTOVERS = {ingest: ["data/ingested/.train.parquet.1a2b3c.tmp", "data/ingested/.schema.json.4d5e6f.tmp"],
             augment: ["data/augmented/.test.parquet.7a8b9c.tmp"],
             split: ["data/split/.train.parquet.0d1e2f.tmp", "data/split/.test.parquet.3a4b5c.tmp"]}


def penguins_project(root: Path, **train) -> Path:
    """The repository's params (penguins, built in), seed 0, ``train`` changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"] |= train
    params["seeds"] = [0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_each_data_stage_removes_the_temporary_files_killed_runs_of_it_left(tmp_path, monkeypatch):
    monkeypatch.chdir(penguins_project(tmp_path))
    params = load_params()
    for stage, leftovers in LEFTOVERS.items():
        for leftover in map(Path, leftovers):
            leftover.parent.mkdir(parents=True, exist_ok=True)
            leftover.write_bytes(b"half a table")
        other = Path(leftovers[0]).with_name(".notes.tmp")  # not one of the stage's temporaries
        other.write_text("someone else's")
        stage.run(params)
        assert [f for f in leftovers if Path(f).exists()] == [], stage.__name__
        assert other.read_text() == "someone else's"


def test_the_temporary_files_of_a_live_run_are_left_alone(tmp_path, monkeypatch):
    """A second run of a stage is refused before it removes anything: the files may be the
    first run's, being written."""
    monkeypatch.chdir(penguins_project(tmp_path))
    live = Path(LEFTOVERS[ingest][0])
    live.parent.mkdir(parents=True)
    live.write_bytes(b"being written")
    with stage_lock("ingest"):
        assert run(["mtl", "ingest"], tmp_path, check=False).returncode == 2
    assert live.read_bytes() == b"being written"
    run(["mtl", "ingest"], tmp_path)  # the lock released, the file is a leftover
    assert not live.exists()


def test_a_half_encoded_split_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """Encodings of other inputs are kept until another one is made, but not what a killed
    run left half done, even when this run encodes nothing."""
    monkeypatch.chdir(penguins_project(tmp_path))
    params = load_params()
    for stage in (ingest, augment, split):
        stage.run(params)
    schema, key = json.loads(paths.SCHEMA.read_text()), encoded.data_fingerprint(params)
    encoded.load(params, schema, key)
    half, whole = paths.ENCODED_DIR / ".0123456789abcdef.5e6f7a.tmp", paths.ENCODED_DIR / "whole"
    (half / "train").mkdir(parents=True)
    (half / "train" / "part-0-0.npy").write_bytes(b"killed while encoding")
    shutil.copytree(paths.ENCODED_DIR / key[:16], whole)
    encoded.load(params, schema, key)
    assert not half.exists() and whole.is_dir()


# --- a full disk and read-only outputs -------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` for the block (a small disk that fills up, or a
    read-only one); the test is skipped where mounting is not permitted (it needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True, text=True, check=False)
    if not mounted or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip() if mounted else 'no mount command'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path``, an empty folder, made read-only for the block: a read-only mount as root (who
    may write anywhere else), mode 0555 otherwise."""
    if os.geteuid() == 0:
        with tmpfs(path, "1m", "ro"):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


@pytest.fixture(scope="module")
def split_project(tmp_path_factory) -> Path:
    """Penguins ingested, augmented and split; two epochs of training per run."""
    root = penguins_project(tmp_path_factory.mktemp("split"), epochs=2, patience=0)
    with contextlib.chdir(root):
        params = load_params()
        for stage in (ingest, augment, split):
            stage.run(params)
    return root


def one_error_line(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert re.fullmatch(r"error: [^\n]*\n", result.stderr), result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    return result.stderr


def test_a_full_disk_while_encoding_the_splits_is_one_line(split_project, tmp_path):
    root = shutil.copytree(split_project, tmp_path / "project")
    with tmpfs(root / paths.ENCODED_DIR, "16k"):
        result = run(["mtl", "train", "--variant", "hps-ew"], root, check=False)
        one_error_line(result, ".mtl/encoded/", "cannot be written: no space left on device")
        assert [p.name for p in (root / paths.ENCODED_DIR).iterdir()] == ["lock"]  # nothing half-written


def test_a_full_disk_while_checkpointing_is_one_line(split_project, tmp_path):
    root = shutil.copytree(split_project, tmp_path / "project")
    with tmpfs(root / ".mtl/runs", "128k"):
        result = run(["mtl", "train", "--variant", "hps-ew"], root, check=False)
    one_error_line(result, ".mtl/runs/hps-ew/seed-0", "no space left on device")
    assert not (root / "models/hps-ew/seed-0").exists() and not (root / "dvclive/hps-ew/seed-0").exists()


def test_read_only_outputs_are_refused_before_training(split_project, tmp_path):
    root = shutil.copytree(split_project, tmp_path / "project")
    with read_only(root / "models" / "hps-ew"):
        start = time.monotonic()
        result = run(["mtl", "train", "--variant", "hps-ew", "--set", "train.epochs=100"], root, check=False)
        reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
        one_error_line(result, "models/hps-ew", f"cannot be written: {reason}")
        assert time.monotonic() - start < 30  # not after 100 epochs
    assert not (root / "dvclive").exists() and not (root / ".mtl/runs/hps-ew/seed-0").exists()


def test_folders_published_together_are_all_moved_or_none(tmp_path):
    """The model and its logs: when the second folder cannot be moved into place, the first
    goes back, and both keep the previous run's files."""
    (tmp_path / "new-model").mkdir()
    (tmp_path / "new-model" / "model.pt").write_text("new")
    (tmp_path / "new-logs").mkdir()
    (tmp_path / "models" / "seed-0").mkdir(parents=True)
    (tmp_path / "models" / "seed-0" / "model.pt").write_text("old")
    (tmp_path / "dvclive").write_text("a file where the logs' folder should be")
    with pytest.raises(UserError, match=r"dvclive/seed-0: cannot be written: file exists \(.*dvclive\)$"):
        mtl_io.replace_dirs((tmp_path / "new-model", tmp_path / "models" / "seed-0"),
                     (tmp_path / "new-logs", tmp_path / "dvclive" / "seed-0"))
    assert (tmp_path / "models" / "seed-0" / "model.pt").read_text() == "old"
    assert (tmp_path / "new-model" / "model.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvclive", "models", "new-logs", "new-model"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["seed-0"]  # no seed-0.old left


# --- outputs get the mode the umask gives ----------------------------------------------------------

def test_outputs_have_the_mode_the_umask_gives_and_importing_keeps_the_umask(tmp_path):
    """Not even for a moment: a thread creating a file meanwhile would give it mode 0666."""
    script = ("import os, sys\nos.umask(0o027)\nreal, calls = os.umask, []\n"
              "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
              "import mtl.io\nos.umask = real\nassert calls == [], calls\n"
              "from pathlib import Path\nroot = Path(sys.argv[1])\n"
              "mtl.io.write_json({}, root / 'out.json')\n"
              "mtl.io.replace_dirs((mtl.io.temp_dir(root, 'plots'), root / 'plots'))\n")
    run([sys.executable, "-c", script, str(tmp_path)], tmp_path)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plots").stat().st_mode & 0o777 == 0o750


# --- reproducibility -------------------------------------------------------------------------------

# --- a killed training run resumes -----------------------------------------------------------------

RUN = ".mtl/runs/hps-ew/seed-0/checkpoint.pt"
LONG = {"epochs": 30, "deterministic": True}  # long enough to be killed part-way


def epochs_done(checkpoint: Path) -> int:
    if not checkpoint.is_file():
        return 0
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]) + 1


def kill_after_two_epochs(args: list[str], root: Path) -> int:
    """Start ``args`` in a process group of its own, SIGKILL the group once the hps-ew run's
    checkpoint holds two epochs; returns the epochs the checkpoint holds after the kill."""
    with open(root.parent / "killed.log", "w") as log:
        process = subprocess.Popen(args, cwd=root, env=env(), stdout=log, stderr=log,
                                   start_new_session=True)
        deadline = time.monotonic() + 600
        while epochs_done(root / RUN) < 2:
            assert process.poll() is None, (root.parent / "killed.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    done = epochs_done(root / RUN)
    assert 2 <= done < LONG["epochs"]
    return done


@pytest.mark.slow
def test_a_killed_dvc_repro_resumes_and_two_runs_write_identical_results(tmp_path):
    """Determinism and kill -9 in one: two pipeline runs with the same params, one of them killed
    while training and rerun, end with byte-identical metrics and logs and equal weights; the
    killed run resumes from its checkpoint, and DVC caches only complete outputs."""
    roots = {name: copy_project(tmp_path / name) for name in ("whole", "killed")}
    for root in roots.values():
        edit_params(root, lambda p: (p["train"].update(FAST), p.update(seeds=[0]),
                                     p["variants"].pop("hps-static"),
                                     p["variants"]["hps-ew"].update(train=LONG)))
        commit(root, "one long variant")
    whole, killed = roots["whole"], roots["killed"]
    assert "resumed" not in run(["dvc", "repro"], whole).stdout
    done = kill_after_two_epochs(["dvc", "repro"], killed)
    rerun = run(["dvc", "repro"], killed).stdout
    assert f"train@hps-ew-0: {LONG['epochs']} epochs (resumed at epoch {done})" in rerun
    assert "up to date" in run(["dvc", "status"], killed).stdout
    assert not (killed / RUN).parent.exists()  # a finished run leaves no checkpoint

    written = [[f.relative_to(root) for pattern in ("metrics/**/*.json", "dvclive/**/metrics.json")
                for f in sorted(root.glob(pattern)) if f.is_file()] for root in (whole, killed)]
    assert written[0] == written[1] and len(written[0]) == 7  # compare, reference, summary, 2 variants, 2 dvclive
    for name in written[0]:
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
    a, b = (torch.load(root / "models/hps-ew/seed-0/model.pt", weights_only=True)["state_dict"]
            for root in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    shutil.rmtree(killed / "models/hps-ew/seed-0")  # the outputs come back whole from the cache
    shutil.rmtree(killed / "dvclive/hps-ew/seed-0/plots")
    (killed / "dvclive/hps-ew/seed-0/metrics.json").unlink()
    run(["dvc", "checkout", "train@hps-ew-0"], killed)
    assert "up to date" in run(["dvc", "status"], killed).stdout


def test_a_full_disk_or_read_only_project_stops_at_the_stage_lock_with_one_line(split_project, tmp_path):
    root = shutil.copytree(split_project, tmp_path / "project")
    (root / ".mtl/locks").mkdir(parents=True, exist_ok=True)
    with tmpfs(root / ".mtl/locks", "4k", "ro"):
        result = run(["mtl", "compare"], root, check=False)
    one_error_line(result, ".mtl/locks/compare.lock", "cannot be written")
