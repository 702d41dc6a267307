"""Task relatedness (``mtl.engine.affinity``): gradient cosines and the lookahead inter-task
affinity of Fifty et al. 2021 on models small enough to check by hand, measuring that changes
nothing, the plain-language summary, and the train stage writing ``affinity.json``."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.engine import weighting
from mtl.engine.affinity import AffinityProbe, gradient_cosines, lookahead_affinity
from mtl.engine.affinity_summary import describe, grouping, mean_over_runs
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor, TabularPreprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit
from tests.helpers import REPO, env
from tests.test_engine import TASKS, make_table


class Linear(nn.Module):
    """A shared linear map s = w·x, then per task a scalar head h: the task's output is h·s."""

    def __init__(self, w: list[float], heads: dict[str, float]):
        super().__init__()
        self.shared = nn.Linear(len(w), 1, bias=False)
        self.heads = nn.ParameterDict({n: nn.Parameter(torch.tensor(h)) for n, h in heads.items()})
        with torch.no_grad():
            self.shared.weight.copy_(torch.tensor([w]))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.shared(inputs["x"])
        return {name: h * s for name, h in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())


def regression(*names: str) -> list[Task]:
    return [Task(n, "regression", n) for n in names]  # loss: mean squared error


def batch(x: list[list[float]], **targets: list[float]) -> TaskData:
    return TaskData({"x": torch.tensor(x)}, {n: torch.tensor(y) for n, y in targets.items()},
                    {n: torch.ones(len(y), dtype=torch.bool) for n, y in targets.items()})


def hps_bundle(table, dropout: float = 0.0) -> Bundle:
    """The engine's hard-parameter-sharing model on ``make_table``'s features, seeded."""
    prep = Preprocessor(TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[]))
    torch.manual_seed(0)
    return Bundle.create("hps", TASKS, prep, {"hidden": [16], "head_hidden": [8], "dropout": dropout}, {})


def test_opposite_tasks_have_cosine_minus_one_and_hurt_each_other():
    # w = 0, x = (1, 2): s = 0, L_a = (s - 1)², L_b = (s + 1)², gradients -2x and +2x.
    # A step of lr 0.1 for a: w = 0.2x, s = 0.2|x|² = 1, so L_a = 0 (Z = 1) and L_b = 4 (Z = -3).
    model, data = Linear([0.0, 0.0], {"a": 1.0, "b": 1.0}), batch([[1.0, 2.0]], a=[1.0], b=[-1.0])
    assert gradient_cosines(model, regression("a", "b"), data) == pytest.approx(
        np.array([[1, -1], [-1, 1]]))
    assert lookahead_affinity(model, regression("a", "b"), data, lr=0.1) == pytest.approx(
        np.array([[1, -3], [-3, 1]]))


def test_identical_tasks_have_cosine_one_and_equal_affinity():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3).tolist(), torch.randn(8).tolist()
    model, data = Linear([0.3, -0.2, 0.5], {"a": 1.5, "b": 1.5}), batch(x, a=y, b=y)
    tasks = regression("a", "b")
    assert gradient_cosines(model, tasks, data) == pytest.approx(np.ones((2, 2)))
    z = lookahead_affinity(model, tasks, data, lr=0.05)
    assert z[0, 1] == pytest.approx(z[0, 0]) and z[0, 0] > 0


def test_lookahead_steps_the_shared_parameters_only():
    # w = 1, x = 1, heads 2 and -1, targets 0 and 1: L_a = (2w)² = 4, L_b = (w + 1)² = 4,
    # dL_a/dw = 8w = 8, dL_b/dw = 2(w + 1) = 4. lr 0.05: a step for a gives w = 0.6, so
    # L_a = 1.44 (Z = 0.64) and L_b = 2.56 (Z = 0.36); a step for b gives w = 0.8, so
    # L_a = 2.56 (Z = 0.36) and L_b = 3.24 (Z = 0.19). The heads keep their values.
    model, data = Linear([1.0], {"a": 2.0, "b": -1.0}), batch([[1.0]], a=[0.0], b=[1.0])
    z = lookahead_affinity(model, regression("a", "b"), data, lr=0.05)
    assert z == pytest.approx(np.array([[0.64, 0.36], [0.36, 0.19]]))
    assert gradient_cosines(model, regression("a", "b"), data) == pytest.approx(np.ones((2, 2)))


