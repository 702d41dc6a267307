"""The trainer's options on small synthetic data: optimizers, LR schedules, clipping,
accumulation, checkpoints and bit-identical resume, deterministic mode, precision, progress."""

import math
import random
import re

import numpy as np
import pytest
import torch

from mtl.config import load_params
from mtl.engine import weighting
from mtl.engine.trainer import (
    CheckpointMismatch,
    FitOptions,
    TaskData,
    fit,
    make_optimizer,
    resolve_precision,
)
from mtl.errors import UserError
from tests.test_engine import TASKS, make_bundle, make_table

NAMES = [t.name for t in TASKS]


@pytest.fixture(scope="module")
def data() -> TaskData:
    table = make_table()
    return TaskData.from_table(table, make_bundle("hps", table).preprocessor, TASKS)


def model(arch: str = "hps"):
    return make_bundle(arch, make_table()).model  # the same initial weights every time


def options(**kw) -> FitOptions:
    return FitOptions(**({"epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0,
                          "progress": False} | kw))


def run(data: TaskData, arch: str = "hps", method: str = "ew", method_options: dict | None = None,
        **kw):
    """Train a fresh model; returns (model, weighting, per-epoch logs)."""
    net, logs = model(arch), []
    w = weighting.for_model(net, method, NAMES, options=method_options)
    fit(net, TASKS, w, data, data, options(**kw), on_epoch=lambda e, log: logs.append(log))
    return net, w, logs


def grad_norm(module: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in module.parameters() if p.grad is not None])))


# --- optimizers and schedules ---------------------------------------------------------------------

LR = 1e-2


