"""The project files each ``mtl <command>`` runs, and their fingerprint: what a DVC stage's code
dependency is.

The files a command runs are found by walking imports from ``mtl/cli.py``: its module-level
imports and those of the command's own function (``run_stage("ingest", ...)`` imports
``mtl.stages.ingest``), then, in every module reached, every import, also those inside functions
(lazy ones), and the ``__init__.py`` of each package on the way. ``mtl check`` writes each stage
command's files with their SHA-256 to ``data/checked/code/<command>.txt`` (``sha256sum -c``
reads it), and each stage of dvc.yaml depends on its command's file instead of listing the code
files: a code change re-runs exactly the stages that run it, and dvc.lock holds one entry per
stage for its code, not thirty (DVC re-reads and rewrites dvc.lock after every stage, which
cost 1-3 s a stage with the files listed).

Written here, not taken from a library: the stdlib's ``modulefinder`` runs no lazy import and
follows installed packages too; this walk reads the project's own sources only.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("mtl", "pipelines")
# The commands that dvc.yaml's stages run (tests/test_dvc_deps.py checks the two agree).
STAGE_COMMANDS = ("ingest", "augment", "split", "tune", "train", "evaluate", "reference", "group",
                  "compare", "report")


def module_file(root: Path, name: str) -> Path | None:
    """The project file of module ``name``, or None for a name that is not one (an attribute)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def walk(node: ast.AST) -> Iterator[ast.AST]:
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


def files_of(root: Path, names: set[str]) -> set[Path]:
    """The files of these modules and of every package above them."""
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(root, ".".join(parts[:i]))
            if path is not None:
                files.add(path)
    return files


def code_root() -> Path:
    """Where the ``mtl`` package's sources are: the working directory, a project that holds them
    (what dvc.yaml's code dependencies name), or else the folder it is installed in."""
    here = Path(".")
    return here if (here / "mtl" / "cli.py").is_file() else Path(__file__).resolve().parents[1]


def command_files(command: str, root: Path) -> list[Path]:
    """Every project file that ``mtl <command>`` runs, relative to ``root``, sorted."""
    cli = root / "mtl" / "cli.py"
    tree = ast.parse(cli.read_text(encoding="utf-8"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name.rstrip("_") == command.replace("-", "_"))
    todo = files_of(root, imported(tree.body) | imported(walk(function)))
    seen = {cli}
    while todo:
        path = todo.pop()
        seen.add(path)
        todo |= files_of(root, _imports(path)) - seen
    return sorted(path.relative_to(root) for path in seen)


@functools.cache
def _imports(path: Path) -> frozenset[str]:
    """The project modules ``path`` imports, parsed once per process (``check`` walks ten commands
    that share most files)."""
    return frozenset(imported(walk(ast.parse(path.read_text(encoding="utf-8")))))


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(command: str, root: Path) -> str:
    """The files of ``command``, one ``<sha256>  <path>`` line each (the format of ``sha256sum``)."""
    return "".join(f"{_sha256(root / path)}  {path.as_posix()}\n"
                   for path in command_files(command, root))
