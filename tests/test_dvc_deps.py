"""Each stage of dvc.yaml depends on the code its command runs: ``check`` depends on all of it and
writes each stage command's files with their hashes (``mtl.codedeps``); each stage depends on
its command's file and lists no code file itself. The DVC side (a code change re-runs exactly
the stages that run the changed file) is in tests/test_pipeline_dvc.py."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from mtl import codedeps, paths
from tests.helpers import BIN, REPO, run


def stages() -> list[tuple[str, dict]]:
    """(stage, definition) of each stage in dvc.yaml; a foreach stage's ``do``."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [(name, stage.get("do", stage)) for name, stage in spec.items()]


def out_paths(stage: dict) -> list[str]:
    return [next(iter(out)) if isinstance(out, dict) else out for out in stage["outs"]]


@pytest.mark.parametrize(("stage", "spec"), stages(), ids=[s[0] for s in stages()])
def test_each_stage_depends_on_its_commands_code_file_and_lists_no_code(stage, spec):
    words = spec["cmd"].split()
    assert words[0] == "mtl", f"stage {stage}: expected an `mtl <stage>` command"
    code = [d for d in spec["deps"] if d.split("/")[0] in codedeps.PACKAGES]
    if words[1] == "check":
        assert code == ["mtl"] and str(paths.CODE_DIR) in out_paths(spec)
    else:
        assert words[1] in codedeps.STAGE_COMMANDS and not code
        assert f"{paths.CODE_DIR}/{words[1]}.txt" in spec["deps"]


def test_every_fingerprinted_command_is_a_stage():
    commands = {spec["cmd"].split()[1] for _, spec in stages()}
    assert set(codedeps.STAGE_COMMANDS) == commands - {"check"}


def test_the_walk_finds_lazy_imports_and_the_stage_module():
    files = {str(p) for p in codedeps.command_files("train", REPO)}
    assert {"mtl/cli.py", "mtl/config.py", "mtl/stages/train.py", "mtl/engine/distributed.py",
            "mtl/engine/__init__.py", "mtl/__init__.py"} <= files
    assert "mtl/stages/ingest.py" not in files  # other commands' modules are not walked
    assert "mtl/engine/text.py" in files  # imported inside a function only
    assert "mtl/codedeps.py" not in files  # check's, not train's


def test_a_fingerprint_is_each_files_sha256_as_sha256sum_writes_it():
    lines = codedeps.fingerprint("report", REPO).splitlines()
    assert [line.split("  ")[1] for line in lines] == [
        str(p) for p in codedeps.command_files("report", REPO)]
    for line in lines:
        digest, path = line.split("  ")
        assert digest == hashlib.sha256((REPO / path).read_bytes()).hexdigest()


def test_check_outside_a_project_with_the_code_fingerprints_the_installed_package(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run([str(BIN / "mtl"), "check"], tmp_path)
    listed = (tmp_path / paths.CODE_DIR / "train.txt").read_text()
    assert listed == codedeps.fingerprint("train", REPO)  # the venv runs this checkout's code
