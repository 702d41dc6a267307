"""Architectures on a tiny table: output shapes, what "shared" means, the properties each paper
defines (softmax gates, cross-stitch mixing, attention masks), training and checkpoints."""

import inspect
import math

import pytest
import torch

from mtl.engine import ARCH_OPTIONS, ARCHITECTURES, archs, weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor, TabularEncoder, TabularPreprocessor
from mtl.engine.trainer import FitOptions, TaskData, fit, predict
from tests.test_engine import TASKS, make_table

NEW = ("mmoe", "cgc", "ple", "cross_stitch", "mtan")
NAMES = [t.name for t in TASKS]


GROUPS = {"groups": [["kind", "flag"], ["size"]]}  # arch groups' options in these tests


def setup(arch: str, options: dict | None = None, hidden=(16, 8), head_hidden=(8,)):
    """A model on a table with numeric and categorical inputs, its inputs, and its data."""
    options = GROUPS if arch == "groups" and options is None else options
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    torch.manual_seed(0)
    model = archs.build(arch, lambda: TabularEncoder(prep.num_dim, prep.cardinalities), TASKS,
                        list(hidden), list(head_hidden), 0.0, options)
    data = TaskData.from_table(table, prep, TASKS)
    return model, data.inputs, data


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_task_gets_its_own_output_shape(arch):
    model, inputs, _ = setup(arch)
    assert inputs["num"].shape[1] == 2 and inputs["cat"].shape[1] == 1
    outputs = model(inputs)
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "kind": (120, 3), "flag": (120, 1), "size": (120, 1)}


@pytest.mark.parametrize("arch,options", [(a, None) for a in ARCHITECTURES]
                         + [("ple", {"levels": 3}), ("mmoe", {"experts": 2})])
def test_shared_parameters_are_exactly_those_every_task_loss_depends_on(arch, options):
    model, inputs, data = setup(arch, options)
    params = list(model.parameters())
    outputs, features = model.forward_with_features(inputs)
    assert (features is not None) == (arch == "hps")
    depends = {}  # per task, the parameters its loss depends on
    for t in TASKS:
        loss = t.loss(outputs[t.name], data.targets[t.name], data.masks[t.name])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        depends[t.name] = {id(p) for p, g in zip(params, grads)
                           if g is not None and bool(g.abs().sum() > 0)}
    shared = {id(p) for p in model.shared_parameters()}
    assert shared <= {id(p) for p in params}
    if arch == "groups":  # shared within each group of two or more; a group of one: its trunk
        kind_flag, size = model.members
        assert shared == ((depends["kind"] & depends["flag"])
                          | {id(p) for p in [*size.encoder.parameters(), *size.trunk.parameters()]})
        assert model.selection_groups() == [(["kind", "flag"], kind_flag), (["size"], size)]
        return
    assert shared == set.intersection(*depends.values())
    assert model.selection_groups() == ([([n], model.members[n]) for n in NAMES] if arch == "stl"
                                        else [(NAMES, model)])


def shared_linears_read_by_no_other(model, inputs) -> list[torch.nn.Parameter]:
    """The weights of the shared linear layers whose output no other shared linear layer reads,
    directly or not: the last shared layer before the towers, read off the autograd graph."""
    shared = {id(p) for p in model.shared_parameters()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in shared]
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.__setitem__(m, out)) for m in linears]
    model(inputs)
    for hook in hooks:
        hook.remove()
    return [m.weight for m in linears if not any(
        torch.autograd.grad(outputs[other].sum(), outputs[m], retain_graph=True,
                            allow_unused=True)[0] is not None
        for other in linears if other is not m)]


LAYER_CASES = [(a, None) for a in ARCHITECTURES] + [
    ("ple", {"levels": 3}), ("mmoe", {"experts": 2}), ("cgc", {"shared_experts": 3})]


@pytest.mark.parametrize("arch,options", LAYER_CASES)
def test_last_shared_layer_is_shared_and_the_last_before_the_towers(arch, options):
    model, inputs, data = setup(arch, options)
    layer = model.last_shared_layer()
    if arch in ("stl", "groups"):  # no layer every task reads (groups: each network has its own)
        assert layer == []
        return
    outputs = model(inputs)
    for t in TASKS:  # every task's loss has a nonzero gradient on every matrix of the layer
        loss = t.loss(outputs[t.name], data.targets[t.name], data.masks[t.name])
        grads = torch.autograd.grad(loss, layer, retain_graph=True)
        assert all(bool(g.abs().sum() > 0) for g in grads), t.name
    assert {id(p) for p in layer} == {id(p) for p in shared_linears_read_by_no_other(model, inputs)}
    expected = {"hps": 1, "mtan": 1, "cross_stitch": len(TASKS), "mmoe": 4, "cgc": 2, "ple": 2}
    expected |= {"ple-levels": 2, "mmoe-experts": 2, "cgc-shared_experts": 3}
    key = arch if options is None else f"{arch}-{next(iter(options))}"
    assert len(layer) == expected[key] and all(p.shape == (8, 16) for p in layer)


def test_each_task_reaches_only_its_own_row_of_the_last_stitch_unit():
    """Why the last stitch unit is not cross_stitch's last shared layer: per entry, only one
    task's loss depends on it."""
    model, inputs, data = setup("cross_stitch")
    outputs = model(inputs)
    for k, t in enumerate(TASKS):
        loss = t.loss(outputs[t.name], data.targets[t.name], data.masks[t.name])
        grad = torch.autograd.grad(loss, model.stitches[-1], retain_graph=True)[0]
        assert (grad[k] != 0).all() and (grad[torch.arange(3) != k] == 0).all()


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("stl", "groups")])
def test_without_hidden_layers_the_last_shared_layer_is_the_encoders(arch):
    model, _, _ = setup(arch, hidden=())
    assert [id(p) for p in model.last_shared_layer()] == [id(model.encoder.embeddings[0].weight)]


