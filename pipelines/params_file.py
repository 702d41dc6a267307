"""Editing params.yaml for a flow run, keeping its comments (ruamel.yaml round trip). Every
change is validated before the file is replaced, atomically, so a bad override writes nothing."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from ruamel.yaml import YAML

from mtl.config import Params, apply_override, describe_error
from mtl.errors import UserError
from mtl.io import write_text


def _edit(path: Path, change: Callable[[dict], None], source: Path | None = None) -> None:
    yaml = YAML()
    yaml.preserve_quotes = True
    try:
        document = yaml.load((source or path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{source or path}: file not found") from None
    change(document)
    plain = YAML(typ="safe").load(_dump(yaml, document))
    try:
        Params.model_validate(plain)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_error(exc)}") from None
    write_text(_dump(yaml, document), path)


def _dump(yaml: YAML, document) -> str:
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    return buffer.getvalue()


def update(path: Path, source: str | None = None, overrides: list[str] = ()) -> None:
    """Replace params.yaml by ``source`` (if given) and apply ``a.b=value`` overrides to it."""
    if source is None and not overrides:
        return

    def change(document: dict) -> None:
        for assignment in overrides:
            apply_override(document, assignment)

    _edit(path, change, Path(source) if source else None)


def set_variants(path: Path, variants: dict[str, dict], prefix: str) -> None:
    """Make the variants whose names start with ``prefix`` exactly ``variants``."""

    def change(document: dict) -> None:
        for name in [n for n in document["variants"] if n.startswith(prefix)]:
            del document["variants"][name]
        for name, spec in variants.items():
            document["variants"][name] = spec

    _edit(path, change)
