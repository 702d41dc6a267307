"""``mtl``: one command per pipeline stage, each reading params.yaml (``--params``) with
``--set a.b=value`` overrides. A user's mistake prints one line and exits 2."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer >= 0.29 ships its own click
from typer.core import TyperGroup

from mtl.config import load_params
from mtl.errors import UserError
from mtl.lock import stage_lock


class OneLineErrors(TyperGroup):
    """Click's command group, except that a mistake on the command line (a missing or unknown
    option, a value of the wrong type) is one line ``error: ...`` and exit code 2, like every
    other user error, instead of a usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:
            exc.show()  # `mtl` alone: the help
            sys.exit(exc.exit_code)
        except typer.TyperException as exc:  # click's usage errors
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "mtl"
            typer.echo(f"error: {command}: {exc.format_message()} (see {command} --help)", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Reproducible multi-task-learning experiments. Run a single pipeline stage, "
                       "or `dvc repro` for the whole pipeline.")

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOption = Annotated[list[str], typer.Option(
    "--set", "-S", help="Override a parameter, e.g. --set train.epochs=5 (value parsed as YAML).")]
VariantOption = Annotated[str, typer.Option("--variant", "-v", help="A variant named in params.yaml.")]
SeedOption = Annotated[list[int], typer.Option(
    "--seed", help="A seed of params.yaml's `seeds` (repeatable); default: each of them.")]
