"""Serving throughput on loopback: `mtl serve` against a bare FastAPI handler, in one run.

    python bench/serve.py [--seconds 2] [--repeats 3] [--project DIR]

The model is hps-ew trained on penguins (8 epochs, seed 0) in a temporary project, exported to
ONNX (not timed; ``--project`` reuses a project that has both). Five servers run at once, each
in its own process, one uvicorn worker with one torch thread each, access log off:

- ``torch``: ``mtl serve`` as it comes (validation, the model's preprocessing, the torch module,
  decoding; micro-batching with no wait);
- ``torch, no batching``: the same with ``--no-batching``;
- ``torch, batch wait 2 ms``: the same with ``--batch-wait-ms 2``;
- ``onnx``: ``mtl serve --backend onnx``;
- ``bare``: a minimal FastAPI app that reads the body and runs the same torch module, under
  ``torch.inference_mode``, on tensors made before the run, returning the raw outputs.

A bounded async client (httpx, one connection per concurrent user) sends the same JSON bodies
(1 row and 64 rows of the test split) to each at concurrency 1, 8 and 64, for ``--seconds``
after one warm-up request per user. Each repeat measures every server in each setting, in an
order that rotates. Prints requests/s and p50/p99 latency (medians over repeats) and the ratio
to the bare handler, and writes bench/results/serve-<host>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import Machine, save_result
from mtl.engine.checkpoint import Bundle
from mtl.stages.trained import feature_columns
from tests.helpers import env, free_port

VARIANT = "hps-ew"
SERVERS = {"torch": [], "torch, no batching": ["--no-batching"],
           "torch, batch wait 2 ms": ["--batch-wait-ms", "2"], "onnx": ["--backend", "onnx"]}
ROWS, CONCURRENCY = (1, 64), (1, 8, 64)


def prepare(root: Path) -> None:
    """Penguins, hps-ew trained for seed 0 and exported to ONNX, in ``root``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seeds"] = [0]
    raw["train"] |= {"epochs": 8, "batch_size": 64, "patience": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in (["ingest"], ["augment"], ["split"], ["train", "-v", VARIANT],
                    ["export", "-v", VARIANT, "-f", "onnx", "-o", f"exports/{VARIANT}.onnx"]):
        subprocess.run(["mtl", *command], cwd=root, env=env(), check=True, capture_output=True)


def bodies(root: Path) -> dict[int, bytes]:
    """JSON bodies of 1 and 64 test rows (the feature columns), cycled."""
    bundle = Bundle.load(root / "models" / VARIANT / "seed-0" / "model.pt")
    rows = pq.read_table(root / "data/split/test.parquet").select(
        feature_columns(bundle.preprocessor)).to_pylist()
    return {n: json.dumps({"rows": [rows[i % len(rows)] for i in range(n)]}).encode() for n in ROWS}


def bare(root: Path, port: int) -> None:
    """The baseline server: the same torch module on pre-made inputs, nothing else."""
    torch.set_num_threads(1)  # as in each worker of `mtl serve` (--threads 1)
    bundle = Bundle.load(root / "models" / VARIANT / "seed-0" / "model.pt")
    model = bundle.model.eval()
    inputs = {n: bundle.preprocessor.transform(pa.Table.from_pylist(json.loads(body)["rows"]))
              for n, body in bodies(root).items()}
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict/{n}")
    async def predict(n: int, request: Request) -> JSONResponse:
        await request.body()
        with torch.inference_mode():
            outputs = model(inputs[n])
        return JSONResponse({k: v.tolist() for k, v in outputs.items()})

    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


def start(root: Path) -> tuple[dict[str, str], dict[str, subprocess.Popen]]:
    """Every server in its own process; the URL of each one's predict (per body size: {n})."""
    urls, processes = {}, {}
    commands = {name: ["mtl", "serve", "-v", VARIANT, *args] for name, args in SERVERS.items()}
    commands["bare"] = [sys.executable, __file__, "--bare", str(root)]
    for name, command in commands.items():
        port = free_port()
        processes[name] = subprocess.Popen([*command, "--port", str(port)], cwd=root, env=env(),
                                           stderr=subprocess.DEVNULL)
        urls[name] = f"http://127.0.0.1:{port}/predict" + ("/{n}" if name == "bare" else "")
    for url in urls.values():
        health = url.rsplit("/predict", 1)[0] + "/health"
        for _ in range(600):
            try:
                if httpx.get(health).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{health} did not answer")
    return urls, processes


async def drive(url: str, body: bytes, concurrency: int, seconds: float,
                server: psutil.Process) -> dict:
    """``concurrency`` users, each sending ``body`` again as soon as the answer comes; with the
    CPU time the ``server`` process spent per request."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def send() -> float:
            start = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()
            return time.perf_counter() - start

        async def user(stop: float) -> None:
            while time.perf_counter() < stop:
                latencies.append(await send())

        await asyncio.gather(*(send() for _ in range(concurrency)))  # warm-up, connections open
        begin, cpu = time.perf_counter(), sum(server.cpu_times()[:2])
        await asyncio.gather(*(user(begin + seconds) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - begin, sum(server.cpu_times()[:2]) - cpu
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)], "requests": len(latencies),
            "server_cpu_ms": 1e3 * cpu / len(latencies)}


def measure(urls: dict[str, str], pids: dict[str, int], payloads: dict[int, bytes], seconds: float,
            repeats: int) -> dict:
    runs: dict[str, list[dict]] = {}
    names = list(urls)
    for repeat in range(repeats):
        for rows in ROWS:
            for concurrency in CONCURRENCY:
                order = names[repeat % len(names):] + names[:repeat % len(names)]
                for name in order:
                    url = urls[name].format(n=rows)
                    server = psutil.Process(pids[name])
                    result = asyncio.run(drive(url, payloads[rows], concurrency, seconds, server))
                    runs.setdefault(f"{name}|{rows}|{concurrency}", []).append(result)
    metrics = ("rps", "p50_ms", "p99_ms", "server_cpu_ms")
    return {key: {m: statistics.median(r[m] for r in results) for m in metrics}
            for key, results in runs.items()}


def table(medians: dict) -> str:
    lines = [("| rows | concurrency | server | requests/s | / bare | p50 ms | p99 ms | "
              "server CPU ms / request |"), "|---|---|---|---|---|---|---|---|"]
    for rows in ROWS:
        for concurrency in CONCURRENCY:
            base = medians[f"bare|{rows}|{concurrency}"]["rps"]
            for name in [*SERVERS, "bare"]:
                m = medians[f"{name}|{rows}|{concurrency}"]
                lines.append(f"| {rows} | {concurrency} | {name} | {m['rps']:.0f} | "
                             f"{m['rps'] / base:.2f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                             f"{m['server_cpu_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--project", type=Path, help="a project with hps-ew trained and exported")
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)  # run the baseline server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare(args.bare, args.port)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.project or Path(scratch)
        if not args.project:
            prepare(root)
        machine = Machine()
        urls, processes = start(root)
        try:
            pids = {name: process.pid for name, process in processes.items()}
            medians = measure(urls, pids, bodies(root), args.seconds, args.repeats)
        finally:
            for process in processes.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    print(table(medians))
    info = machine.finish()
    info["servers_cores"] = info.pop("children_cores")
    print(json.dumps(info))
    save_result("serve", {"machine": info, "seconds": args.seconds, "repeats": args.repeats,
                            "medians": medians})


if __name__ == "__main__":
    main()
