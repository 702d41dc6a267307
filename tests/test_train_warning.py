"""``train`` warns, on stderr and in train.json, when the best validation epoch comes very early
(a model that overfits almost from the start)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

from mtl import paths
from mtl.config import load_params
from mtl.stages import augment, ingest, split, train


@pytest.mark.parametrize("best,run,warned", [
    (0, 10, True),  # epoch 1 of 10
    (1, 10, False),  # epoch 2 is more than 10% of 10
    (1, 20, True),  # epoch 2 of 20
    (2, 40, False),  # epoch 3: later than the second
    (0, 9, False),  # too few epochs run to tell
])
def test_early_best_is_the_first_tenth_and_at_most_the_second_epoch(best, run, warned):
    assert bool(train.early_best("v", 0, {"t": best, "u": 5}, run)) == warned


@pytest.fixture
def noise(tmp_path, monkeypatch):
    """A project whose labels are noise: every epoch fits the training rows better and the
    validation rows worse, so the best validation epoch is the first."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    columns = {f"x{i}": rng.normal(size=300) for i in range(8)}
    columns |= {"y": rng.choice(["no", "yes"], 300), "z": rng.normal(size=300)}
    pacsv.write_csv(pa.table(columns), tmp_path / "noise.csv")
    raw = {"data": {"source": "noise.csv", "tasks": {"y": {"kind": "binary", "target": "y"},
                                                     "z": {"kind": "regression", "target": "z"}}},
           "augment": {"copies": 0}, "seeds": [0], "variants": {"hps-ew": {"arch": "hps"}},
           "compare": {"baseline": "hps-ew"},
           "train": {"epochs": 12, "patience": 0, "lr": 0.01, "hidden": [128, 128],
                     "affinity_batches": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    for stage in (ingest, augment, split):
        stage.run(params)
    return params


def test_train_warns_when_the_best_epoch_comes_very_early(noise, capsys):
    train.run(noise, "hps-ew", 0)
    err = capsys.readouterr().err.splitlines()
    assert err == [("warning: train@hps-ew-0: the best validation loss came very early (y at epoch "
                   "1, z at epoch 1; 12 epochs run), so the model overfits almost from the start; "
                   "try a lower train.lr or more train.weight_decay, and with text columns fewer "
                   "encoders.hashing.buckets or a smaller encoders.hashing.dim")]
    info = json.loads((paths.model_dir("hps-ew", 0) / "train.json").read_text())
    assert info["warnings"] == [err[0].removeprefix("warning: ")]


def test_train_does_not_warn_after_too_few_epochs_to_tell(noise, capsys):
    train.run(noise.model_copy(update={"train": noise.train.model_copy(update={"epochs": 5})}),
              "hps-ew", 0)
    assert "warning" not in capsys.readouterr().err
    assert json.loads((paths.model_dir("hps-ew", 0) / "train.json").read_text())["warnings"] == []