@pytest.mark.parametrize("arch,options,counts", [
    ("mmoe", {"experts": 3}, [(3, 0)]),
    ("cgc", {"shared_experts": 3, "task_experts": 2}, [(3, 2)]),
    ("ple", {"shared_experts": 1, "task_experts": 2, "levels": 3}, [(1, 2)] * 3)])
def test_expert_options_set_the_number_of_experts_per_level(arch, options, counts):
    model, inputs, _ = setup(arch, options)
    assert [(len(level.shared), len(level.specific["kind"])) for level in model.levels] == counts
    assert [g["kind"].shape[1] for g in model.gates(inputs)] == [a + b for a, b in counts]


def test_arch_options_are_the_constructor_defaults():
    classes = {"hps": archs.HPS, "stl": archs.STL, "mmoe": archs.MMoE, "cgc": archs.CGC,
               "ple": archs.PLE, "cross_stitch": archs.CrossStitch, "mtan": archs.MTAN,
               "groups": archs.Groups}
    assert tuple(classes) == ARCHITECTURES
    for arch, cls in classes.items():
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        assert defaults == ARCH_OPTIONS[arch], arch
    with pytest.raises(ValueError, match="no option"):
        setup("cgc", {"experts": 3})


@pytest.mark.parametrize("arch,options,widths", [
    ("mmoe", None, [4]), ("mmoe", {"experts": 3}, [3]),
    ("cgc", None, [3]), ("ple", {"task_experts": 2, "levels": 3}, [4, 4, 4])])
def test_gates_are_a_softmax_over_the_experts_a_task_sees(arch, options, widths):
    model, inputs, _ = setup(arch, options)
    levels = model.gates(inputs)
    assert len(levels) == len(widths)
    for gates, width in zip(levels, widths):
        for w in gates.values():
            assert w.shape == (120, width)
            assert (w >= 0).all()
            assert torch.allclose(w.sum(dim=1), torch.ones(120))


def test_cgc_task_gates_read_only_their_own_and_the_shared_experts():
    model, inputs, _ = setup("cgc")
    before = model(inputs)
    perturb(model.levels[0].specific["flag"])
    after = model(inputs)
    assert torch.equal(before["kind"], after["kind"])
    assert torch.equal(before["size"], after["size"])
    assert not torch.equal(before["flag"], after["flag"])


def test_cross_stitch_at_initialisation_mixes_as_its_matrix_says():
    model, inputs, _ = setup("cross_stitch", hidden=(16,), head_hidden=())
    assert torch.allclose(model.stitches[0], torch.tensor([[0.9, 0.05, 0.05],
                                                           [0.05, 0.9, 0.05],
                                                           [0.05, 0.05, 0.9]]))
    x = model.encoder(inputs)
    kind, flag, size = (model.columns[n][0](x) for n in NAMES)
    mixed = {"kind": 0.9 * kind + 0.05 * (flag + size),
             "flag": 0.9 * flag + 0.05 * (kind + size),
             "size": 0.9 * size + 0.05 * (kind + flag)}
    outputs = model(inputs)
    for name in NAMES:
        assert torch.allclose(outputs[name], model.heads[name](mixed[name]), atol=1e-6)


def test_cross_stitch_with_identity_units_keeps_the_columns_apart():
    model, inputs, _ = setup("cross_stitch")
    with torch.no_grad():
        for alpha in model.stitches:
            alpha.copy_(torch.eye(3))
    before = model(inputs)
    perturb(model.columns["flag"])
    after = model(inputs)
    assert torch.equal(before["kind"], after["kind"])
    assert torch.equal(before["size"], after["size"])
    assert not torch.equal(before["flag"], after["flag"])


def test_mtan_masks_lie_strictly_between_zero_and_one():
    model, inputs, _ = setup("mtan")
    masks = model.masks(inputs)
    assert list(masks) == NAMES
    for layers in masks.values():
        assert [m.shape for m in layers] == [(120, 16), (120, 8)]
        for m in layers:
            assert ((m > 0) & (m < 1)).all()


@pytest.mark.parametrize("arch", NEW)
def test_training_end_to_end_reduces_the_validation_loss(arch):
    model, _, data = setup(arch)
    logs = []
    fit(model, TASKS, weighting.build("ew", NAMES), data, data,
        FitOptions(epochs=8, batch_size=16, lr=1e-2, seed=0),
        on_epoch=lambda epoch, log: logs.append(log))
    assert all(math.isfinite(v) for log in logs for v in log.values())
    for name in NAMES:
        assert logs[-1][f"val/loss/{name}"] < 0.5 * logs[0][f"val/loss/{name}"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_gives_identical_predictions(arch, tmp_path):
    table = make_table()
    prep = Preprocessor(TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[]))
    torch.manual_seed(0)
    bundle = Bundle.create(arch, TASKS, prep, {"hidden": [16, 8], "head_hidden": [8], "dropout": 0.1,
                                               "options": GROUPS if arch == "groups" else None}, {})
    bundle.save(tmp_path / "model.pt")
    loaded = Bundle.load(tmp_path / "model.pt")
    expected = predict(bundle.model, prep.transform(table))
    got = predict(loaded.model, loaded.preprocessor.transform(table))
    assert all(torch.equal(expected[name], got[name]) for name in NAMES)
