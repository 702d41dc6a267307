"""arch: groups (issue 16): one network per group of tasks, its extremes (stl and hps), the
weighting per group, the affinity probe across groups, and the TAG search over partitions."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtl import paths
from mtl.config import load_params
from mtl.engine import archs, grouping, weighting
from mtl.engine.affinity import AffinityProbe
from mtl.engine.affinity_summary import from_json, lower_bound, mean_over_runs
from mtl.engine.encoders import TabularEncoder, TabularPreprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit, predict
from mtl.io import write_json
from mtl.stages import group
from tests.helpers import REPO
from tests.test_engine import TASKS, make_table

NAMES = [t.name for t in TASKS]
OPTIONS = FitOptions(epochs=3, batch_size=16, lr=1e-2, seed=0)


def trained(arch: str, method: str, options: dict | None = None, tasks=TASKS) -> torch.nn.Module:
    """``arch`` built from seed 0 and trained 3 epochs with ``method`` (per group for groups)."""
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    torch.manual_seed(0)
    model = archs.build(arch, lambda: TabularEncoder(prep.num_dim, prep.cardinalities), tasks,
                        [16, 8], [8], 0.0, options)
    names = [t.name for t in tasks]
    method = weighting.for_model(model, method, names)
    data = TaskData.from_table(table, prep, tasks)
    fit(model, tasks, method, data, data, OPTIONS)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("method", ["ew", "mgda"])
def test_one_group_per_task_trains_stls_weights(method):
    groups = trained("groups", method, {"groups": [[n] for n in NAMES]})
    assert same_weights(groups, trained("stl", method))


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_one_group_of_all_trains_hps_weights(method):
    groups = trained("groups", method, {"groups": [NAMES]})
    assert same_weights(groups, trained("hps", method))


def test_a_gradient_method_never_mixes_groups():
    """MGDA per group: the network of {size} trains exactly as a single-task network of size
    alone would; one MGDA over all three tasks would scale its step by a weight below 1."""
    model = trained("groups", "mgda", {"groups": [["kind", "flag"], ["size"]]})
    alone = trained("groups", "mgda", {"groups": [["kind", "flag"], ["size"]]})
    assert same_weights(model, alone)  # deterministic
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    torch.manual_seed(0)
    fresh = archs.build("groups", lambda: TabularEncoder(prep.num_dim, prep.cardinalities), TASKS,
                        [16, 8], [8], 0.0, {"groups": [["kind", "flag"], ["size"]]})
    size_net = fresh.members[1]
    data = TaskData.from_table(table, prep, TASKS)
    fit(size_net, TASKS[2:], weighting.build("mgda", ["size"]), data, data, OPTIONS)
    assert same_weights(model.members[1], size_net)


def test_the_affinity_probe_measures_pairs_within_a_group_only():
    model = trained("groups", "ew", {"groups": [["kind", "flag"], ["size"]]})
    table = make_table()
    prep = TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[])
    probe = AffinityProbe(TASKS, TaskData.from_table(table, prep, TASKS), 2, 32, seed=0)
    measured = probe.measure(model, lr=1e-2)
    across = [(0, 2), (2, 0), (1, 2), (2, 1)]
    assert all(measured["lookahead"][i, j] == 0 and measured["cosine"][i, j] == 0
               for i, j in across)
    assert measured["lookahead"][0, 1] != 0 and measured["cosine"][0, 1] != 0


BELL = [1, 1, 2, 5, 15, 52, 203, 877, 4140]


@pytest.mark.parametrize("k", range(1, 9))
def test_partitions_are_every_partition_once(k):
    found = [tuple(tuple(g) for g in p) for p in grouping.partitions(k, k)]
    assert len(found) == len(set(found)) == BELL[k]
    assert all(sorted(i for g in p for i in g) == list(range(k)) for p in found)
    assert all(len(p) <= 2 for p in grouping.partitions(k, 2))


def planted(k: int, blocks: list[list[int]], seed: int = 0) -> np.ndarray:
    """Affinities: positive within a block, negative across, plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.05, 0.01, (k, k))
    for block in blocks:
        z[np.ix_(block, block)] = rng.normal(0.1, 0.01, (len(block),) * 2)
    return z


