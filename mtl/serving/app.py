"""The FastAPI application of one server process: uvicorn calls ``create`` in each worker, with
the settings ``mtl serve`` put in the environment variable ``MTL_SERVE``.

The process loads the current release once, as a ``Current`` model, and replaces it whole on a
new release (``POST /reload``, or a new ``release.json`` that ``watch`` notices): each request
takes the model that is current when it starts and keeps it to its end, so a reload fails no
request. Inference runs on the event loop, through ``mtl.stages.predict.predictions`` (under
``torch.inference_mode`` for the torch backend); loading a release runs in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

import mtl
from mtl.errors import UserError
from mtl.serving import release
from mtl.serving.batching import Batcher
from mtl.serving.model import Served, Source
from mtl.serving.schema import arrow_schema, problem, request_type, response_type, rows_of
from mtl.stages.predict import Columns, decode, predictions

SETTINGS = "MTL_SERVE"  # the environment variable holding the settings, as JSON
WATCH_S = 1.0  # how often each process looks for a new release
log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class Settings:
    source: Source
    max_rows: int = 1024  # more rows in one request: 413
    batch_wait_ms: float | None = 0.0  # micro-batching: how long a request waits for others (None: off)
    threads: int = 1  # torch's (and onnxruntime's) threads in each process

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> Settings:
        raw = json.loads(os.environ[SETTINGS])
        return cls(**raw | {"source": Source(**raw["source"])})


class Current:
    """A served model and what a request needs of it: the request's type, the Arrow schema its
    rows become, and the (async) step from that table to the output columns."""

    def __init__(self, served: Served, settings: Settings):
        self.served = served
        self.request = request_type(served.bundle, settings.max_rows)
        self.schema = arrow_schema(served.bundle)
        empty = decode(served.bundle.tasks, {t.name: torch.zeros(0, t.out_dim) for t in served.bundle.tasks})
        self.response = response_type({k: float if isinstance(v, np.ndarray) else str for k, v in empty.items()})
        self.predict = self._direct
        if settings.batch_wait_ms is not None:
            self.predict = Batcher(self._run, settings.batch_wait_ms / 1000, settings.max_rows)

    def _run(self, table: pa.Table) -> Columns:
        return predictions(self.served.bundle, table, self.served.forward)

    async def _direct(self, table: pa.Table) -> Columns:
        return self._run(table)


class Worker:
    """This process's current model, and the two ways it changes: ``reload`` and ``watch``."""

    def __init__(self, settings: Settings):
        self.settings, self.source = settings, settings.source
        self.stamp, served = release.current(self.source)
        self.model = Current(served, settings)
        self.failed: tuple | None = None  # the release that did not load, logged once
        self.lock = asyncio.Lock()

    async def reload(self) -> dict:
        """A new release of the source's files, loaded here at once (the other processes of the
        server load it when they notice it). Returns its metadata."""
        async with self.lock:
            served = await asyncio.to_thread(release.release, self.source)
            self.stamp = release.signature(self.source)
            self.model = await asyncio.to_thread(Current, served, self.settings)
        log.info("reloaded: model %s", served.metadata["model_sha256"][:12])
        return served.metadata

    async def watch(self) -> None:
        """Load each new release as ``release.json`` changes; one that does not load is logged
        once, and the model before it stays."""
        while True:
            await asyncio.sleep(WATCH_S)
            stamp = release.signature(self.source)
            if stamp is None or stamp in (self.stamp, self.failed):
                continue
            async with self.lock:
                try:
                    loaded, served = await asyncio.to_thread(release.current, self.source)
                    self.model = await asyncio.to_thread(Current, served, self.settings)
                    self.stamp = loaded
                except UserError as exc:
                    self.failed = stamp
                    log.error("a new release did not load, the model before it stays: %s", exc)
                    continue
            log.info("new release: model %s", served.metadata["model_sha256"][:12])

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        watching = asyncio.create_task(self.watch())
        yield
        watching.cancel()


def create() -> FastAPI:
    """The application of one process (uvicorn's factory)."""
    settings = Settings.from_env()
    torch.set_num_threads(settings.threads)
    worker = Worker(settings)
    app = FastAPI(title="mtl serve", version=mtl.__version__, lifespan=worker.lifespan,
                  description="Every task of a trained mtl-pipeline variant, for rows in JSON.")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        """Readiness: a model is loaded (the process loads it before it accepts requests); which
        one, in which worker process."""
        return {"ready": True, "model_sha256": worker.model.served.metadata["model_sha256"],
                "worker": os.getpid()}

    @app.get("/metadata")
    async def metadata() -> dict:
        """Variant, seed, backend, tasks, input and output columns, hashes, versions."""
        return worker.model.served.metadata

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Every task's output columns for each row, in the rows' order (those of `mtl predict`)."""
        model = worker.model  # this request's model to its end, whatever reloads meanwhile
        try:
            rows = model.request.validate_json(await request.body())["rows"]
        except ValidationError as exc:
            status, body = problem(exc)
            return JSONResponse(body, status)
        columns = await model.predict(pa.Table.from_pylist(rows, schema=model.schema))
        return Response(to_json({"predictions": rows_of(columns)}), media_type="application/json")

    @app.post("/reload")
    async def reload() -> JSONResponse:
        """Release the trained model (and export) again and load it; 409 if it does not load."""
        try:
            return JSONResponse(await worker.reload())
        except UserError as exc:
            return JSONResponse({"message": str(exc)}, 409)

    app.openapi = lambda: openapi(app, worker.model)
    return app


def openapi(app: FastAPI, model: Current) -> dict:
    """FastAPI's OpenAPI schema, with the request and answer of ``/predict`` for ``model``."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def content(adapter: TypeAdapter) -> dict:
        body = adapter.json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        return {"content": {"application/json": {"schema": body}}}

    schema["paths"]["/predict"]["post"] |= {
        "requestBody": {"required": True} | content(model.request),
        "responses": {"200": {"description": "One object per row"} | content(model.response),
                      "400": {"description": "The body is not JSON"},
                      "413": {"description": "More rows than --max-rows"},
                      "422": {"description": "A row misses a column, has an unknown one, or a "
                                             "value of the wrong type"}}}
    return schema