OneSeedOption = Annotated[int | None, typer.Option(
    "--seed", help="A seed of params.yaml's `seeds`; default: the first.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one line on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def use_threads(count: int) -> None:
    """Run torch on ``count`` CPU threads: intra-op, and inter-op where torch still allows it
    (only before its first parallel work)."""
    import torch

    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(count)


def run_stage(name: str, params: Path, set_: list[str] | None) -> None:
    """Load and check the params (a bad file writes nothing, not even a lock), then run
    ``mtl.stages.<name>`` holding the stage's lock."""
    with user_errors():
        loaded = load_params(params, set_)
        stage = importlib.import_module(f"mtl.stages.{name}")
        with stage_lock(name):
            stage.run(loaded)


@app.command()
def check(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Validate the whole params file -> data/checked/params.ok (every stage depends on it, so a bad
    file stops `dvc repro` before DVC deletes any output)."""
    run_stage("check", params, set_)


@app.command()
def ingest(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Raw data (data.source) -> data/ingested/{train,val,test}.parquet + schema.json (one pass)."""
    run_stage("ingest", params, set_)


@app.command()
def augment(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Ingested splits -> data/augmented/{train,val,test}.parquet (train gets copies of its rows)."""
    run_stage("augment", params, set_)


@app.command()
def split(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Augmented splits, checked -> data/split/{train,val,test}.parquet (hard links)."""
    run_stage("split", params, set_)


@app.command()
def train(variant: VariantOption, seed: SeedOption = None, params: ParamsOption = Path("params.yaml"),
          set_: SetOption = None,
          fresh: Annotated[bool, typer.Option(
              "--fresh", help="Start afresh instead of resuming an interrupted run of the same "
                              "inputs from its last checkpoint (under .mtl/runs/).")] = False) -> None:
    """Train one variant per seed -> models/<variant>/seed-<seed>/ and dvclive/<variant>/seed-<seed>/."""
    with user_errors():
        from mtl.engine import distributed
        from mtl.stages import train as stage
        from mtl.stages import tuned
        from mtl.stages.common import seeds_of

        loaded = tuned.apply(load_params(params, set_), variant)
        use_threads(loaded.threads(variant))
        main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 holds the lock
        for s in seeds_of(loaded, seed):
            with stage_lock(f"train@{variant}-{s}") if main else contextlib.nullcontext():
                stage.run(loaded, variant, s, resume=not fresh)
        distributed.stop()


@app.command()
def group(variant: VariantOption, params: ParamsOption = Path("params.yaml"),
          set_: SetOption = None) -> None:
    """The task groups of a `grouped` variant, chosen from its source variant's affinity.json
    files -> groupings/<variant>.json."""
    with user_errors():
        from mtl.stages import group as stage

        loaded = load_params(params, set_)
        with stage_lock(f"group@{variant}"):
            stage.run(loaded, variant)


@app.command()
def tune(variant: VariantOption, params: ParamsOption = Path("params.yaml"), set_: SetOption = None,
         worker: Annotated[int, typer.Option(
             "--worker", min=0, help="With --workers: this worker's number, from 0.")] = 0,
         workers: Annotated[int | None, typer.Option(
             "--workers", min=1, help="Run worker --worker of this many on the study, side by "
                                      "side, and write no file (the Prefect tune flow's tasks).")] = None,
         output: Annotated[Path | None, typer.Option(
             "--output", "-o", help="Write the file here instead of tuned/<variant>.json (the "
                                    "tune-baseline stage: tuned/_baseline.json).")] = None) -> None:
    """Tune one variant's params with Optuna (tune.trials trials) -> tuned/<variant>.json, which
    train applies; with tune.trials 0 a file saying "not tuned"."""
    with user_errors():
        from mtl.stages import tuned

        loaded = load_params(params, set_)
        loaded.variant_train(variant)  # names an unknown variant
        if loaded.tune.trials == 0:
            with stage_lock(f"tune@{variant}"):
                tuned.write_untuned(variant, output)
            return
        from mtl.stages import tune as stage

        use_threads(loaded.threads(variant))
        if workers is not None:
            stage.work(loaded, variant, worker, workers)
            return
        with stage_lock(f"tune@{variant}"):
            stage.run(loaded, variant, output)


@app.command()
def evaluate(variant: Annotated[str | None, typer.Option(
                 "--variant", "-v", help="A variant named in params.yaml (with --input, default: "
                                         "every variant).")] = None,
             seed: SeedOption = None,
             input_: Annotated[Path | None, typer.Option(
                 "--input", "-i", help="Score this labelled CSV or Parquet file instead of the "
                                       "test split (with --output).")] = None,
             output: Annotated[Path | None, typer.Option(
                 "--output", "-o", help="With --input: the metrics, a .json file (variant -> seed "
                                        "-> task -> metric).")] = None,
             params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Test metrics of one variant per seed -> metrics/variants/<variant>/seed-<seed>.json; or,
    with --input FILE --output OUT.json, FILE's metrics for every variant and seed -> OUT.json."""
    with user_errors():
        from mtl.stages import evaluate as stage
        from mtl.stages.common import seeds_of

        loaded = load_params(params, set_)
        use_threads(loaded.threads())
        if input_ is not None or output is not None:
            stage.score_file(loaded, input_, output, variant, seed)
            return
        if variant is None:
            raise UserError("--variant: missing (name a variant, or score a labelled file with "
                            "every variant: --input FILE --output OUT.json)")
        for s in seeds_of(loaded, seed):
            with stage_lock(f"evaluate@{variant}-{s}"):
                stage.run(loaded, variant, s)


@app.command()
def reference(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Gradient-boosted trees per task (compare.reference) on the splits -> metrics/reference.json."""
    run_stage("reference", params, set_)


@app.command()
def compare(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Every variant against the baseline -> metrics/compare.json and reports/compare.md."""
    run_stage("compare", params, set_)


@app.command()
def report(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Comparison, curves and affinity as plots -> reports/plots/, reports/report.md, reports/index.html."""
    run_stage("report", params, set_)


@app.command()
def predict(variant: VariantOption,
            input_: Annotated[Path, typer.Option("--input", "-i", help="New rows: a CSV or Parquet file.")],
            output: Annotated[Path, typer.Option("--output", "-o", help="Predictions: a .parquet file.")],
            seed: OneSeedOption = None, params: ParamsOption = Path("params.yaml"),
            set_: SetOption = None) -> None:
    """Predict every task for new rows with a trained variant -> a Parquet file."""
    with user_errors():
        from mtl.stages import predict as stage

        loaded = load_params(params, set_)
        use_threads(loaded.threads())
        stage.run(loaded, variant, seed, input_, output)


@app.command()
def export(variant: VariantOption,
           format_: Annotated[str, typer.Option("--format", "-f", help="torchscript or onnx.")],
           output: Annotated[Path, typer.Option("--output", "-o", help="The exported model file.")],
           int8: Annotated[bool, typer.Option("--int8", help="Dynamic int8 quantization of the Linear layers.")] = False,
           prune: Annotated[float | None, typer.Option(
               "--prune", metavar="AMOUNT", help="Zero this fraction of the Linear weights, those of "
                                                 "smallest magnitude over all Linear layers.")] = None,
           seed: OneSeedOption = None, params: ParamsOption = Path("params.yaml"),
           set_: SetOption = None) -> None:
    """Export a trained variant's network (TorchScript or ONNX) with a JSON describing it, and
    its test metrics against the float model -> PATH, PATH.json, PATH.metrics.json."""
    with user_errors():
        from mtl.stages import export as stage

        loaded = load_params(params, set_)
        use_threads(loaded.threads())
        stage.run(loaded, variant, seed, format_, output, int8, prune)


@app.command()
def serve(variant: VariantOption, seed: OneSeedOption = None,
          host: Annotated[str, typer.Option("--host", help="The address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="The port to listen on.")] = 8000,
          workers: Annotated[int, typer.Option(
              "--workers", help="Processes (uvicorn workers), each with the model loaded once.")] = 1,
          backend: Annotated[str, typer.Option(
              "--backend", help="torch (model.pt) or onnx (the file of `mtl export --format onnx`).")] = "torch",
          onnx: Annotated[Path | None, typer.Option(
              "--onnx", help="The ONNX file for --backend onnx; default exports/<variant>.onnx.")] = None,
          max_rows: Annotated[int, typer.Option(
              "--max-rows", help="The most rows one request may hold (more: HTTP 413).")] = 1024,
          batching: Annotated[bool, typer.Option(
              "--batching/--no-batching", help="Micro-batching: the rows of concurrent requests "
                                               "go through the model in one pass.")] = True,
          batch_wait_ms: Annotated[float, typer.Option(
              "--batch-wait-ms", help="How long a request waits for others to batch with "
                                      "(0: only those already waiting).")] = 0.0,
          threads: Annotated[int | None, typer.Option(
              "--threads", help="torch's (and onnxruntime's) threads in each worker; "
                                "default: runtime.threads of the params.")] = None,
          params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Serve a trained variant over HTTP: POST /predict answers every task for JSON rows;
    GET /health, /ready, /metadata, /docs; POST /reload loads the model trained since."""
    with user_errors():
        from mtl.serving import server

        loaded = load_params(params, set_)
        server.run(loaded, variant, seed, host, port, workers, backend, onnx, max_rows,
                   batch_wait_ms if batching else None, threads or loaded.threads())


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The architectures and weightings a variant may name, and what tune.space may tune."""
    from mtl.config import TUNABLE_TRAIN
    from mtl.engine import ARCH_OPTIONS, WEIGHTING_OPTIONS

    if as_json:
        json.dump({"architectures": list(ARCH_OPTIONS), "weightings": list(WEIGHTING_OPTIONS),
                   "arch_options": ARCH_OPTIONS, "weighting_options": WEIGHTING_OPTIONS,
                   "tunable_train": list(TUNABLE_TRAIN)}, sys.stdout)
        sys.stdout.write("\n")
        return
    typer.echo("tunable (tune.space, a variant's tune_space): train keys " + ", ".join(TUNABLE_TRAIN)
               + "; arch_options.<option> and weighting_options.<option> of the methods below")
    for title, registry in (("architectures", ARCH_OPTIONS), ("weightings", WEIGHTING_OPTIONS)):
        typer.echo(f"{title} (options and defaults):")
        for name, options in registry.items():
            typer.echo(f"  {name}: " + (", ".join(f"{k}={'(required)' if v is None else v}"
                                                 for k, v in options.items()) or "-"))
