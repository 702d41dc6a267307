"""Data parallelism: ``fit`` in 2 processes (torchrun, gloo on CPU) ends with the weights of
the same training in one process, for loss weightings, accumulation and gradient methods at
both levels; and so does the train stage under torchrun."""

import json
import sys

import pytest
import torch

from tests.ddp_fit import CONFIGS
from tests.helpers import REPO, run
from tests.test_pipeline_dvc import FAST, commit, copy_project, edit_params


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    script = str(REPO / "tests" / "ddp_fit.py")
    run([sys.executable, script, str(one)], cwd=REPO)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         script, str(two)], cwd=REPO)
    load = lambda d, name: torch.load(d / f"{name}.pt", weights_only=True)
    return load(one, "initial"), {name: (load(one, name), load(two, name)) for name, *_ in CONFIGS}


@pytest.mark.parametrize("name", [name for name, *_ in CONFIGS])
def test_two_processes_train_what_one_does(weights, name):
    initial, trained = weights
    one, two = trained[name]
    for key in one:
        assert not torch.allclose(one[key], initial[key], atol=1e-3), f"{key} did not train"
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key


def test_torchrun_runs_the_train_stage_in_two_processes(tmp_path):
    """``mtl train`` under torchrun: rank 0 writes the model and logs, which match a
    one-process run of the same variant and seed; evaluate reads them as usual; both runs
    train from the same encoded splits."""
    root = copy_project(tmp_path)
    edit_params(root, lambda p: (p["train"].update(FAST, batch_size=64), p.update(seeds=[0])))
    commit(root, "fast training")
    for stage in ("ingest", "augment", "split"):
        run(["mtl", stage], root)
    results, encodings = {}, []
    for processes, launch in ((1, ["mtl"]), (2, [sys.executable, "-m", "torch.distributed.run",
                                                 "--standalone", "--nproc-per-node", "2", "-m", "mtl"])):
        run([*launch, "train", "--variant", "hps-ew", "--seed", "0", "--fresh"], root)
        run(["mtl", "evaluate", "--variant", "hps-ew", "--seed", "0"], root)
        info = json.loads((root / "models/hps-ew/seed-0/train.json").read_text())
        assert info["processes"] == processes
        metrics = json.loads((root / "metrics/variants/hps-ew/seed-0.json").read_text())
        results[processes] = torch.load(root / "models/hps-ew/seed-0/model.pt", weights_only=True), metrics
        assert (root / "dvclive/hps-ew/seed-0/metrics.json").is_file()
        encodings.append({(d.name, (d / "train" / "manifest.json").stat().st_mtime_ns)
                          for d in (root / ".mtl/encoded").iterdir() if d.is_dir()})
    assert len(encodings[0]) == 1 and encodings[1] == encodings[0]  # encoded once, then reused
    (one, metrics_one), (two, metrics_two) = results[1], results[2]
    for key, value in one["state_dict"].items():
        assert torch.allclose(value, two["state_dict"][key], rtol=1e-4, atol=1e-5), key
    for task, values in metrics_one.items():
        assert metrics_two[task] == pytest.approx(values, rel=1e-4, abs=1e-5), task