def test_an_unlabelled_or_gradient_free_task_gives_nan():
    model = Linear([0.5, 0.5], {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0})  # d: zero gradient
    data = batch([[1.0, 0.0], [0.0, 1.0]], a=[1.0, 0.0], b=[0.0, 1.0], c=[2.0, 2.0], d=[1.0, 1.0])
    data.masks["c"][:] = False
    tasks = regression("a", "b", "c", "d")
    cos = gradient_cosines(model, tasks, data)
    assert np.isnan(cos[2]).all() and np.isnan(cos[:, 2]).all()
    assert np.isnan(cos[3]).all() and np.isnan(cos[:, 3]).all()
    assert np.isfinite(cos[:2, :2]).all()
    z = lookahead_affinity(model, tasks, data, lr=0.1)
    assert np.isnan(z[2]).all() and np.isnan(z[:, 2]).all()
    assert z[3, [0, 1, 3]] == pytest.approx([0, 0, 0])  # a zero step changes no loss


def test_measuring_changes_neither_the_model_nor_its_grad_nor_any_random_state():
    table = make_table()
    bundle = hps_bundle(table, dropout=0.5)
    data = TaskData.from_table(table, bundle.preprocessor, TASKS)
    model = bundle.model.train()
    model.heads["kind"].eval()  # a mixed state of modes is kept as it is
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    matrices = AffinityProbe(TASKS, data, batches=2, batch_size=16, seed=0).measure(model, lr=0.01)
    assert all(np.isfinite(m).all() for m in matrices.values())
    assert np.diag(matrices["cosine"]) == pytest.approx(np.ones(3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())


def test_fit_with_the_probe_ends_with_the_same_weights_as_without():
    table = make_table()
    data = TaskData.from_table(table, hps_bundle(table).preprocessor, TASKS)
    options = FitOptions(epochs=3, batch_size=16, lr=1e-2, seed=0, progress=False)
    states, probe = [], AffinityProbe(TASKS, data, batches=2, batch_size=16, seed=1)
    for on in (False, True):
        model = hps_bundle(table, dropout=0.3).model  # dropout draws from the global RNG
        fit(model, TASKS, weighting.build("rlw", [t.name for t in TASKS]), data, data, options,
            on_epoch=(lambda e, log, m=model: probe.measure(m, log["lr"])) if on else None)
        states.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
    summary = probe.summary()
    assert summary["epochs"] == 3 and summary["tasks"] == [t.name for t in TASKS]
    assert np.array(summary["lookahead"], dtype=float).shape == (3, 3)


def test_the_probe_state_survives_json_and_resumes_at_an_epoch():
    table = make_table()
    bundle = hps_bundle(table)
    data = TaskData.from_table(table, bundle.preprocessor, TASKS)
    probe = AffinityProbe(TASKS, data, batches=2, batch_size=16, seed=0)
    for lr in (0.1, 0.01, 0.001):
        probe.measure(bundle.model, lr)
    state = json.loads(json.dumps(probe.state_dict()))
    again = AffinityProbe(TASKS, data, batches=2, batch_size=16, seed=0)
    again.load_state_dict(state, epochs=2)
    probe.history.pop()
    assert again.summary() == probe.summary() and again.summary()["epochs"] == 2
    with pytest.raises(ValueError, match="tasks"):
        AffinityProbe(TASKS[:2], data, 2, 16, 0).load_state_dict(state, epochs=2)


def test_the_probe_measures_the_first_and_every_kth_epoch_and_resumes_those_before_a_kill():
    table = make_table()
    bundle = hps_bundle(table)
    data = TaskData.from_table(table, bundle.preprocessor, TASKS)
    probe = AffinityProbe(TASKS, data, batches=1, batch_size=16, seed=0, every=3)
    assert [e for e in range(8) if probe.due(e)] == [0, 3, 6]
    for epoch in (0, 3, 6):
        probe.measure(bundle.model, 0.01, epoch)
    again = AffinityProbe(TASKS, data, batches=1, batch_size=16, seed=0, every=3)
    again.load_state_dict(json.loads(json.dumps(probe.state_dict())), epochs=6)
    assert again.epochs == [0, 3] and again.summary()["epochs"] == 2
    with pytest.raises(ValueError, match="every"):
        AffinityProbe(TASKS, data, batches=1, batch_size=16, seed=0, every=0)


def test_mean_over_runs_averages_the_measured_entries():
    one = {"tasks": ["a", "b"], "cosine": [[1, 0.2], [0.2, 1]], "lookahead": [[0.1, None], [0.3, 0.2]],
           "epochs": 5}
    two = {"tasks": ["a", "b"], "cosine": [[1, -0.4], [-0.4, 1]], "lookahead": [[0.3, 0.1], [None, None]],
           "epochs": 4}
    mean = mean_over_runs([one, two])
    assert np.array(mean["cosine"]) == pytest.approx(np.array([[1, -0.1], [-0.1, 1]]))
    assert np.array(mean["lookahead"]) == pytest.approx(np.array([[0.2, 0.1], [0.3, 0.2]]))
    assert (mean["epochs"], mean["runs"]) == (9, 2)
    with pytest.raises(ValueError, match="different tasks"):
        mean_over_runs([one, one | {"tasks": ["b", "a"]}])


# --- describe -------------------------------------------------------------------------------------

def seeds_of(summary: dict, shifts=(0.0, 0.01, -0.01)) -> list[dict]:
    """``summary`` as measured by several seeds: each off-diagonal affinity shifted by a shift."""
    return [summary | {"lookahead": [[v if i == j or v is None else v + shift for j, v in enumerate(row)]
                                     for i, row in enumerate(summary["lookahead"])]}
            for shift in shifts]


def test_describe_names_the_conflicts_and_proposes_splitting_them_off():
    # a and b help each other; c is hurt by both and hurts both.
    summary = {"tasks": ["a", "b", "c"], "epochs": 10,
               "cosine": [[1, 0.6, -0.3], [0.6, 1, -0.2], [-0.3, -0.2, 1]],
               "lookahead": [[0.3, 0.2, -0.1], [0.2, 0.3, -0.1], [-0.05, -0.05, 0.2]]}
    lines = describe(seeds_of(summary), alpha=0.05)
    assert lines[0].startswith("a and c conflict: their gradients on the shared layers point apart "
                               "(cosine -0.30); a step for a raises the loss of c (affinity -0.1")
    assert lines[1].startswith("b and c conflict")
    assert lines[2] == ("a and b help each other most (mean affinity 0.2, 66.7% of what a step for "
                        "each does to its own loss; gradient cosine 0.60).")
    # split: a and b each get 0.2 from the other, c alone 0 -> 0.133; together: a and b get
    # (0.2 - 0.05) / 2 = 0.075 each, c gets -0.1 -> 0.0167; the gain, 0.117, is 43.8% of the mean
    # self-affinity 0.267. Shifting every off-diagonal entry by s moves it by -s / 3 (p = 2.7e-4).
    assert lines[3] == ("Grouping to try: {a, b} and {c} as two networks (score 0.133 against 0.0167 "
                        "for one network; the split gains +43.8% of a task's own step; p = 0.00027 "
                        "over 3 seeds).")
    assert len(lines) == 4


def test_describe_keeps_tasks_that_help_each_other_together():
    summary = {"tasks": ["a", "b", "c"], "epochs": 3,
               "cosine": [[1, 0.5, 0.1], [0.5, 1, 0.2], [0.1, 0.2, 1]],
               "lookahead": [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1], [0.04, None, 0.2]]}
    lines = describe(seeds_of(summary), alpha=0.05)
    assert lines[0] == "No pair of tasks conflicts: no mean gradient cosine or affinity is negative."
    assert lines[1].startswith("a and b help each other most")
    # one network: a gets (0.1 + 0.04) / 2, b 0.1, c 0.1 -> 0.09; the best split, {a, b} and {c}:
    # 0.0667; the gain -0.0233 is -8.75% of the mean self-affinity 0.267
    assert lines[2] == ("One network for all tasks scores best: better than the best split, {a, b} "
                        "and {c} (score 0.0667 against 0.09 for one network; the split gains -8.8% "
                        "of a task's own step; p = 0.0067 over 3 seeds).")
    assert describe([{"tasks": ["a"], "cosine": [[1]], "lookahead": [[0.1]], "epochs": 1}], 0.05) == [
        "Task relatedness needs at least two tasks with measured affinities."]