@pytest.mark.parametrize("kw,expected", [
    ({}, [LR] * 6),
    ({"warmup_epochs": 2}, [LR / 3, 2 * LR / 3, LR, LR, LR, LR]),
    ({"schedule": "cosine"}, [LR * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]),
    ({"schedule": "cosine", "warmup_epochs": 2},
     [LR / 3, 2 * LR / 3] + [LR * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
    ({"schedule": "step", "step_size": 2, "gamma": 0.5, "warmup_epochs": 1},
     [LR / 2, LR, LR, LR / 2, LR / 2, LR / 4]),
], ids=["none", "warmup", "cosine", "cosine-warmup", "step-warmup"])
def test_schedules_set_the_documented_learning_rate_each_epoch(data, kw, expected):
    _, _, logs = run(data, **kw)
    assert [log["lr"] for log in logs] == pytest.approx(expected, rel=1e-9)


def test_plateau_decays_after_epochs_without_a_better_validation_loss(data):
    # SGD at lr 1e-6 barely moves: no epoch beats the first by the threshold (1e-4 relative).
    lr = 1e-6
    _, _, logs = run(data, optimizer="sgd", lr=lr, schedule="plateau", plateau_patience=1,
                     gamma=0.5, warmup_epochs=1, epochs=7)
    # warm-up epoch 0; from epoch 1 on, a decay after 2 epochs without improvement
    assert [log["lr"] for log in logs] == pytest.approx(
        [lr / 2, lr, lr, lr, lr / 2, lr / 2, lr / 4], rel=1e-9)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_leaves_the_weightings_own_parameters_alone(optimizer):
    """With zero gradients, weight decay alone moves a parameter: the model's by lr x decay x
    itself, the weighting's (uw's log-variances, gradnorm's logits) not at all."""
    own, net = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    step = make_optimizer([net], [own], options(optimizer=optimizer, lr=1.0, weight_decay=0.5),
                          torch.device("cpu"))
    own.grad, net.grad = torch.zeros(2), torch.zeros(3)
    step.step()
    assert torch.equal(own.detach(), torch.ones(2))
    assert torch.allclose(net.detach(), torch.full((3,), 0.5))


@pytest.mark.parametrize("method,own", [("ew", 0), ("uw", 1), ("gradnorm", 1), ("imtl", 1)])
def test_fit_gives_the_weightings_parameters_a_group_without_weight_decay(data, tmp_path, method,
                                                                         own):
    path = tmp_path / "checkpoint.pt"
    fit(model(), TASKS, weighting.build(method, NAMES), data, data,
        options(epochs=1, weight_decay=0.1), checkpoint=path)
    groups = torch.load(path, weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0][:1 + own]
    assert [len(g["params"]) for g in groups[1:]] == [1] * own


def test_sgd_with_momentum_trains(data):
    _, _, logs = run(data, optimizer="sgd", momentum=0.9, lr=0.05, epochs=15)
    for t in TASKS:
        assert logs[-1][f"val/loss/{t.name}"] < 0.5 * logs[0][f"val/loss/{t.name}"]


# --- clipping and accumulation --------------------------------------------------------------------

def test_clipping_bounds_the_update(data):
    """One SGD step without momentum or weight decay moves the weights by lr x the gradient."""
    vector = lambda net: torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    before, moved = vector(model()), {}
    for clip in (0.0, 0.1):
        net, _, _ = run(data, optimizer="sgd", lr=1.0, epochs=1, batch_size=len(data),
                        clip_grad_norm=clip)
        moved[clip] = float((vector(net) - before).norm())
        assert grad_norm(net) == pytest.approx(moved[clip], rel=1e-4)
    assert moved[0.0] > 0.2 and moved[0.1] == pytest.approx(0.1, rel=1e-4)


def test_stl_clips_each_network_alone(data):
    """Clipped per network, STL's networks still train exactly as if each were alone."""
    together, _, _ = run(data, "stl", clip_grad_norm=0.05, epochs=3)
    norms = [grad_norm(m) for m in together.members.values()]
    assert max(norms) <= 0.05 + 1e-6 and grad_norm(together) > 0.05
    for t in TASKS:
        alone = model("stl").members[t.name]
        fit(alone, [t], weighting.build("ew", [t.name]), data, data,
            options(clip_grad_norm=0.05, epochs=3))
        for a, b in zip(alone.state_dict().values(), together.members[t.name].state_dict().values()):
            assert torch.equal(a, b)


def test_accumulating_micro_batches_equals_one_larger_batch(data):
    full = TaskData(data.inputs, data.targets, {k: torch.ones_like(m) for k, m in data.masks.items()})
    none = full.take(torch.arange(0))  # no validation: keep the last weights
    nets = []
    for batch_size, accumulate in ((40, 1), (10, 4)):  # 120 rows: 3 steps of 40 rows each
        net = model()
        fit(net, TASKS, weighting.build("ew", NAMES), full, none,
            options(batch_size=batch_size, accumulate=accumulate, epochs=3))
        nets.append(net)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(nets[0].trunk[0].weight, model().trunk[0].weight)


# --- checkpoints and resume -----------------------------------------------------------------------

def scramble_rng() -> None:
    """What a new process would have: other random states."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


@pytest.mark.parametrize("arch,method,method_options", [
    ("hps", "ew", None), ("hps", "uw", None), ("stl", "ew", None), ("hps", "dwa", None),
    ("hps", "famo", None), ("hps", "rlw", None), ("hps", "db_mtl", None), ("hps", "gradnorm", None),
    ("hps", "imtl", None),
    # 8 steps an epoch: the resumed run's first step (24) reuses the weights of step 20
    ("hps", "nash_mtl", {"update_weights_every": 5}),
    ("groups", "famo", None)])  # a weighting per group, each with its state
def test_resume_gives_bit_identical_weights(data, tmp_path, arch, method, method_options):
    """6 epochs in one go, or 3 epochs and then a resumed run to 6: the same final weights."""
    whole, w_whole, logs = run(data, arch, method, method_options)
    first = model(arch)
    fit(first, TASKS, weighting.for_model(first, method, NAMES, options=method_options), data, data,
        options(epochs=3), checkpoint=tmp_path / "checkpoint.pt")
    scramble_rng()
    resumed, later = model(arch), []
    w_resumed = weighting.for_model(resumed, method, NAMES, options=method_options)
    result = fit(resumed, TASKS, w_resumed, data, data, options(), on_epoch=lambda e, log: later.append(log),
                 checkpoint=tmp_path / "checkpoint.pt", resume=True)
    assert result.resumed_at == 3 and result.epochs_run == 6 and later == logs[3:]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(w_whole.state_dict().items(), w_resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):  # parameters and buffers, e.g. uw's log-variances
            assert torch.equal(a, b), name


def test_resume_after_a_crash_with_schedule_accumulation_and_clipping(data, tmp_path):
    kw = {"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 2,
          "accumulate": 2, "clip_grad_norm": 1.0, "epochs": 7}
    whole, _, _ = run(data, **kw)

    def crash(epoch, log):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(**kw), on_epoch=crash,
            checkpoint=tmp_path / "checkpoint.pt")
    scramble_rng()
    resumed = model()
    result = fit(resumed, TASKS, weighting.build("ew", NAMES), data, data, options(**kw),
                 checkpoint=tmp_path / "checkpoint.pt", resume=True)
    assert result.resumed_at == 4  # epoch 4 ended before its checkpoint was written
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_loads_with_weights_only_and_is_written_atomically(data, tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    fit(model(), TASKS, weighting.build("famo", NAMES), data, data,
        options(epochs=2, optimizer="sgd", momentum=0.5, schedule="plateau"), checkpoint=path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and state["options"]["optimizer"] == "sgd"
    assert set(state["rng"]) >= {"shuffle", "torch", "numpy", "python"}
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_resume_refuses_a_checkpoint_of_other_options(data, tmp_path):
    path = tmp_path / "checkpoint.pt"
    fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(epochs=1), checkpoint=path)
    with pytest.raises(CheckpointMismatch, match="lr=0.01"):
        fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(lr=0.1),
            checkpoint=path, resume=True)
    with pytest.raises(CheckpointMismatch, match="another model"):
        fit(model("stl"), TASKS, weighting.build("ew", NAMES), data, data, options(),
            checkpoint=path, resume=True)


def test_resume_without_a_checkpoint_trains_from_scratch(data, tmp_path):
    result = fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(epochs=2),
                 checkpoint=tmp_path / "checkpoint.pt", resume=True)
    assert result.resumed_at == 0 and result.epochs_run == 2


# --- determinism, precision, progress -------------------------------------------------------------

def test_deterministic_mode_holds_during_training_only(data):
    seen = []
    fit(model(), TASKS, weighting.build("ew", NAMES), data, data,
        options(epochs=2, deterministic=True),
        on_epoch=lambda e, log: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_bf16_is_refused_off_cuda(data, tmp_path):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="bf16 needs a CUDA device"):
        fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(precision="bf16"))
    (tmp_path / "params.yaml").write_text(
        "data: {tasks: {y: {kind: regression, target: y}}}\n"
        "train: {precision: bf16, device: cpu}\nvariants: {stl: {arch: stl}}\n")
    with pytest.raises(UserError, match="train: precision bf16 needs a CUDA device"):
        load_params(tmp_path / "params.yaml")


def test_progress_is_a_bar_on_a_terminal_and_one_line_per_epoch_otherwise(data, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(epochs=2, progress=True))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert re.fullmatch(r"epoch 2/2: loss [\d.]+, val [\d.]+, val kind/accuracy [\d.]+, "
                        r"val flag/accuracy [\d.]+, val size/mae [\d.]+, [\d.]+ s", lines[1])
    fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(epochs=2))
    assert capsys.readouterr() == ("", "")  # progress=False
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stdout as a terminal
    fit(model(), TASKS, weighting.build("ew", NAMES), data, data, options(epochs=2, progress=True))
    out = capsys.readouterr().out
    assert "2/2" in out and "epoch 2/2:" not in out


@pytest.mark.slow
def test_compiled_model_trains_as_the_eager_one(data):
    """torch.compile: up to a minute of compilation on 2 CPU cores (less once cached)."""
    compiled, _, _ = run(data, compile=True, epochs=3)
    eager, _, _ = run(data, epochs=3)
    for a, b in zip(compiled.state_dict().values(), eager.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
