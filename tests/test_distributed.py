"""Data parallelism: ``fit`` in 2 processes (torchrun, gloo on CPU) ends with the weights of
the same training in one process, for loss weightings, accumulation and gradient methods at
both levels, the ``ple`` and ``periodic`` numeric encodings, ``groups`` (pcgrad per group),
``stl`` with per-task settings, a TabM-mini ensemble, and MiniLM's top layer fine-tuned; and so
does the train stage under torchrun."""

import json
import sys

import pytest
import torch

from tests import ddp_fit
from tests.helpers import REPO, run
from tests.test_pipeline_dvc import FAST, commit, copy_project, edit_params


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    ddp_fit.main(one)  # in this process: no process group
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "ddp_fit.py"), str(two)], cwd=REPO)
    load = lambda d, name: torch.load(d / f"{name}.pt", weights_only=True)
    return {name: (load(one, f"{name}-initial"), load(one, name), load(two, name))
            for name in ddp_fit.NAMES}


@pytest.mark.parametrize("name", ddp_fit.NAMES)
def test_two_processes_train_what_one_does(weights, name):
    initial, one, two = weights[name]
    for key in one:
        if key.endswith("attention.self.key.bias"):
            continue  # softmax ignores it: its gradient is rounding noise, which Adam scales up
        assert not torch.allclose(one[key], initial[key], atol=1e-3), f"{key} did not train"
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key


def test_torchrun_runs_the_train_stage_in_two_processes(tmp_path):
    """``mtl train`` under torchrun: rank 0 writes the model and logs, which match a
    one-process run of the same variant and seed, and evaluate reads the model as usual; both
    runs train from the same encoded splits."""
    root = copy_project(tmp_path)
    edit_params(root, lambda p: (p["train"].update(FAST, batch_size=64), p.update(seeds=[0])))
    commit(root, "fast training")
    for stage in ("ingest", "augment", "split"):
        run(["mtl", stage], root)
    results, encodings = {}, []
    for processes, launch in ((1, ["mtl"]), (2, [sys.executable, "-m", "torch.distributed.run",
                                                 "--standalone", "--nproc-per-node", "2", "-m", "mtl"])):
        run([*launch, "train", "--variant", "hps-ew", "--seed", "0", "--fresh"], root)
        info = json.loads((root / "models/hps-ew/seed-0/train.json").read_text())
        assert info["processes"] == processes
        logged = json.loads((root / "dvclive/hps-ew/seed-0/metrics.json").read_text())
        results[processes] = torch.load(root / "models/hps-ew/seed-0/model.pt", weights_only=True), logged
        encodings.append({(d.name, (d / "train" / "manifest.json").stat().st_mtime_ns)
                          for d in (root / ".mtl/encoded").iterdir() if d.is_dir()})
    assert len(encodings[0]) == 1 and encodings[1] == encodings[0]  # encoded once, then reused
    (one, logged_one), (two, logged_two) = results[1], results[2]
    for key, value in one["state_dict"].items():
        assert torch.allclose(value, two["state_dict"][key], rtol=1e-4, atol=1e-5), key
    # the last epoch's training losses, task weights and validation metrics, as logged
    assert flat(logged_two) == pytest.approx(flat(logged_one), rel=1e-4, abs=1e-5)
    run(["mtl", "evaluate", "--variant", "hps-ew", "--seed", "0"], root)  # reads rank 0's model


def flat(nested: dict, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1.0}}`` -> ``{"a/b": 1.0}``."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = value
    return out
