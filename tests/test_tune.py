"""tune: real Optuna studies on the penguins data (4 trials of 2 epochs), in a process and through
real DVC."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.config import load_params
from mtl.engine.checkpoint import Bundle
from mtl.engine.trainer import lr_scales, make_optimizer
from mtl.stages import train as training
from mtl.stages import tune
from tests.helpers import env
from tests.test_pipeline_dvc import commit, copy_project, edit_params, repro

TUNE = {"trials": 4, "epochs": 2, "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                                             "dropout": {"low": 0.0, "high": 0.3},
                                             "hidden": {"choices": [[8], [16]]}}}
TRAIN = {"epochs": 3, "patience": 0, "hidden": [8], "head_hidden": [4], "affinity_batches": 0}
VARIANTS = {"stl": {"arch": "stl"}, "hps-ew": {"arch": "hps"}}


def write_params(root: Path, **tune) -> None:
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params |= {"seeds": [0], "variants": VARIANTS, "tune": TUNE | tune}
    params["train"] |= TRAIN
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def mtl(*args: str) -> None:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def split_project(tmp_path_factory):
    """A project with the penguins data split (its own, whatever other tests did)."""
    root = tmp_path_factory.mktemp("tune")
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("check", "ingest", "augment", "split"):
            mtl(stage)
    return root


@pytest.fixture
def project(split_project, tmp_path, monkeypatch):
    """A fresh copy of the split project (no study yet), as the working directory."""
    root = tmp_path / "p"
    shutil.copytree(split_project, root)
    monkeypatch.chdir(root)
    return root


def tuned(variant: str) -> dict:
    return json.loads(paths.tuned_path(variant).read_text())


def study(variant: str, task: str | None = None) -> optuna.Study:
    """The variant's one study in its journal (``task``'s, of the per-task baseline)."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(paths.study_path(variant))))
    prefix = variant if task is None else f"{variant}-{task}-"
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)
               if s.study_name.startswith(prefix)]
    return optuna.load_study(study_name=name, storage=storage)


def test_a_seeded_study_proposes_the_same_params_twice(project):
    mtl("tune", "--variant", "hps-ew", "--set", "compare.baseline=hps-ew")
    first = tuned("hps-ew")
    assert [t["state"] for t in first["trials"]] == ["complete"] * 4
    assert first["objective"] == "summed validation loss"  # a baseline that is not stl
    shutil.rmtree(paths.study_path("hps-ew").parent)
    mtl("tune", "--variant", "hps-ew", "--set", "compare.baseline=hps-ew")
    assert [t["params"] for t in tuned("hps-ew")["trials"]] == [t["params"] for t in first["trials"]]
    assert len({json.dumps(t["params"]) for t in first["trials"]}) == 4
    mtl("tune", "--variant", "hps-ew", "--set", "compare.baseline=hps-ew",
        "--set", "tune.seed=1", "--set", "tune.trials=1")  # another study
    assert tuned("hps-ew")["trials"][0]["params"] != first["trials"][0]["params"]


def test_the_stl_baseline_tunes_each_task_network_on_its_own_loss(project):
    mtl("tune", "--variant", "stl")
    chosen, tasks = tuned("stl"), ["species", "sex", "body_mass"]
    assert chosen["params"] == {} and list(chosen["studies"]) == tasks
    for task, one in chosen["studies"].items():
        assert [t["state"] for t in one["trials"]] == ["complete"] * 4  # the same budget each
        best = min(one["trials"], key=lambda t: t["value"])
        assert chosen["per_task"][task] == one["params"] == best["params"]
        assert one["value"] == pytest.approx(one["val_metrics"][task]["loss"])  # its loss alone
        assert list(one["val_metrics"]) == [task]
    assert list(chosen["val_metrics"]) == tasks
    assert chosen["value"] == pytest.approx(sum(one["value"] for one in chosen["studies"].values()))
    assert len({json.dumps(p) for p in chosen["per_task"].values()}) > 1  # chosen apart
    result = CliRunner().invoke(app, ["tune", "--variant", "stl", "--set",
                                      "tune.space={batch_size: {choices: [32, 64]}}"])
    assert result.exit_code == 2
    assert "tune.space.batch_size: the baseline 'stl' is tuned one study per task" in result.output


