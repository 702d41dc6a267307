"""How stages run: torch's thread count (params, applied, recorded, shared out by the flows) and
the progress lines a stage prints when its output is a pipe (``dvc repro``, the Prefect flows)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.config import cpu_count, load_params
from mtl.errors import UserError
from mtl.stages import encoded, train
from mtl.stages.progress import Rows
from pipelines.schedule import stage_threads, startable
from tests.helpers import REPO, env

VARIANT = "hps-ew"


def write_params(root: Path, **sections) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section] = raw[section] | values if isinstance(raw.get(section), dict) else values
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


# --- threads in params.yaml -----------------------------------------------------------------------

def test_train_threads_default_to_runtime_threads_and_a_variant_may_override_them(tmp_path):
    params = load_params(write_params(tmp_path, runtime={"threads": 3}, variants={
        "stl": {"arch": "stl"}, "hps-ew": {"arch": "hps", "train": {"threads": 2}}}))
    assert params.threads() == 3 and params.threads("stl") == 3 and params.threads("hps-ew") == 2
    params = load_params(write_params(tmp_path, runtime={"threads": "auto"}, train={"threads": 1}))
    assert params.threads() == cpu_count() and params.threads("stl") == 1


@pytest.mark.parametrize(("key", "value"), [("runtime.threads", "0"), ("runtime.threads", "many"),
                                            ("train.threads", "1.5"), ("runtime.threads", "true"),
                                            ("variants.stl.train", "{threads: -1}")])
def test_a_thread_count_that_is_not_a_positive_integer_or_auto_is_refused(tmp_path, key, value):
    with pytest.raises(UserError, match=rf"{key.replace('.train', '.train.threads')}: expected a "
                                        "positive integer or 'auto'"):
        load_params(write_params(tmp_path), [f"{key}={value}"])


def test_the_flows_run_side_by_side_only_the_stages_whose_threads_fit_in_the_cores(tmp_path):
    params = load_params(write_params(tmp_path, runtime={"threads": 2}, variants={
        "stl": {"arch": "stl", "train": {"threads": 1}}, "hps-ew": {"arch": "hps"}}))
    assert stage_threads(params, ["mtl train --variant 'stl' --seed '0'"]) == 1
    assert stage_threads(params, ["mtl train --variant 'hps-ew' --seed '0'"]) == 2
    assert stage_threads(params, ["mtl evaluate --variant 'stl' --seed '0'"]) == 2
    assert startable([1, 1, 1], busy=0, cores=2) == 2
    assert startable([1, 2], busy=1, cores=2) == 1
    assert startable([2, 1], busy=1, cores=2) == 0  # in order: the 1-thread stage waits too
    assert startable([4], busy=0, cores=2) == 1  # alone, a stage runs whatever its threads
    assert startable([1] * 5, busy=0, cores=float("inf")) == 5  # dask: another machine's cores


# --- progress ------------------------------------------------------------------------------------

def test_a_data_stage_prints_a_line_every_ten_seconds_and_a_summary_in_a_log(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    now = [100.0]
    with Rows("ingest", clock=lambda: now[0]) as progress:
        for _ in range(7):  # a batch of 250,000 rows every 4 s
            now[0] += 4.0
            progress.add(250_000)
    assert capsys.readouterr().out.splitlines() == [
        "ingest: 750,000 rows, 62,500 rows/s",  # after 12 s
        "ingest: 1,500,000 rows, 62,500 rows/s",  # after 24 s
        "ingest: 1,750,000 rows in 28.0 s (62,500 rows/s)"]
    with pytest.raises(UserError), Rows("split", clock=lambda: now[0]) as progress:
        progress.add(10)
        raise UserError("a bad split")
    assert capsys.readouterr().out == ""  # no summary for a stage that failed


def test_a_data_stage_on_a_terminal_shows_a_live_line(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stdout is a terminal
    now = [100.0]
    with Rows("split", clock=lambda: now[0]) as progress:
        for _ in range(3):
            now[0] += 4.0
            progress.add(250_000)
    out = capsys.readouterr().out
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)  # without colours and cursor moves
    assert text.startswith("split: 750,000 rows, 62,500 rows/s\n") and "\x1b[1A\x1b[2K" in out  # erased
    assert text.endswith("split: 750,000 rows in 12.0 s (62,500 rows/s)\n")


# --- threads applied and recorded, progress in a pipe ---------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Penguins ingested, augmented and split, and hps-ew trained for 3 epochs, by the real
    commands with their output a pipe (as under ``dvc repro``): ``train.threads: 1`` against
    ``runtime.threads: 2`` and ``OMP_NUM_THREADS=2``."""
    root = tmp_path_factory.mktemp("project")
    write_params(root, seeds=[0], runtime={"threads": 2},
                 train={"epochs": 3, "patience": 0, "affinity_batches": 0, "threads": 1})
    outputs = {stage: mtl(root, stage).stdout for stage in ("ingest", "augment", "split")}
    outputs["train"] = mtl(root, "train", "--variant", VARIANT, "--seed", "0").stdout
    root.joinpath("outputs.json").write_text(json.dumps(outputs))
    return root


