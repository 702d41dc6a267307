"""Micro-batching: the rows of concurrent requests gathered into one pass through the model.
The first waiting request starts a timer of ``wait_s``; when it fires, or as soon as
``max_rows`` rows wait, every waiting table goes through ``predict`` at once and each request
gets its own rows back. With ``wait_s`` 0 (``mtl serve``'s default) the timer fires on the
event loop's next turn, so a pass takes the requests that arrived together and adds no wait:
on CPU that costs a lone request nothing and lifts throughput at 8 and 64 concurrent requests
(BENCHMARKS.md, "Serving"), while a 2 ms wait halves it for a lone client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pyarrow as pa

from mtl.stages.predict import Columns


class Batcher:
    def __init__(self, predict: Callable[[pa.Table], Columns], wait_s: float, max_rows: int):
        self.predict, self.wait_s, self.max_rows = predict, wait_s, max_rows
        self.waiting: list[tuple[pa.Table, asyncio.Future]] = []
        self.rows = 0
        self.timer: asyncio.TimerHandle | None = None

    async def __call__(self, table: pa.Table) -> Columns:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((table, future))
        self.rows += table.num_rows
        if self.rows >= self.max_rows:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)
        return await future

    def flush(self) -> None:
        """One pass over every waiting table; each future gets its slice of the output."""
        if self.timer is not None:
            self.timer.cancel()
        waiting, self.waiting, self.rows, self.timer = self.waiting, [], 0, None
        try:
            columns = self.predict(pa.concat_tables([table for table, _ in waiting]))
        except Exception as exc:  # noqa: BLE001 (each request fails with it, as it would alone)
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for table, future in waiting:
            if not future.done():  # a client that went away cancelled its future
                future.set_result({k: v[start:start + table.num_rows] for k, v in columns.items()})
            start += table.num_rows