def test_the_others_are_measured_against_the_tuned_baseline_and_more_trials_extend_the_study(project):
    mtl("tune", "--variant", "stl", "--output", str(paths.TUNED_BASELINE))
    mtl("tune", "--variant", "hps-ew", "--set", "tune.trials=2")
    two = tuned("hps-ew")
    assert "Δm" in two["objective"] and len(two["trials"]) == 2
    mtl("tune", "--variant", "hps-ew")  # 4 trials: the first 2 are not run again
    four = tuned("hps-ew")
    assert four["trials"][:2] == two["trials"] and len(four["trials"]) == 4
    best = max(four["trials"], key=lambda t: t["value"])
    assert four["params"] == best["params"] and four["value"] == best["value"]
    assert set(four["importances"]) == {"train.lr", "train.dropout", "train.hidden"}


def test_train_builds_each_stl_member_with_its_own_settings(project):
    """``variants.stl.per_task`` (what the tuned baseline's file sets): the member's widths, and
    its optimizer group at its own learning rate and weight decay."""
    own = "variants.stl.per_task={species: {lr: 0.02, weight_decay: 0.1, hidden: [16, 4]}}"
    params = load_params(Path("params.yaml"), ["tune.trials=0", own])  # by hand: an untuned baseline
    preprocessor, tasks, _, _ = tune.load_data(params)
    model = training.build(params, "stl", 0, preprocessor, tasks)[0].model
    trainable, scaled = lr_scales(model)
    optimizer = make_optimizer(trainable, [], training.fit_options(params.train, 0, "fp32"),
                               torch.device("cpu"), scaled)
    (own,) = [g for g in optimizer.param_groups if g["lr"] != params.train.lr]
    assert own["lr"] == pytest.approx(0.02) and own["weight_decay"] == 0.1
    assert {id(p) for p in own["params"]} == {id(p) for p in model.members["species"].parameters()}
    widths = [m.out_features for m in model.members["species"].trunk if isinstance(m, nn.Linear)]
    assert widths == [16, 4]


def test_the_lock_a_killed_tune_leaves_can_be_released(project):
    """A tune killed while it writes the journal leaves Optuna's lock, a symlink to the journal;
    Optuna releases it after its grace period only if the link resolves (a relative journal
    path made it dangle, and the next tune waited forever)."""
    params = load_params(Path("params.yaml"), ["compare.baseline=hps-ew"])
    backend = tune.open_study(params, "hps-ew")._storage._backend
    backend._lock.acquire()  # and never released: the holder was killed
    lock = Path(backend._lock._lock_file)
    assert lock.is_symlink() and lock.resolve() == paths.study_path("hps-ew").resolve()
    assert os.stat(lock).st_mtime  # what the grace period reads: no FileNotFoundError


def test_two_processes_run_the_requested_trials_between_them(project):
    mtl("tune", "--variant", "stl", "--set", "tune.jobs=2", "--set", "tune.trials=3",
        "--set", "tune.epochs=1")
    for task in ("species", "sex", "body_mass"):  # each per-task study
        trials = study("stl", task).trials
        assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
        assert len({json.dumps(t.params) for t in trials}) == 3  # the workers' samplers differ
        assert len(tuned("stl")["studies"][task]["trials"]) == 3


