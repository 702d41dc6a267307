"""The built-in real data sets (MultiFashion, tweets, Adult) from ../shared/data: their columns
and labels, every architecture training on them through the FeatureEncoder, and the CLI end to
end on ``multifashion:600``. Skipped where the shared data folder is absent."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mtl.config import Params, load_params
from mtl.engine import ARCHITECTURES, weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.trainer import FitOptions, TaskData, fit
from mtl.errors import UserError
from mtl.sources import (
    FASHION_CLASSES,
    PAIRING_SEED,
    adult,
    multifashion,
    read_idx,
    read_source,
    shared_data,
    tweets,
)
from mtl.stages import ingest
from tests.helpers import REPO, arch_options, env


def needs(folder: str):
    return pytest.mark.skipif(not (shared_data() / folder).is_dir(),
                              reason=f"real data {shared_data() / folder} is absent")


@needs("fashion-mnist")
def test_multifashion_puts_the_first_item_top_left_and_the_second_bottom_right():
    table = multifashion(50)
    items = read_idx(shared_data() / "fashion-mnist/train-images-idx3-ubyte.gz")
    labels = read_idx(shared_data() / "fashion-mnist/train-labels-idx1-ubyte.gz")
    assert table.column_names == ["id", "image", "left", "right"]
    assert table.num_rows == 50 and len(set(table["id"].to_pylist())) == 50
    partner = np.random.default_rng(PAIRING_SEED).permutation(len(items))
    for i, row in enumerate(table.to_pylist()[:10]):
        canvas = np.frombuffer(row["image"], dtype=np.uint8).reshape(36, 36)
        a_item, b_item = items[i], items[partner[i]]
        assert (row["left"], row["right"]) == (FASHION_CLASSES[labels[i]], FASHION_CLASSES[labels[partner[i]]])
        assert np.array_equal(canvas[:8, :28], a_item[:8])  # the top strip only A covers
        assert np.array_equal(canvas[:28, :8], a_item[:, :8])
        assert np.array_equal(canvas[8:28, 8:28], np.maximum(a_item[8:, 8:], b_item[:20, :20]))
        assert np.array_equal(canvas[8:, 28:], b_item[:, 20:])
        assert not canvas[28:, :8].any() and not canvas[:8, 28:].any()  # the empty corners


@needs("fashion-mnist")
def test_multifashion_is_deterministic_and_a_limit_keeps_a_prefix():
    small, large = multifashion(30), multifashion(200)
    assert small.equals(multifashion(30))
    assert small.equals(large.slice(0, 30))
    assert set(large["left"].to_pylist()) | set(large["right"].to_pylist()) == set(FASHION_CLASSES)


@needs("tweets")
def test_tweets_columns_and_labels():
    table = tweets()
    assert table.column_names == ["id", "text", "source", "log_retweets", "log_favorites"]
    assert table.num_rows == 20761
    assert set(table["source"].to_pylist()) == {"Android", "iPhone", "Web Client", "other"}
    assert len(set(table["id"].to_pylist())) == table.num_rows
    retweets = table["log_retweets"].to_numpy()
    assert np.isfinite(retweets).all() and retweets.min() == 0.0
    assert table["text"].null_count == 0


@needs("adult")
def test_adult_columns_and_labels():
    table = adult()
    assert table.num_rows == 32561 + 16281
    assert {"id", "age", "workclass", "marital_status", "relationship", "hours_per_week", "income",
            "never_married"} <= set(table.column_names)
    assert sorted(set(table["income"].to_pylist())) == ["<=50K", ">50K"]  # test file's '.' dropped
    assert sorted(set(table["never_married"].to_pylist())) == ["no", "yes"]
    never = np.array(table["never_married"].to_pylist()) == "yes"
    assert (np.array(table["marital_status"].to_pylist())[never] == "Never-married").all()
    assert table["workclass"].null_count > 0 and "?" not in table["workclass"].to_pylist()
    assert table.schema.field("hours_per_week").type == pa.float64()


def train_every_arch(table: pa.Table, data: dict, tasks: list[Task], encoder: dict, epochs: int,
                     hashing: dict | None = None, weightings: tuple[str, ...] = ("ew",)) -> None:
    """Each architecture trains ``epochs`` epochs with each weighting: finite losses, validation
    loss going down."""
    params = Params.model_validate({"data": {"source": "unused"} | data,
                                    "variants": {"stl": {"arch": "stl"}}})
    table, schema = ingest.prepare(table, params.data)
    val_rows = np.arange(table.num_rows) % 5 == 0
    train_table, val_table = table.filter(pa.array(~val_rows)), table.filter(pa.array(val_rows))
    prep = Preprocessor.fit(train_table, schema["features"], hashing=hashing)
    names = [t.name for t in tasks]
    train, val = (TaskData.from_table(t, prep, tasks) for t in (train_table, val_table))
    for arch in ARCHITECTURES:
        for method in weightings:
            torch.manual_seed(0)
            bundle = Bundle.create(arch, tasks, prep, {"hidden": [32], "head_hidden": [16],
                                                       "dropout": 0.0,
                                                       "options": arch_options(arch, tasks)},
                                   {}, encoder)
            logs: list[dict] = []
            fit(bundle.model, tasks, weighting.for_model(bundle.model, method, names), train, val,
                FitOptions(epochs=epochs, batch_size=64, lr=3e-3, seed=0),
                on_epoch=lambda epoch, log, logs=logs: logs.append(log))
            val_loss = [sum(log[f"val/loss/{n}"] for n in names) for log in logs]
            assert np.isfinite(val_loss).all(), (arch, method)
            assert val_loss[-1] < val_loss[0], f"{arch} + {method}: validation loss {val_loss}"


def test_every_architecture_with_ew_uw_pcgrad_learns_the_default_penguins_data():
    table = read_source("penguins")
    params = load_params(REPO / "params.yaml")
    data = {"tasks": {n: t.model_dump() for n, t in params.data.tasks.items()}}
    body = np.array(table["body_mass_g"].to_numpy(zero_copy_only=False), dtype=float)
    tasks = [Task("species", "multiclass", "species", classes=("Adelie", "Chinstrap", "Gentoo")),
             Task("sex", "binary", "sex", classes=("female", "male")),
             Task("body_mass", "regression", "body_mass_g", mean=float(np.nanmean(body)),
                  std=float(np.nanstd(body)))]
    train_every_arch(table, data, tasks, {}, epochs=4, weightings=("ew", "uw", "pcgrad"))


@needs("fashion-mnist")
def test_every_architecture_with_ew_uw_pcgrad_learns_multifashion_images():
    classes = tuple(sorted(FASHION_CLASSES))
    tasks = [Task("left", "multiclass", "left", classes=classes),
             Task("right", "multiclass", "right", classes=classes)]
    data = {"id_column": "id", "image": ["image"], "tasks": {
        "left": {"kind": "multiclass", "target": "left"}, "right": {"kind": "multiclass", "target": "right"}}}
    train_every_arch(multifashion(600), data, tasks, {"dim": 32, "image_channels": [8, 16]}, epochs=3,
                     weightings=("ew", "uw", "pcgrad"))


@needs("tweets")
def test_every_architecture_learns_tweets_with_hashed_text():
    table = tweets()
    table = table.take(pa.array(np.arange(0, table.num_rows, 20)))  # 1,039 tweets from every year
    sources = tuple(sorted(set(table["source"].to_pylist())))
    tasks = [Task("source", "multiclass", "source", classes=sources),
             Task("retweets", "regression", "log_retweets", mean=float(np.mean(table["log_retweets"])),
                  std=float(np.std(table["log_retweets"])))]
    data = {"id_column": "id", "text": ["text"], "drop": ["log_favorites"], "tasks": {
        "source": {"kind": "multiclass", "target": "source"},
        "retweets": {"kind": "regression", "target": "log_retweets"}}}
    train_every_arch(table, data, tasks, {"dim": 16}, epochs=3, hashing={"buckets": 2**12})


@needs("fashion-mnist")
def test_the_cli_runs_every_stage_on_multifashion(tmp_path):
    params = yaml.safe_load((REPO / "examples/multifashion.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = "multifashion:600"
    params["train"] |= {"epochs": 2, "hidden": [16], "head_hidden": [8]}
    params["encoders"] |= {"dim": 16, "image_channels": [8]}
    params["seeds"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    for stage in (["ingest"], ["augment"], ["split"], ["train", "--variant", "hps-ew"],
                  ["evaluate", "--variant", "hps-ew"]):
        result = subprocess.run([sys.executable, "-m", "mtl", *stage], cwd=tmp_path, env=env(),
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"mtl {stage}: {result.stdout}\n{result.stderr}"
    schema = json.loads((tmp_path / "data/ingested/schema.json").read_text())
    assert schema["features"] == {"image": {"kind": "image", "n_missing": 0, "shape": [36, 36]}}
    n_test = pq.read_metadata(tmp_path / "data/split/test.parquet").num_rows
    metrics = json.loads((tmp_path / "metrics/variants/hps-ew/seed-0.json").read_text())
    for task in ("left", "right"):
        assert metrics[task]["n_test"] == n_test > 0
        assert 0 <= metrics[task]["accuracy"] <= 1 and 0 <= metrics[task]["auroc"] <= 1


@pytest.mark.parametrize("source", ["multifashion", "tweets", "adult"])
def test_a_missing_shared_folder_is_a_one_line_error_naming_the_path(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=f"data.source: '{source}' needs {tmp_path / 'nowhere'}/"):
        read_source(source)


@pytest.mark.parametrize("source", ["multifashion:", "multifashion:0", "tweets:ten"])
def test_a_bad_row_limit_is_an_error(source):
    with pytest.raises(UserError, match="put a positive number of rows"):
        read_source(source)
