"""Training faults and reproducibility: non-finite losses, one run of a stage at a time, identical
results from identical runs, and a killed training run that resumes."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mtl.engine import weighting
from mtl.engine.trainer import FitOptions, NonFiniteLoss, TaskData, fit
from mtl.lock import stage_lock
from tests.helpers import env, run
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
    outputs = [root / "data/ingested/table.parquet", root / "data/ingested/schema.json"]
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
    assert written[0] == written[1] and len(written[0]) == 5  # compare + 2 variants + 2 dvclive
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