def test_the_search_recovers_planted_blocks_exhaustive_and_greedy():
    z = planted(6, [[0, 2, 4], [1, 3, 5]])
    (best_score, best), *runners = grouping.choose(z, 3)
    assert best == [[0, 2, 4], [1, 3, 5]] and len(runners) == 3
    assert all(score < best_score for score, _ in runners)
    assert best_score == max(grouping.score(z, p) for p in grouping.partitions(6, 3))
    big = planted(10, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])  # above MAX_EXHAUSTIVE: greedy
    assert grouping.choose(big, 2) == [(grouping.score(big, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
                                        [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])]
    assert grouping.choose(z, 1)[0][1] == [list(range(6))]


def test_a_task_alone_scores_0_not_the_notebooks_minus_1e6():
    """Where we differ from the TAG notebook: a task that every other task hurts stands alone."""
    z = np.array([[1.0, 0.2, -0.3], [0.2, 1.0, -0.3], [-0.3, -0.3, 1.0]])
    score, best = grouping.choose(z, 3)[0]
    assert best == [[0, 1], [2]] and score == pytest.approx((0.2 + 0.2 + 0) / 3)
    assert grouping.score(z, [[0, 1, 2]]) < score


# MultiFashion's measured lookahead affinities (hps-ew, 3 seeds): left and right help each other
# on two seeds and hurt on one, far below what a task's own step does for it (the diagonal).
DISAGREE = [np.array([[3.9e-3, 1.3e-4], [1.4e-4, 3.4e-3]]),
            np.array([[8.2e-3, -5.7e-4], [-5.2e-4, 3.2e-3]]),
            np.array([[1.09e-2, 9.7e-4], [1.08e-3, 4.7e-3]])]


def test_standard_errors_keep_apart_tasks_whose_transfer_the_seeds_disagree_on():
    """Our option beside TAG (which averages): each affinity less k standard errors of its mean."""
    assert np.allclose(lower_bound(DISAGREE, 0), np.mean(DISAGREE, axis=0))
    assert grouping.choose(lower_bound(DISAGREE, 0), 2)[0][1] == [[0, 1]]
    assert grouping.choose(lower_bound(DISAGREE, 1), 2)[0][1] == [[0], [1]]
    agree = [z + 5e-3 for z in DISAGREE]  # the same spread around a clear transfer
    assert grouping.choose(lower_bound(agree, 1), 2)[0][1] == [[0, 1]]
    once = [z.copy() for z in DISAGREE]
    once[0][0, 1] = once[1][0, 1] = np.nan  # measured by one run: its value, whatever k
    assert lower_bound(once, 3)[0, 1] == pytest.approx(9.7e-4)


def test_the_group_stage_applies_standard_errors(tmp_path, monkeypatch):
    """group@<variant> reads the source's affinity.json of every seed and counts the option."""
    monkeypatch.chdir(tmp_path)
    tasks = ["species", "sex", "body_mass"]
    for seed, z in enumerate(DISAGREE):
        full = np.full((3, 3), -1e-3)
        full[:2, :2] = z
        write_json({"tasks": tasks, "lookahead": full.tolist(), "cosine": full.tolist(),
                    "epochs": 3, "every": 2}, paths.model_dir("hps-ew", seed) / "affinity.json")

    def chosen(margin: float) -> dict:
        source = {"from": "hps-ew", "max_groups": 3, "standard_errors": margin}
        params = load_params(REPO / "params.yaml", [
            "seeds=[0, 1, 2]", f"grouped={{tag: {{arch: groups, arch_options: {{groups: {source}}}}}}}"])
        return group.chosen(params, "tag")

    assert chosen(0)["groups"] == [["species", "sex"], ["body_mass"]]
    assert chosen(1) | {"runners_up": []} == {
        "from": "hps-ew", "seeds": [0, 1, 2], "max_groups": 3, "standard_errors": 1,
        "groups": [["species"], ["sex"], ["body_mass"]], "score": 0.0, "runners_up": []}


BLOCKS = ["a1", "a2", "b1", "b2"]
BLOCK_TASKS = [Task(n, "regression", n) for n in BLOCKS]


def blocks_table(n: int, seed: int) -> pa.Table:
    """Planted structure: a1, a2 read the direction x0 + x1, b1, b2 the orthogonal x2 + x3. A
    trunk of width 1 holds one direction: the blocks' gradients on it conflict."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, 6))
    fa, fb = x[:, 0] + x[:, 1], x[:, 2] + x[:, 3]
    ys = {"a1": fa, "a2": 2 * fa, "b1": fb, "b2": 0.5 * x[:, 4] - fb}
    return pa.table({**{f"x{i}": x[:, i] for i in range(6)},
                     **{k: v + 0.1 * g.standard_normal(n) for k, v in ys.items()}})


def test_planted_blocks_are_recovered_and_their_networks_beat_hps_ew():
    train_t, test_t = blocks_table(400, 0), blocks_table(400, 1)
    prep = TabularPreprocessor.fit(train_t, [f"x{i}" for i in range(6)], [], indicators=[])
    train, test = (TaskData.from_table(t, prep, BLOCK_TASKS) for t in (train_t, test_t))

    def run(seed: int, options: dict | None = None) -> tuple[dict[str, float], dict | None]:
        torch.manual_seed(seed)
        arch = "hps" if options is None else "groups"
        model = archs.build(arch, lambda: TabularEncoder(prep.num_dim, []), BLOCK_TASKS, [1], [],
                            0.0, options)
        method = weighting.for_model(model, "ew", BLOCKS)
        probe = AffinityProbe(BLOCK_TASKS, train, 2, 64, seed) if options is None else None
        fit(model, BLOCK_TASKS, method, train, train,
            FitOptions(epochs=20, batch_size=32, lr=1e-2, seed=seed, patience=0, progress=False),
            on_epoch=(lambda epoch, log: probe.measure(model, log["lr"])) if probe else None)
        out = predict(model, test.inputs)
        mae = {t: float((out[t][:, 0] - test.targets[t]).abs().mean()) for t in BLOCKS}
        return mae, probe.summary() if probe else None

    hps = [run(seed) for seed in range(3)]
    z = from_json(mean_over_runs([summary for _, summary in hps])["lookahead"])
    best = [[BLOCKS[i] for i in g] for g in grouping.choose(z, 2)[0][1]]
    assert best == [["a1", "a2"], ["b1", "b2"]]
    grouped = [run(seed, {"groups": best})[0] for seed in range(3)]
    for (mae, _), mine in zip(hps, grouped):  # the block that lost the trunk, every seed
        assert mine["b1"] < 0.7 * mae["b1"] and mine["b2"] < 0.7 * mae["b2"]
    for task in ("a1", "a2"):  # the block that won it: no worse
        assert np.mean([g[task] for g in grouped]) < 1.1 * np.mean([m[task] for m, _ in hps])


@pytest.mark.parametrize("fmt,int8", [("torchscript", False), ("torchscript", True),
                                      ("onnx", False), ("onnx", True)])
def test_a_groups_model_exports_and_round_trips(tmp_path, fmt, int8):
    """Export (TorchScript, ONNX, int8) and the checkpoint of an arch: groups model."""
    from mtl.engine.checkpoint import Bundle
    from mtl.engine.encoders import Preprocessor
    from mtl.stages.export import Exported, _onnx, _torchscript

    table = make_table()
    prep = Preprocessor(TabularPreprocessor.fit(table, ["x0", "x1"], ["colour"], indicators=[]))
    torch.manual_seed(0)
    bundle = Bundle.create("groups", TASKS, prep, {"hidden": [16], "head_hidden": [8], "dropout": 0.0,
                                                   "options": {"groups": [["kind", "flag"], ["size"]],
                                                               "inner": "mmoe"}}, {})
    bundle.save(tmp_path / "model.pt")
    loaded = Bundle.load(tmp_path / "model.pt")
    inputs = prep.transform(table)
    reference = loaded.model.eval()(inputs)
    assert all(torch.equal(reference[n], bundle.model.eval()(inputs)[n]) for n in NAMES)
    model = Exported(loaded.model, list(inputs), NAMES)
    example = tuple(inputs.values())
    path = tmp_path / f"model.{fmt}"
    runner = (_onnx(model, example, list(inputs), path, int8) if fmt == "onnx"
              else _torchscript(model, example, path, int8))
    for name, out in zip(NAMES, runner(example)):
        assert torch.allclose(torch.as_tensor(out), reference[name], atol=0.05 if int8 else 1e-4)