def test_a_killed_tune_resumes_without_repeating_finished_trials(project):
    command = [sys.executable, "-m", "mtl", "tune", "--variant", "hps-ew",
               "--set", "compare.baseline=hps-ew", "--set", "tune.epochs=20"]
    proc = subprocess.Popen(command, cwd=project, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if paths.study_path("hps-ew").is_file() and len(
                [t for t in study("hps-ew").trials if t.state.name == "COMPLETE"]) >= 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in study("hps-ew").trials if t.state.name == "COMPLETE"}
    assert 2 <= len(before) < 4 and not paths.tuned_path("hps-ew").exists()
    mtl("tune", "--variant", "hps-ew", "--set", "compare.baseline=hps-ew", "--set", "tune.epochs=20")
    after = study("hps-ew").trials
    assert {t.number: t.params for t in after if t.number in before} == before
    assert sum(t.state.name == "COMPLETE" for t in after) == 4  # the killed trial: failed
    states = [t["state"] for t in tuned("hps-ew")["trials"]]
    assert states.count("complete") == 4 and "running" not in states


def test_a_diverging_trial_is_pruned_and_the_study_goes_on(project):
    mtl("tune", "--variant", "stl", "--set", "tune.trials=2", "--output", str(paths.TUNED_BASELINE),
        "--set", "tune.space={lr: {low: 1.0e+30, high: 1.0e+31, log: true}}")
    chosen = json.loads(paths.TUNED_BASELINE.read_text())
    assert chosen["per_task"] == {t: {} for t in ("species", "sex", "body_mass")}
    assert chosen["val_metrics"] is None
    for one in chosen["studies"].values():
        assert [t["state"] for t in one["trials"]] == ["pruned", "pruned"]
        assert one["params"] == {} and one["value"] is None
        assert one["importances"].startswith("only 0 complete trial(s)")
    result = CliRunner().invoke(app, ["tune", "--variant", "hps-ew", "--set", "tune.trials=2"])
    assert result.exit_code == 2 and "completed no trial" in result.output  # no baseline to beat


def test_trials_0_writes_a_not_tuned_file_without_torch(project):
    code = ("import sys; from mtl.cli import app; app(['tune', '--variant', 'hps-ew', '--set', "
            "'tune.trials=0'], standalone_mode=False); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=project, env=env(), check=True)
    assert tuned("hps-ew") == {"variant": "hps-ew", "tuned": False, "params": {}}


@pytest.mark.slow
def test_dvc_tunes_two_variants_and_train_uses_the_chosen_params(tmp_path):
    root = copy_project(tmp_path)
    edit_params(root, lambda p: (p.update(seeds=[0], variants=VARIANTS, tune=TUNE),
                                 p["train"].update(TRAIN)))
    commit(root, "tune")
    trained = [f"train@{v}-0" for v in VARIANTS]  # evaluate, compare and report: test_report
    ran = repro(root, *trained)
    assert {"tune-baseline", "tune@stl", "tune@hps-ew"} <= ran
    chosen = json.loads((root / paths.tuned_path("hps-ew")).read_text())
    assert chosen["tuned"] and len(chosen["trials"]) == 4
    info = json.loads((root / paths.model_dir("hps-ew", 0) / "train.json").read_text())
    assert info["train"]["lr"] == chosen["params"]["train.lr"]
    assert info["train"]["hidden"] == chosen["params"]["train.hidden"]
    assert info["train"]["epochs"] == TRAIN["epochs"]  # tune.epochs bounds trials only
    per_task = json.loads((root / paths.tuned_path("stl")).read_text())["per_task"]
    info = json.loads((root / paths.model_dir("stl", 0) / "train.json").read_text())
    assert info["per_task"] == {task: {k.removeprefix("train."): v for k, v in values.items()}
                                for task, values in per_task.items()}
    model = Bundle.load(root / paths.model_dir("stl", 0) / "model.pt").model
    for task, values in info["per_task"].items():  # each member is built with its own widths
        widths = [m.out_features for m in model.members[task].trunk if isinstance(m, nn.Linear)]
        assert widths == values["hidden"]
    assert repro(root, *trained) == set()
