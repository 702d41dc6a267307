"""Unit tests of ``mtl.config.load_params`` and ``apply_override``: every mistake in params.yaml
or in a ``--set`` override is a ``UserError`` whose one-line message names the offending key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mtl.config import Params, apply_override, load_params
from mtl.errors import UserError
from tests.helpers import REPO

DEFAULT_PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def default_raw() -> dict:
    return yaml.safe_load(DEFAULT_PARAMS.read_text(encoding="utf-8"))


@pytest.fixture
def raw(default_raw: dict) -> dict:
    """A fresh, mutable copy of the default params."""
    return copy.deepcopy(default_raw)


def write(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def assert_user_error(exc: pytest.ExceptionInfo[UserError], key: str) -> None:
    message = str(exc.value)
    assert key in message, f"{key!r} not named in {message!r}"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"


def _set(*keys: str, value: object) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return mutate


def _delete(*keys: str) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        node = raw
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return mutate


INVALID = {
    "unknown-top-level-key": (_set("bogus", value=1), "bogus"),
    "unknown-train-key": (_set("train", "bogus", value=1), "train.bogus"),
    "wrong-type-epochs": (_set("train", "epochs", value="ten"), "train.epochs"),
    "lr-zero": (_set("train", "lr", value=0), "train.lr"),
    "val-plus-test-ge-1": (_set("split", "val", value=0.8), "split"),
    "negative-copies": (_set("augment", "copies", value=-1), "augment.copies"),
    "unknown-arch": (_set("variants", "x", value={"arch": "nope"}), "variants.x.arch"),
    "unknown-weighting": (_set("variants", "hps-ew", "weighting", value="magic"),
                          "variants.hps-ew.weighting"),
    "static-without-weights": (_delete("variants", "hps-static", "weights"),
                               "variants.hps-static.weights"),
    "static-weights-unknown-task": (_set("variants", "hps-static", "weights", "zzz", value=1.0),
                                    "variants.hps-static.weights"),
    "static-weights-missing-task": (_delete("variants", "hps-static", "weights", "sex"),
                                    "variants.hps-static.weights"),
    "weights-given-to-ew": (_set("variants", "hps-ew", "weights",
                                 value={"species": 1.0, "sex": 1.0, "body_mass": 1.0}),
                            "variants.hps-ew.weights"),
    "unknown-task-kind": (_set("data", "tasks", "species", "kind", value="ordinal"),
                          "data.tasks.species.kind"),
    "task-without-target": (_delete("data", "tasks", "species", "target"),
                            "data.tasks.species.target"),
    "no-variants": (_set("variants", value={}), "variants"),
    "unknown-baseline": (_set("compare", "baseline", value="nope"), "compare.baseline"),
    "variant-train-lr-negative": (_set("variants", "hps-ew", "train", value={"lr": -1}),
                                  "variants.hps-ew.train.lr"),
    "variant-train-unknown-key": (_set("variants", "hps-ew", "train", value={"bogus": 1}),
                                  "variants.hps-ew.train.bogus"),
    "unknown-weighting-option": (_set("variants", "hps-ew", "weighting_options", value={"c": 0.5}),
                                 "variants.hps-ew.weighting_options.c"),
    "weighting-option-wrong-type": (_set("variants", "x", value={
        "arch": "hps", "weighting": "cagrad", "weighting_options": {"c": "big"}}),
        "variants.x.weighting_options.c"),
    "unknown-arch-option": (_set("variants", "x", value={
        "arch": "cgc", "arch_options": {"experts": 3}}), "variants.x.arch_options.experts"),
    "arch-option-wrong-type": (_set("variants", "x", value={
        "arch": "mmoe", "arch_options": {"experts": 2.5}}), "variants.x.arch_options.experts"),
    "sweep-unknown-weighting": (_set("sweep", "weightings", value=["ew", "magic"]), "sweep"),
}


@pytest.mark.parametrize(("mutate", "key"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_params_name_the_key(tmp_path: Path, raw: dict, mutate, key: str) -> None:
    mutate(raw)
    path = write(tmp_path, raw)
    with pytest.raises(UserError) as exc:
        load_params(path)
    assert_user_error(exc, key)


def test_val_plus_test_message_names_both(tmp_path: Path, raw: dict) -> None:
    raw["split"].update(val=0.5, test=0.5)
    with pytest.raises(UserError) as exc:
        load_params(write(tmp_path, raw))
    assert_user_error(exc, "split")
    assert "val" in str(exc.value) and "test" in str(exc.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        load_params(path)
    assert_user_error(exc, str(path))
    assert "YAML" in str(exc.value)


def test_missing_params_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(UserError) as exc:
        load_params(path)
    assert_user_error(exc, str(path))
    assert "not found" in str(exc.value)


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, ["train", "data"])
    with pytest.raises(UserError) as exc:
        load_params(path)
    assert_user_error(exc, str(path))
    assert "mapping" in str(exc.value)


@pytest.mark.parametrize(("assignment", "key"), [
    ("train.epochs", "train.epochs"),            # no '='
    ("train.epochs.x=1", "train.epochs.x"),      # 'epochs' is a value, not a section
    ("train.epochs=[", "train.epochs"),          # value is not YAML
], ids=["no-equals", "into-non-section", "bad-yaml-value"])
def test_bad_override(raw: dict, assignment: str, key: str) -> None:
    with pytest.raises(UserError) as exc:
        apply_override(raw, assignment)
    assert_user_error(exc, key)
    assert "--set" in str(exc.value)


def test_bad_override_through_load_params(tmp_path: Path, raw: dict) -> None:
    with pytest.raises(UserError) as exc:
        load_params(write(tmp_path, raw), ["train.epochs.x=1"])
    assert_user_error(exc, "train.epochs.x")


def test_bad_value_through_override(tmp_path: Path, raw: dict) -> None:
    with pytest.raises(UserError) as exc:
        load_params(write(tmp_path, raw), ["variants.hps-ew.train.lr=-1"])
    assert_user_error(exc, "variants.hps-ew.train.lr")


# -- valid configurations ---------------------------------------------------------------------------

def test_default_params_validate() -> None:
    params = load_params(DEFAULT_PARAMS)
    assert isinstance(params, Params)
    assert set(params.data.tasks) == {"species", "sex", "body_mass"}
    assert params.compare.baseline in params.variants


def test_apply_override_parses_yaml(raw: dict) -> None:
    apply_override(raw, "train.epochs=5")
    assert raw["train"]["epochs"] == 5 and isinstance(raw["train"]["epochs"], int)
    apply_override(raw, "train.hidden=[8, 4]")
    assert raw["train"]["hidden"] == [8, 4]
    apply_override(raw, "new.section.key=x")  # missing sections are created
    assert raw["new"]["section"]["key"] == "x"


def test_override_epochs(tmp_path: Path, raw: dict) -> None:
    params = load_params(write(tmp_path, raw), ["train.epochs=5"])
    assert params.train.epochs == 5
    assert isinstance(params.train.epochs, int)


def test_variant_train_override(tmp_path: Path, raw: dict) -> None:
    params = load_params(write(tmp_path, raw), ["variants.hps-ew.train.lr=0.01"])
    assert params.variant_train("hps-ew").lr == 0.01
    assert params.variant_train("stl").lr == raw["train"]["lr"]
    assert params.train.lr == raw["train"]["lr"]


def test_variant_train_unknown_variant(tmp_path: Path, raw: dict) -> None:
    params = load_params(write(tmp_path, raw))
    with pytest.raises(UserError) as exc:
        params.variant_train("unknown")
    assert_user_error(exc, "--variant")
    assert "unknown" in str(exc.value)


def test_method_options_reach_the_variant(tmp_path: Path, raw: dict) -> None:
    raw["variants"]["x"] = {"arch": "mmoe", "arch_options": {"experts": 2},
                            "weighting": "cagrad", "weighting_options": {"c": 1}}
    variant = load_params(write(tmp_path, raw)).variants["x"]
    assert variant.arch_options == {"experts": 2}
    assert variant.weighting_options == {"c": 1}  # an int is accepted for a float option
