"""check: the params file validated as a whole before DVC runs any other stage, and the code each
stage runs fingerprinted.

Every other stage depends on this stage's stamp (``data/checked/params.ok``), so ``dvc repro``
stops here on a bad params.yaml, before DVC deletes any output of another stage (DVC removes a
stage's outputs right before running its command). The stamp's content never changes, so a
passing check re-runs nothing downstream by itself. Reading the file is bounded
(``mtl.config.parse_yaml``): an alias bomb is refused in milliseconds.

The check runs again after any code change (it depends on the whole ``mtl`` folder) and writes
``data/checked/code/<command>.txt`` for each stage command (``mtl.codedeps``), which is that
stage's code dependency: only the stages whose files changed run again."""

from __future__ import annotations

from mtl import codedeps, paths
from mtl.config import Params
from mtl.io import write_text

STAMP = "params.yaml passed `mtl check`; every stage depends on this file (see dvc.yaml)\n"


def run(params: Params) -> None:
    write_text(STAMP, paths.CHECKED)
    root = codedeps.code_root()
    for command in codedeps.STAGE_COMMANDS:
        write_text(codedeps.fingerprint(command, root), paths.CODE_DIR / f"{command}.txt")
    print(f"check: valid: {len(params.data.tasks)} tasks, {len(params.all_variants)} variants x "
          f"{len(params.seeds)} seeds")
