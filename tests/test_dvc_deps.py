"""dvc.yaml lists, as each stage's code dependencies, exactly the project files its command runs,
so that a code change re-runs every stage it can affect and no other.

The files a command runs are found by walking imports from ``mtl/cli.py``: its module-level
imports and those of the command's own function (``run_stage("ingest", ...)`` imports
``mtl.stages.ingest``), then, in every module reached, every import, also those inside
functions (lazy ones), and the ``__init__.py`` of each package on the way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

PACKAGES = ("mtl", "pipelines")


def module_file(name: str) -> Path | None:
    """The project file of module ``name``, or None for a name that is not one (an attribute)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def walk(node: ast.AST):
    """``ast.walk`` without the blocks under ``if TYPE_CHECKING:``, which never run."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
            yield from walk(child)


def imported(nodes) -> set[str]:
    """Project modules named by the import statements among ``nodes``."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage"
              and isinstance(node.args[0], ast.Constant)):
            names.add(f"mtl.stages.{node.args[0].value}")  # cli.run_stage imports it
    return {n for n in names if n.split(".")[0] in PACKAGES}


def files_of(names: set[str]) -> set[Path]:
    """The files of these modules and of every package above them."""
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is not None:
                files.add(path)
    return files


def command_files(command: str) -> set[Path]:
    """Every project file that ``mtl <command>`` runs."""
    cli = REPO / "mtl" / "cli.py"
    tree = ast.parse(cli.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name.rstrip("_") == command.replace("-", "_"))
    todo = files_of(imported(tree.body) | imported(walk(function)))
    seen = {cli}
    while todo:
        path = todo.pop()
        seen.add(path)
        todo |= files_of(imported(walk(ast.parse(path.read_text())))) - seen
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    """(stage, command, code dependencies) of each stage in dvc.yaml that runs ``mtl``."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = []
    for name, stage in spec.items():
        stage = stage.get("do", stage)  # a foreach stage's definition
        words = stage["cmd"].split()
        assert words[0] == "mtl", f"stage {name}: expected an `mtl <stage>` command"
        code = [d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES]
        listed.append((name, words[1], code))
    return listed


@pytest.mark.parametrize(("stage", "command", "code"), stages(), ids=[s[0] for s in stages()])
def test_code_dependencies_are_exactly_the_files_the_command_runs(stage, command, code):
    runs = sorted(str(p.relative_to(REPO)) for p in command_files(command))
    missing = sorted(set(runs) - set(code))
    extra = sorted(set(code) - set(runs))
    assert not missing and not extra, (
        f"dvc.yaml stage {stage}: missing {missing}, not run by `mtl {command}` {extra}; "
        f"its code deps should be: {runs}")


def test_the_walk_finds_lazy_imports_and_the_stage_module():
    files = {str(p.relative_to(REPO)) for p in command_files("train")}
    assert {"mtl/cli.py", "mtl/config.py", "mtl/stages/train.py", "mtl/engine/distributed.py",
            "mtl/engine/__init__.py", "mtl/__init__.py"} <= files
    assert "mtl/stages/ingest.py" not in files  # other commands' modules are not walked
    assert "mtl/engine/text.py" in files  # imported inside a function only
