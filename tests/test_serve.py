"""``mtl serve`` as real server processes on free loopback ports, over a small model trained by
the real stages on penguins (the fixture of test_predict_export): the numbers of ``mtl predict``
for the same rows, one status and message naming the field for each bad request, metadata and
docs, a reload during a stream of requests that loses none, and SIGTERM draining a request in
flight. Command-line mistakes are in tests/test_bad_inputs.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtl import paths
from mtl.config import load_params
from mtl.engine.checkpoint import Bundle
from mtl.serving.batching import Batcher
from mtl.stages import encoded, export, train
from tests.helpers import env, free_port
from tests.test_predict_export import VARIANT, mtl, new_rows, project  # noqa: F401 (a fixture)

MODEL = paths.model_dir(VARIANT, 0) / "model.pt"


@contextlib.contextmanager
def serving(root: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mtl serve`` in ``root`` on a free port, once it answers /health; SIGTERM at the end."""
    port = free_port()
    with open(root / f"serve-{port}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mtl", "serve", "-v", VARIANT, "--port",
                                    str(port), *args], cwd=root, env=env(), stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root / f"serve-{port}.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def predict_threads(root: Path) -> str:
    """The threads of `mtl predict` in ``root`` (runtime.threads): a server on as many sums in
    the same order, whatever count earlier tests left in this process."""
    with contextlib.chdir(root):
        return str(load_params().threads())


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[str]:  # noqa: F811
    with serving(project, "--max-rows", "8", "--threads", predict_threads(project)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def onnx_server(project: Path) -> Iterator[str]:  # noqa: F811
    with contextlib.chdir(project):
        export.run(load_params(), VARIANT, 0, "onnx", Path("exports") / f"{VARIANT}.onnx")
    with serving(project, "--backend", "onnx") as (url, _):
        yield url


def request_rows(table: pa.Table) -> list[dict]:
    """The feature columns of ``table``'s rows, as JSON objects."""
    return table.drop_columns([paths.ID]).to_pylist()


def predicted(project: Path, table: pa.Table, monkeypatch: pytest.MonkeyPatch) -> list[dict]:  # noqa: F811
    """What ``mtl predict`` writes for ``table``, one dict per row, without the id column."""
    pq.write_table(table, project / "rows.parquet")
    result = mtl(project, monkeypatch, "predict", "-v", VARIANT, "-i", "rows.parquet", "-o", "out/rows.parquet")
    assert result.exit_code == 0, result.output
    return pq.read_table(project / "out" / "rows.parquet").drop_columns([paths.ID]).to_pylist()


def assert_close(row: dict, want: dict, tolerance: float) -> None:
    """The same columns in the same order, the same labels, numbers within ``tolerance``."""
    assert list(row) == list(want)
    for key, value in want.items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=tolerance, abs=tolerance)
        assert row[key] == expected, key


def close(answer: dict, other: dict) -> bool:
    """Two answers of /predict with the same labels and numbers within 1e-6 (requests batched
    with others go through the model in other batches)."""
    try:
        for row, want in zip(answer["predictions"], other["predictions"], strict=True):
            assert_close(row, want, 1e-6)
    except AssertionError:
        return False
    return True


def test_predictions_equal_those_of_mtl_predict(project, server, monkeypatch):  # noqa: F811
    rows = new_rows(project)  # an unseen island, a missing one, a missing number
    response = httpx.post(f"{server}/predict", json={"rows": request_rows(rows)})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == predicted(project, rows, monkeypatch)  # exactly


def test_onnx_backend_gives_the_same_predictions(project, onnx_server, monkeypatch):  # noqa: F811
    rows = new_rows(project)
    response = httpx.post(f"{onnx_server}/predict", json={"rows": request_rows(rows)})
    assert response.status_code == 200, response.text
    for row, want in zip(response.json()["predictions"], predicted(project, rows, monkeypatch), strict=True):
        assert_close(row, want, 1e-5)
    assert httpx.get(f"{onnx_server}/metadata").json()["backend"] == "onnx"


