"""Unit tests of ``mtl.config.load_params`` and ``apply_override`` on valid configurations.
Every invalid one (and every bad ``--set``) is a case of ``tests/test_bad_inputs.py``, which runs
it through the CLI: exit code 2, one line naming the key, nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mtl.config import Params, apply_override, load_params
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


def test_method_options_reach_the_variant(tmp_path: Path, raw: dict) -> None:
    raw["variants"]["x"] = {"arch": "mmoe", "arch_options": {"experts": 2},
                            "weighting": "cagrad", "weighting_options": {"c": 1}}
    variant = load_params(write(tmp_path, raw)).variants["x"]
    assert variant.arch_options == {"experts": 2}
    assert variant.weighting_options == {"c": 1}  # an int is accepted for a float option
