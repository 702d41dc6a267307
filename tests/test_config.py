"""Unit tests of ``mtl.config.load_params`` and ``apply_override`` on valid configurations.
Every invalid one (and every bad ``--set``) is a case of ``tests/test_bad_inputs.py``, which runs
it through the CLI: exit code 2, one line naming the key, nothing written."""

from __future__ import annotations

import copy
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


# -- one YAML dialect: DVC's (ruamel.yaml's safe loader, YAML 1.2) --------------------------------

DIALECT = {  # text -> the value YAML 1.2 gives (PyYAML's YAML 1.1 gives the comment's)
    "1e-1": 0.1,  # '1e-1', a string
    "yes": "yes",  # True
    "on": "on",  # True
    "0o17": 15,  # '0o17', a string
    ".5": 0.5,  # 0.5 in both
}


@pytest.mark.parametrize(("text", "value"), DIALECT.items())
def test_params_read_as_dvc_reads_them(tmp_path: Path, text: str, value: object) -> None:
    from dvc.utils.serialize import parse_yaml

    path = tmp_path / "params.yaml"
    path.write_text(f"x: {text}\n", encoding="utf-8")
    assert parse_yaml(path.read_text(), str(path)) == {"x": value}  # DVC's own reader
    raw: dict = {}
    apply_override(raw, f"x={text}")  # --set values alike
    assert raw == {"x": value}


def test_yaml_12_values_reach_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    text = DEFAULT_PARAMS.read_text(encoding="utf-8").replace("  salt: mtl ", "  salt: yes ")
    text = text.replace("  seed: 0\n", "  seed: 0o17\n")
    text = text.replace("\nvariants:", "\nvariants:\n  cagrad: {arch: hps, weighting: cagrad, "
                        "weighting_options: {c: 1e-1}}")
    path.write_text(text, encoding="utf-8")
    params = load_params(path, ["variants.cagrad.train.dropout=.5"])
    assert params.variants["cagrad"].weighting_options == {"c": 0.1}
    assert params.split.salt == "yes" and params.augment.seed == 15
    assert params.variant_train("cagrad").dropout == 0.5


def test_aliases_are_expanded_within_a_bound(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    text = DEFAULT_PARAMS.read_text(encoding="utf-8").replace("  hidden: [64, 64]", "  hidden: &w [64, 64]")
    text = text.replace("\nvariants:", "\nvariants:\n  wide: {arch: hps, train: {hidden: *w}}")
    path.write_text(text, encoding="utf-8")
    assert load_params(path).variant_train("wide").hidden == [64, 64]


def test_a_search_space_takes_the_keys_each_variant_has():
    """tune.space's option keys go to the variants whose method has them; a variant's own
    tune_space replaces a key; an integer option needs an integer range."""
    params = load_params(REPO / "params.yaml", [
        ("tune.space={lr: {low: 0.001, high: 0.01, log: true}, "
         "weighting_options.temperature: {low: 1, high: 3}}"),
        "variants.dwa={arch: hps, weighting: dwa, tune_space: {lr: {choices: [0.001, 0.002]}}}"])
    assert set(params.search_space("hps-ew")) == {"train.lr"}
    assert set(params.search_space("dwa")) == {"train.lr", "weighting_options.temperature"}
    assert params.search_space("dwa")["train.lr"].choices == [0.001, 0.002]
    for key in ("arch_options.experts", "batch_size"):
        with pytest.raises(UserError, match=rf"tune.space.{key}: .*int: true"):
            load_params(REPO / "params.yaml", [f"tune.space={{{key}: {{low: 2, high: 8}}}}"])
