"""The run's writer on a thread of its own, off the driver's critical path.

The driver hands it each batch the stages return (`submit`); a bounded queue holds them, so a writer that falls
behind slows the driver (and through it Ray Data's back-pressure, the stages) instead of growing memory. The thread
commits in groups: up to `max_rows` rows, or whatever came in `max_seconds` — a trickle still commits within the
time bound — and between commits folds the index's small files in (`IndexWriter.maintain`), so a commit costs the
same at the end of a million-video run as at its start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.store.writer import IndexWriter

_CLOSE = object()
log = logging.getLogger(__name__)


class BackgroundWriter:
    def __init__(self, writer: IndexWriter, *, max_rows: int = 2000, max_seconds: float = 5.0,
                 queue_batches: int = 64, maintain_every_s: float = 30.0):
        self.writer = writer
        self.max_rows, self.max_seconds, self.maintain_every_s = max_rows, max_seconds, maintain_every_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_batches)
        self._error: BaseException | None = None
        self.latencies: list[float] = []  # seconds per commit group
        self.rows: list[int] = []  # rows per commit group
        self.busy_s = 0.0  # committing and maintaining
        self.waited_s = 0.0  # the driver, held up by a full queue
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="index-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: pa.Table) -> None:
        """Hand a batch to the writer; waits while the queue is full. Raises what failed the writer."""
        t0 = time.perf_counter()
        while True:
            self._raise()
            try:
                self._queue.put(batch, timeout=0.5)
                break
            except queue.Full:
                continue
        self.waited_s += time.perf_counter() - t0

    def close(self, quiet: bool = False) -> None:
        """Commit what is waiting, stop the thread, raise what failed it (`quiet`: log it instead, when another
        error is already on its way)."""
        while self._thread.is_alive():  # a thread that died leaves its queue full: no waiting on it then
            try:
                self._queue.put(_CLOSE, timeout=0.5)
                self._thread.join()
            except queue.Full:
                continue
        if quiet and self._error is not None:
            log.error("the index writer failed too: %s", self._error)
            return
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive() and self._queue.qsize() and self._error is None:
            raise RuntimeError("the index writer's thread stopped")

    def _loop(self) -> None:
        pending: list[pa.Table] = []
        rows = 0
        first = last_maintain = time.monotonic()
        try:
            while True:
                wait = None if not pending else max(0.0, first + self.max_seconds - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None  # the time bound: commit what waits
                if item is _CLOSE:
                    self._flush(pending)
                    return
                if item is not None:
                    if not pending:
                        first = time.monotonic()
                    pending.append(item)
                    rows += item.num_rows
                if pending and (item is None or rows >= self.max_rows
                                or time.monotonic() - first >= self.max_seconds):
                    self._flush(pending)
                    pending, rows = [], 0
                if time.monotonic() - last_maintain >= self.maintain_every_s:
                    t0 = time.perf_counter()
                    self.writer.maintain()
                    self.busy_s += time.perf_counter() - t0
                    last_maintain = time.monotonic()
        except BaseException as e:  # noqa: BLE001 — handed to the driver on its next call
            self._error = e

    def _flush(self, pending: list[pa.Table]) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        records = [r for t in pending for r in t.to_pylist()]
        self.writer.write(records)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.latencies.append(dt)
        self.rows.append(len(records))

    def stats(self) -> dict[str, Any]:
        """For the run manifest: how busy the writer was and what a commit group cost."""
        wall = time.perf_counter() - self._started
        lat = self.latencies

        def q(p: float) -> float | None:
            return round(quantile(lat, p), 4) if lat else None

        return {"busy_fraction": round(self.busy_s / wall, 4) if wall else None, "commits": len(lat),
                "commit_p50_s": q(0.5), "commit_p95_s": q(0.95),
                "rows_per_commit": round(sum(self.rows) / len(self.rows), 1) if self.rows else None,
                "driver_waited_s": round(self.waited_s, 3)}


def quantile(values: Sequence[float], p: float) -> float:
    """The value at rank `p` (0..1) of `values` (nearest rank below; not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


__all__ = ["BackgroundWriter", "quantile"]
