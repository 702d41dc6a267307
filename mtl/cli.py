"""``mtl``: one command per pipeline stage, each reading params.yaml (``--params``) with
``--set a.b=value`` overrides. A user's mistake prints one line and exits 2."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mtl.config import load_params
from mtl.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible multi-task-learning experiments. Run a single pipeline stage, "
                       "or `dvc repro` for the whole pipeline.")

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOption = Annotated[list[str], typer.Option(
    "--set", "-S", help="Override a parameter, e.g. --set train.epochs=5 (value parsed as YAML).")]
VariantOption = Annotated[str, typer.Option("--variant", "-v", help="A variant named in params.yaml.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one line on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def ingest(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Raw data (data.source) -> data/ingested/table.parquet + schema.json."""
    with user_errors():
        from mtl.stages import ingest as stage

        stage.run(load_params(params, set_))


@app.command()
def augment(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Ingested table -> data/augmented/table.parquet (originals + copies of training rows)."""
    with user_errors():
        from mtl.stages import augment as stage

        stage.run(load_params(params, set_))


@app.command()
def split(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Augmented table -> data/split/{train,val,test}.parquet by a stable hash of each row's key."""
    with user_errors():
        from mtl.stages import split as stage

        stage.run(load_params(params, set_))


@app.command()
def train(variant: VariantOption, params: ParamsOption = Path("params.yaml"),
          set_: SetOption = None,
          resume: Annotated[bool, typer.Option(
              "--resume", help="Continue from models/<variant>/checkpoint.pt (written after "
                               "every epoch) if it exists.")] = False) -> None:
    """Train one variant -> models/<variant>/model.pt and dvclive/<variant>/."""
    with user_errors():
        from mtl.stages import train as stage

        stage.run(load_params(params, set_), variant, resume=resume)


@app.command()
def evaluate(variant: VariantOption, params: ParamsOption = Path("params.yaml"),
             set_: SetOption = None) -> None:
    """Test metrics of one variant -> metrics/variants/<variant>.json."""
    with user_errors():
        from mtl.stages import evaluate as stage

        stage.run(load_params(params, set_), variant)


@app.command()
def compare(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Every variant against the baseline -> metrics/compare.json and reports/compare.md."""
    with user_errors():
        from mtl.stages import compare as stage

        stage.run(load_params(params, set_))


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The architectures and weightings a variant may name."""
    from mtl.engine import ARCH_OPTIONS, WEIGHTING_OPTIONS

    if as_json:
        json.dump({"architectures": list(ARCH_OPTIONS), "weightings": list(WEIGHTING_OPTIONS),
                   "arch_options": ARCH_OPTIONS, "weighting_options": WEIGHTING_OPTIONS}, sys.stdout)
        sys.stdout.write("\n")
        return
    for title, registry in (("architectures", ARCH_OPTIONS), ("weightings", WEIGHTING_OPTIONS)):
        typer.echo(f"{title} (options and defaults):")
        for name, options in registry.items():
            typer.echo(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "-"))