def test_concurrent_requests_batched_together_get_their_own_rows(project, server, monkeypatch):  # noqa: F811
    test = pq.read_table(project / paths.split_path("test")).select(new_rows(project).column_names)
    expected = predicted(project, test, monkeypatch)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server) as client:
            return await asyncio.gather(*(client.post("/predict", json={"rows": [row]})
                                          for row in request_rows(test)))

    responses = asyncio.run(send_all())
    for response, want in zip(responses, expected, strict=True):
        (row,) = response.json()["predictions"]
        assert_close(row, want, 1e-6)


def test_the_batcher_runs_waiting_tables_in_one_pass():
    calls = []

    def predict(table: pa.Table) -> dict:
        calls.append(table.num_rows)
        return {"x2": np.asarray(table["x"]) * 2, "label": pa.array([f"r{x}" for x in table["x"].to_pylist()])}

    async def three_requests() -> list[dict]:
        batcher = Batcher(predict, wait_s=0.0, max_rows=100)
        tables = [pa.table({"x": list(range(start, start + n))}) for start, n in ((0, 2), (10, 1), (20, 3))]
        return await asyncio.gather(*(batcher(table) for table in tables))

    first, second, third = asyncio.run(three_requests())
    assert calls == [6]
    assert first["x2"].tolist() == [0, 2] and second["x2"].tolist() == [20]
    assert third["label"].to_pylist() == ["r20", "r21", "r22"]


def good_row(project: Path) -> dict:  # noqa: F811
    return request_rows(new_rows(project))[2]


@pytest.mark.parametrize(("name", "change", "status", "names"), [
    ("wrong type", lambda row: {"rows": [row, row | {"bill_length_mm": "long"}]}, 422,
     ["rows[1].bill_length_mm", "number"]),
    ("bool for a number", lambda row: {"rows": [row | {"year": True}]}, 422, ["rows[0].year"]),
    ("unknown column", lambda row: {"rows": [row | {"beak": 3.0}]}, 422, ["rows[0].beak", "not permitted"]),
    ("missing column", lambda row: {"rows": [{k: v for k, v in row.items() if k != "island"}]}, 422,
     ["rows[0].island", "required"]),
    ("no rows", lambda row: {"rows": []}, 422, ["rows", "at least 1"]),
    ("too many rows", lambda row: {"rows": [row] * 9}, 413, ["rows", "at most 8"]),
    ("not JSON", lambda row: b"{rows: [", 400, ["body", "JSON"]),
    ("not an object", lambda row: [row], 422, ["body", "object"]),
])
def test_a_bad_request_gets_its_status_and_names_the_field(project, server, name, change, status, names):  # noqa: F811
    body = change(good_row(project))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/predict", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    message = response.json()["message"]
    assert all(n in message for n in names), message
    assert response.json()["detail"][0]["loc"][0] == "body"


