"""``mtl serve``: check what the command line names (variant, seed, model, ONNX export, port)
with one-line errors, make the first release, then run uvicorn with ``workers`` processes of
``mtl.serving.app``. uvicorn stops on SIGTERM or SIGINT after the requests in flight."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import uvicorn

from mtl.config import Params
from mtl.errors import UserError
from mtl.serving import app, release
from mtl.serving.model import BACKENDS, MODEL, Source, load, read
from mtl.stages.trained import model_path


def run(params: Params, variant: str, seed: int | None, host: str, port: int, workers: int,
        backend: str, onnx: Path | None, max_rows: int, batch_wait_ms: float | None,
        threads: int) -> None:
    check_options(backend, onnx, workers=workers, max_rows=max_rows, threads=threads,
                  batch_wait_ms=batch_wait_ms or 0)
    if backend == "onnx":
        onnx = onnx or Path("exports") / f"{variant}.onnx"
    settings = app.Settings(source(params, variant, seed, onnx), max_rows, batch_wait_ms, threads)
    files = read(settings.source.paths())
    served = load(settings.source, files)  # before the port and the release: nothing is written
    check_port(host, port)
    release.publish(settings.source, files, served)
    os.environ[app.SETTINGS] = settings.to_env()
    uvicorn.run("mtl.serving.app:create", factory=True, host=host, port=port, workers=workers,
                access_log=False, log_level="info")


def source(params: Params, variant: str, seed: int | None, onnx: Path | None) -> Source:
    """What to serve; one line for an unknown variant or seed, a missing model or export."""
    seed, _ = model_path(params, variant, seed)
    what = Source(variant, seed, None if onnx is None else str(onnx))
    for name, path in what.paths().items():
        if not path.is_file():
            make = (f"mtl train --variant {variant} --seed {seed}" if name == MODEL else
                    f"mtl export --variant {variant} --seed {seed} --format onnx --output {onnx}")
            raise UserError(f"{path}: file not found (run '{make}' first)")
    return what


def check_options(backend: str, onnx: Path | None, **numbers: float) -> None:
    """One line for an unknown backend, ``--onnx`` without it, or a number out of its range."""
    if backend not in BACKENDS:
        raise UserError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    if onnx is not None and backend != "onnx":
        raise UserError("--onnx: names the file of --backend onnx, and the backend is torch")
    for name, value in numbers.items():
        least = 0 if name == "batch_wait_ms" else 1
        if value < least:
            raise UserError(f"--{name.replace('_', '-')}: {value} is less than {least}")


def check_port(host: str, port: int) -> None:
    """One line if nothing can listen on ``host``:``port`` (in use, or not an address here)."""
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OverflowError:
            raise UserError(f"--port {port}: not a port number (0 to 65535)") from None
        except OSError as exc:
            reason = os.strerror(exc.errno).lower()
            raise UserError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