TINY = {"tasks": ["a", "b", "c"], "epochs": 10, "cosine": [[1, 0.1, 0.05], [0.1, 1, 0.02], [0.05, 0.02, 1]],
        "lookahead": [[1e-3, 3e-5, 3e-5], [3e-5, 1e-3, 3e-5], [1e-5, 1e-5, 1e-3]]}


@pytest.mark.parametrize("runs,why", [
    # consistent over the seeds (p < 0.05) but tiny: the split loses 0.33% of a task's own step
    (seeds_of(TINY, (0.0, 1e-7, -1e-7)), "the split gains -0.3% of a task's own step; p = 3.3e-05 over 3 seeds"),
    # large but of changing sign: a gain within noise
    (seeds_of(TINY, (0.0, 4e-3, -3e-3)), "p = 0.88 over 3 seeds"),
    ([TINY], "fewer than 2 seeds, so nothing can be said about noise"),
], ids=["tiny", "noisy", "one-seed"])
def test_describe_calls_tiny_or_noisy_affinities_inconclusive(runs, why):
    last = describe(runs, alpha=0.05)[-1]
    assert last.startswith("Inconclusive: the seeds do not bear out a choice between the best split "
                           "into two networks, {a, b} and {c}, and one network for all tasks")
    assert why in last and last.endswith("These affinities support no grouping.")