def test_health_ready_metadata_and_docs(project, server):  # noqa: F811
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    sha = hashlib.sha256((project / MODEL).read_bytes()).hexdigest()
    assert httpx.get(f"{server}/ready").json()["model_sha256"] == sha
    meta = httpx.get(f"{server}/metadata").json()
    assert (meta["variant"], meta["seed"], meta["backend"], meta["model_sha256"]) == (VARIANT, 0, "torch", sha)
    assert [(t["name"], t["kind"]) for t in meta["tasks"]] == [
        ("species", "multiclass"), ("sex", "binary"), ("body_mass", "regression")]
    assert meta["tasks"][0]["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert {i["name"]: i["kind"] for i in meta["inputs"]} == {
        "bill_length_mm": "numeric", "bill_depth_mm": "numeric", "flipper_length_mm": "numeric",
        "year": "numeric", "island": "categorical"}
    assert meta["outputs"][:2] == ["species", "species:p:Adelie"]
    assert meta["training_inputs_sha256"] == training_inputs(project)
    assert meta["versions"]["trained"]["torch"] == meta["versions"]["serving"]["torch"] == str(torch.__version__)
    assert "text/html" in httpx.get(f"{server}/docs").headers["content-type"]
    schema = httpx.get(f"{server}/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    row = schema["components"]["schemas"]["Row"]
    assert body["properties"]["rows"]["maxItems"] == 8
    assert set(row["required"]) == {i["name"] for i in meta["inputs"]} and row["additionalProperties"] is False


def training_inputs(project: Path) -> str:  # noqa: F811
    """The fingerprint of the fixture's training run, recomputed under the thread count it
    trained with (tests run earlier in this process may have set another)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(Bundle.load(project / MODEL).info["threads"])
        with contextlib.chdir(project):
            params = load_params()
            return train.fingerprint(params, VARIANT, 0, encoded.data_fingerprint(params))
    finally:
        torch.set_num_threads(before)


class Stream:
    """Requests sent one after another from ``threads`` threads, each over its own kept-alive
    connection (so that both worker processes get some), until ``stop``; each response's status
    and body."""

    def __init__(self, url: str, rows: list[dict], threads: int = 4):
        self.url, self.rows, self.results = url, rows, []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopped.is_set():  # a failure is recorded, not raised in the thread
                try:
                    response = client.post("/predict", json={"rows": self.rows})
                except httpx.TransportError as exc:
                    self.results.append((None, repr(exc)))
                    continue
                ok = response.status_code == 200
                self.results.append((response.status_code, response.json() if ok else response.text))

    def stop(self) -> list:
        self.stopped.set()
        for thread in self.threads:
            thread.join()
        return self.results


def workers_serving(url: str, sha: str, workers: int = 2, timeout: float = 15) -> None:
    """Wait until each of ``workers`` processes has answered /ready with model ``sha``."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len([w for w, s in seen.items() if s == sha]) < workers:
        assert time.monotonic() < deadline, f"not every worker serves {sha[:12]}: {seen}"
        ready = httpx.get(f"{url}/ready").json()
        seen[ready["worker"]] = ready["model_sha256"]


def retrained(root: Path) -> str:
    """Replace the trained model by one with other weights, as a new training run would; its SHA-256."""
    bundle = Bundle.load(root / MODEL)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.05)
    bundle.save(root / "new-model.pt")
    (root / "new-model.pt").replace(root / MODEL)
    return hashlib.sha256((root / MODEL).read_bytes()).hexdigest()


def test_a_reload_during_a_stream_of_requests_loses_none(project, tmp_path):  # noqa: F811
    """POST /reload loads the new model in the worker it reaches; the other worker loads the
    release it made (as it would one of the nightly flow) when it notices it."""
    root = Path(shutil.copytree(project, tmp_path / "project"))
    rows = request_rows(new_rows(root))
    with serving(root, "--workers", "2") as (url, _):
        old = httpx.post(f"{url}/predict", json={"rows": rows}).json()
        workers_serving(url, hashlib.sha256((root / MODEL).read_bytes()).hexdigest())
        stream = Stream(url, rows)
        time.sleep(0.5)
        sha = retrained(root)
        reloaded = httpx.post(f"{url}/reload", timeout=30)
        assert reloaded.status_code == 200 and reloaded.json()["model_sha256"] == sha
        workers_serving(url, sha)
        new = httpx.post(f"{url}/predict", json={"rows": rows}).json()
        time.sleep(0.5)
        results = stream.stop()
    assert not close(new, old)
    assert len(results) > 10 and all(status == 200 for status, _ in results), results[:3]
    assert all(close(body, old) or close(body, new) for _, body in results)
    assert close(results[0][1], old) and close(results[-1][1], new)  # the stream spans the reload


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port)).close()
    except ConnectionRefusedError:
        return False
    return True


def test_sigterm_drains_a_request_in_flight(project, tmp_path):  # noqa: F811
    root = Path(shutil.copytree(project, tmp_path / "project"))
    body = json.dumps({"rows": request_rows(new_rows(root))}).encode()
    with serving(root) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\n"
                           b"Expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
            assert client.recv(100).startswith(b"HTTP/1.1 100 Continue")  # the request is in the app
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while accepts(port):  # the server stops taking connections...
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.1)
            client.sendall(body)  # ...and answers the request in flight
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert process.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises it once drained
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(json.loads(content)["predictions"]) == len(new_rows(root))


def test_a_port_in_use_is_one_line(project, monkeypatch):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mtl(project, monkeypatch, "serve", "-v", VARIANT, "--port", str(port))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (address already in use)"]
