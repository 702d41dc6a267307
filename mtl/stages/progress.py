"""Progress of a data stage (ingest, augment, split): rows done and rows per second. On a terminal
a live line; otherwise (a log, a pipe: ``dvc repro``, the Prefect flows) a plain line at most
every ``EVERY`` seconds, so a long stage is never silent for long, and a short one prints only
its summary line, e.g. ``ingest: 1,000,000 rows in 12.3 s (81,300 rows/s)``."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

EVERY = 10.0
"""Seconds between two plain progress lines."""


class Rows:
    """Counts the rows a stage has done (``add``); use it as a context manager around the work.
    The summary line is printed when the block ends without an error."""

    def __init__(self, stage: str, every: float = EVERY, clock: Callable[[], float] = time.monotonic):
        self.stage, self.every, self.clock = stage, every, clock
        self.rows, self.live, self.start, self.shown = 0, None, 0.0, 0.0

    def __enter__(self) -> Self:
        from rich.console import Console

        console = Console()
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(console=console, transient=True, refresh_per_second=4)
            self.live.__enter__()
        self.start = self.shown = self.clock()
        return self

    def add(self, rows: int) -> None:
        self.rows += rows
        now = self.clock()
        if self.live is not None:
            self.live.update(self.line(now))
        elif now - self.shown >= self.every:
            print(self.line(now), flush=True)
            self.shown = now

    def line(self, now: float, done: bool = False) -> str:
        seconds = now - self.start
        rate = f"{self.rows / seconds:,.0f} rows/s" if seconds > 0 else "- rows/s"
        return (f"{self.stage}: {self.rows:,} rows in {seconds:.1f} s ({rate})" if done
                else f"{self.stage}: {self.rows:,} rows, {rate}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.live is not None:
            self.live.__exit__(kind, error, traceback)
        if error is None:
            print(self.line(self.clock(), done=True), flush=True)