def test_grouping_gains_are_in_units_of_a_task_own_step_per_seed():
    found = grouping(seeds_of(TINY, (0.0, 1e-7, -1e-7)), alpha=0.05)
    # {a, b} and {c}: a and b get 3e-5 from each other, c alone 0 -> 2e-5; one network: a and b
    # get (3e-5 + 1e-5) / 2, c gets 3e-5 -> 2.33e-5; the gain -3.3e-6 is -0.33% of 1e-3, and a
    # shift s of the off-diagonal entries moves it by -s / 3
    assert found.split == [[0, 1], [2]]
    assert (found.score_split, found.score_one) == pytest.approx((2e-5, 7e-5 / 3))
    assert found.gains == pytest.approx([-1 / 300, -1 / 300 - 1e-4 / 3, -1 / 300 + 1e-4 / 3])
    assert found.p < 0.05 and not found.conclusive  # distinguishable from 0, but negligible
    assert grouping([TINY, TINY], alpha=0.05).p == 0.0  # the same non-zero gain twice: certain
    assert grouping([TINY], alpha=0.05).p is None


# --- the train stage ------------------------------------------------------------------------------

EPOCHS, EVERY = 5, 2
MEASURED = 3  # after epochs 0, 2 and 4 (counted from 0)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Penguins ingested, augmented and split; hps-ew and stl trained for seed 0 by ``mtl``."""
    root = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seeds"] = [0]
    raw["train"] |= {"epochs": EPOCHS, "patience": 0, "hidden": [16], "head_hidden": [8],
                     "affinity_every": EVERY}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for args in (["ingest"], ["augment"], ["split"], ["train", "--variant", "hps-ew"],
                     ["train", "--variant", "stl"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
    return root


def test_train_writes_the_affinity_matrices_and_logs_them_every_k_epochs(project):
    summary = json.loads((project / paths.model_dir("hps-ew", 0) / "affinity.json").read_text())
    assert summary["tasks"] == ["species", "sex", "body_mass"]
    assert (summary["epochs"], summary["every"]) == (MEASURED, EVERY)
    for kind in ("cosine", "lookahead"):
        matrix = np.array(summary[kind], dtype=float)
        assert matrix.shape == (3, 3) and np.isfinite(matrix).all()
    assert np.diag(summary["cosine"]) == pytest.approx(np.ones(3))
    series = project / paths.live_dir("hps-ew", 0) / "plots" / "metrics" / "affinity"
    tsv = sorted(p.relative_to(series).as_posix() for p in series.glob("**/*.tsv"))
    assert len(tsv) == 12 and "lookahead/sex/body_mass.tsv" in tsv
    assert "cosine/sex/sex.tsv" not in tsv
    rows = (series / "lookahead" / "sex" / "body_mass.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == ["0", "2", "4"]
    assert describe([summary], alpha=0.05)  # plain sentences for the real matrices
    assert not (project / paths.model_dir("stl", 0) / "affinity.json").exists()


@pytest.mark.slow
def test_a_resumed_run_keeps_the_affinities_of_the_epochs_before_the_kill(project, tmp_path):
    """Kill ``mtl train`` after its first checkpoint, rerun it: the summary covers every measured
    epoch, as in the run that was never interrupted."""
    whole = json.loads((project / paths.model_dir("hps-ew", 0) / "affinity.json").read_text())
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".mtl"))
    checkpoint = root / paths.run_dir("hps-ew", 0) / "checkpoint.pt"
    args = [sys.executable, "-m", "mtl", "train", "--variant", "hps-ew"]
    proc = subprocess.Popen(args, cwd=root, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = CliRunner().invoke(app, args[3:])
    assert result.exit_code == 0, result.output
    info = json.loads((root / paths.model_dir("hps-ew", 0) / "train.json").read_text())
    assert 0 < info["resumed_at_epoch"] < EPOCHS
    resumed = json.loads((root / paths.model_dir("hps-ew", 0) / "affinity.json").read_text())
    assert resumed["epochs"] == MEASURED
    for kind in ("cosine", "lookahead"):
        assert np.array(resumed[kind]) == pytest.approx(np.array(whole[kind]), rel=1e-6)
    lines = (root / paths.live_dir("hps-ew", 0) / "plots" / "metrics" / "affinity" / "lookahead"
             / "sex" / "body_mass.tsv").read_text().splitlines()
    assert len(lines) == 1 + MEASURED