def mtl(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``mtl ARGS`` in ``root``, stdout a pipe, with OMP_NUM_THREADS=2."""
    result = subprocess.run(["mtl", *args], cwd=root, capture_output=True, text=True, check=False,
                            env=env() | {"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    return result


def test_data_stages_in_a_pipe_print_rows_and_rows_per_second(project):
    outputs = json.loads((project / "outputs.json").read_text())
    for stage, rows in (("ingest", 344), ("augment", 460), ("split", 574)):
        first = outputs[stage].splitlines()[0]
        assert first.startswith(f"{stage}: {rows} rows in ") and first.endswith(" rows/s)")
        assert "\x1b" not in outputs[stage]  # no terminal control codes in a log


def test_train_in_a_pipe_prints_one_line_per_epoch(project):
    out = json.loads((project / "outputs.json").read_text())["train"]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line in epochs:
        assert ", val species/accuracy " in line and ", val body_mass/mae " in line
        assert line.endswith(" s") and "\x1b" not in line


def test_train_runs_on_the_threads_params_give_and_records_them(project):
    """train.threads wins over runtime.threads and OMP_NUM_THREADS; train.json records the
    count torch ran on."""
    record = json.loads((project / paths.model_dir(VARIANT, 0) / "train.json").read_text())
    assert record["threads"] == 1


def test_evaluate_runs_on_runtime_threads(project, monkeypatch):
    monkeypatch.chdir(project)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = CliRunner().invoke(app, ["evaluate", "--variant", VARIANT, "--set",
                                          "runtime.threads=1"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_is_part_of_the_resume_fingerprint(project, monkeypatch):
    """CPU results can depend on the threads (a convolution's gradient does): a run killed at
    one count does not resume at another."""
    monkeypatch.chdir(project)
    params = load_params()
    key = encoded.data_fingerprint(params)
    before = torch.get_num_threads()
    try:
        stamps = set()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stamps.add(train.fingerprint(params, VARIANT, 0, key))
    finally:
        torch.set_num_threads(before)
    assert len(stamps) == 2



@pytest.mark.parametrize("width", ["encoders.dim=8", "encoders.hashing.dim=4",
                                   "encoders.image_channels=[8]", "encoders.numeric=periodic",
                                   "encoders.periodic.sigma=0.1", "encoders.ple.bins=8"])
def test_a_model_width_keeps_the_encoded_splits_but_not_the_resume_fingerprint(project, monkeypatch,
                                                                              width):
    """The encoded splits depend on the preprocessing only; a training run on all of encoders."""
    monkeypatch.chdir(project)
    before, after = load_params(), load_params(overrides=[width])
    assert encoded.data_fingerprint(before) == encoded.data_fingerprint(after)
    key = encoded.data_fingerprint(before)
    assert train.fingerprint(before, VARIANT, 0, key) != train.fingerprint(after, VARIANT, 0, key)
    assert encoded.data_fingerprint(load_params(overrides=["encoders.hashing.buckets=64"])) != key


@pytest.mark.parametrize("bins", ["encoders.numeric=ple", "encoders.ple.bins=8"])
def test_ple_bins_are_part_of_the_encoded_splits_key(project, monkeypatch, bins):
    """Fitted bins change the preprocessing: ``ple``, and its number of bins under ``ple``."""
    monkeypatch.chdir(project)
    ple = load_params(overrides=["encoders.numeric=ple"])
    before = load_params() if bins == "encoders.numeric=ple" else ple
    after = load_params(overrides=["encoders.numeric=ple", bins])
    assert encoded.data_fingerprint(before) != encoded.data_fingerprint(after)

# --- start-up: what a stage imports ---------------------------------------------------------------

UNUSED_BY_EVALUATE = ("torchmetrics", "transformers", "scipy", "torchjd", "cvxpy", "matplotlib",
                      "dvclive", "pyarrow.dataset")


def test_evaluate_imports_none_of_the_packages_it_does_not_use(project):
    """``mtl evaluate`` computes its metrics without torchmetrics (which imports scipy, and
    transformers when installed) and loads no weighting solver, plot or logger (BENCHMARKS.md)."""
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: print([m for m in {UNUSED_BY_EVALUATE} if m in sys.modules]))\n"
            f"sys.argv = ['mtl', 'evaluate', '--variant', '{VARIANT}', '--seed', '0']\n"
            "runpy.run_module('mtl', run_name='__main__')\n")
    result = subprocess.run(["python", "-c", code], cwd=project, capture_output=True, text=True,
                            check=False, env=env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
