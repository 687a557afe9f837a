"""Keep the vLLM engine busy: batches from any thread join the running batch instead of waiting for it.

One loop thread owns the `vllm.LLM` (vLLM's sync engine is not thread-safe): it takes submitted batches off a
queue, hands their requests to the engine, and steps the engine while anything is unfinished — so a new batch's
requests are scheduled next to an earlier batch's last sequences (vLLM's continuous batching), and there is no
barrier between batches. A batch's future resolves as soon as its own videos are done, in any order; its
answers are matched by request id. A failed step fails the batches in flight (a dead engine fails every later
one at once); a request vLLM refuses fails alone.

`stats()` says how busy the engine was: `busy_s` (wall time during which the engine had sequences running),
`active_s` (from the first submit of a busy period to its last result), the sequences in flight per step
(the unfinished requests, up to `max_num_seqs`: what the scheduler can run at once), and when each batch
completed (`completed`: [seconds since the first submit, videos], the last 10,000) — for a steady-state rate.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stllm.engine import GenerationOptions, VideoRequest, VideoResult

if TYPE_CHECKING:
    from stllm.vllm.engine import VLLMEngine


@dataclass
class _Batch:
    requests: list[VideoRequest]
    options: GenerationOptions
    future: Future
    results: list[VideoResult] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)  # request index → video content key
    answers: dict[tuple[int, int], Any] = field(default_factory=dict)  # (request, question index) → Answer
    open: int = 0  # vLLM requests not finished yet


@dataclass
class FeedStats:
    busy_s: float = 0.0
    active_s: float = 0.0
    steps: int = 0
    inflight_sum: int = 0
    inflight_max: int = 0
    batches: int = 0
    completed: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))

    def as_dict(self, max_num_seqs: int) -> dict[str, Any]:
        mean = self.inflight_sum / self.steps if self.steps else 0.0
        return {"busy_s": round(self.busy_s, 3), "active_s": round(self.active_s, 3),
                "busy_fraction": round(self.busy_s / self.active_s, 4) if self.active_s else None,
                "steps": self.steps, "batches": self.batches, "inflight_mean": round(mean, 2),
                "inflight_max": self.inflight_max, "max_num_seqs": max_num_seqs,
                "inflight_mean_over_max": round(mean / max_num_seqs, 4) if max_num_seqs else None,
                "completed": [[round(t, 4), n] for t, n in self.completed]}


class EngineFeeder:
    def __init__(self, engine: VLLMEngine):
        self.engine = engine
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._pending: dict[str, tuple[_Batch, int, int]] = {}  # vLLM id → (batch, request, question index)
        self._stats = FeedStats()
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._closed = False
        self._busy_since: float | None = None  # the engine has sequences since then
        self._active_since: float | None = None  # a batch has been waiting for results since then
        self._first_submit: float | None = None
        self._thread = threading.Thread(target=self._loop, name="stllm-engine-feeder", daemon=True)
        self._thread.start()

    def submit(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> Future:
        future: Future = Future()
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        if self._dead is not None or self._closed:
            future.set_exception(self._dead or RuntimeError("the engine is closed"))
            return future
        self._queue.put(_Batch(list(requests), options or GenerationOptions(), future))
        return future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = time.perf_counter()
            snapshot = FeedStats(**{**vars(self._stats), "completed": list(self._stats.completed)})
            if self._busy_since is not None:  # the periods still open count up to now
                snapshot.busy_s += now - self._busy_since
            if self._active_since is not None:
                snapshot.active_s += now - self._active_since
            return snapshot.as_dict(self.engine.max_num_seqs)

    def close(self, timeout_s: float = 300.0) -> None:
        """Finish what is in flight (every submitted batch gets its results), then stop; later submits fail."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    # ---- the loop (the only thread that touches the LLM) -----------------------------------------------

    def _loop(self) -> None:
        stopping = False
        while True:
            if stopping and not self._pending:  # close() was called and what was in flight is done
                self._close_periods()
                return
            try:
                item = self._queue.get(block=not self._pending, timeout=None if not self._pending else 0)
            except queue.Empty:
                item = _NOTHING
            # An idle engine's scheduler is paused while a batch is enqueued: vLLM's engine core steps as soon as
            # one request is there, so otherwise the first video's ViT pass would run alone (videos enqueued
            # together share one pass). A busy engine is never paused: new requests join its running batch.
            paused = item not in (_NOTHING, None) and not self._pending and self._pause_scheduling()
            try:
                while item is not _NOTHING:  # every batch waiting now joins before the next step
                    if item is None:
                        stopping = True
                        break
                    with self._lock:
                        if self._active_since is None:
                            self._active_since = time.perf_counter()
                    self._start(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = _NOTHING
            finally:
                if paused:
                    self._resume_scheduling()
            if not self._pending:
                self._close_periods()
                if stopping:
                    return  # drained
                continue
            inflight = min(len(self._pending), self.engine.max_num_seqs)  # what the scheduler can run this step
            with self._lock:
                if self._busy_since is None:
                    self._busy_since = time.perf_counter()
            try:
                outputs = self.engine.llm.llm_engine.step()
            except BaseException as e:  # noqa: BLE001 — the engine failed: fail what is in flight
                self._fail_all(e)
                outputs = []
            with self._lock:
                self._stats.steps += 1
                self._stats.inflight_sum += inflight
                self._stats.inflight_max = max(self._stats.inflight_max, inflight)
            finished = [out for out in outputs if out.finished]
            if len(finished) == len(self._pending) and finished:
                self._close_periods()  # the last sequences: the engine is idle from here on
            for out in finished:
                self._finish_request(out)

    def _pause_scheduling(self) -> bool:
        if not self.engine.healthy():
            return False
        try:
            self.engine.llm.llm_engine.sleep(level=0, mode="keep")  # level 0: scheduling only, memory stays
            return True
        except Exception:  # noqa: BLE001 — a dead engine: enqueue reports it
            return False

    def _resume_scheduling(self) -> None:
        try:
            self.engine.llm.llm_engine.wake_up(tags=["scheduling"])
        except Exception:  # noqa: BLE001 — the next step reports a dead engine
            pass

    def _close_periods(self) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._busy_since is not None:
                self._stats.busy_s += now - self._busy_since
                self._busy_since = None
            if self._active_since is not None:
                self._stats.active_s += now - self._active_since
                self._active_since = None

    def _start(self, batch: _Batch) -> None:
        with self._lock:
            self._stats.batches += 1
        try:
            batch.results, batch.keys, added = self.engine.enqueue(batch.requests, batch.options)
        except BaseException as e:  # noqa: BLE001 — invalid options, or the engine is gone
            if not self.engine.healthy():
                self._dead = e
            batch.future.set_exception(e)
            return
        for request_id, index, qi in added:
            self._pending[request_id] = (batch, index, qi)
        batch.open = len(added)
        if batch.open == 0:
            self._complete(batch)

    def _finish_request(self, out: Any) -> None:
        # outputs carry the id the request was enqueued under, or its external part ("<external>-<random>")
        entry = self._pending.pop(out.request_id, None) or next(
            (self._pending.pop(r) for r in list(self._pending) if r.rsplit("-", 1)[0] == out.request_id), None)
        if entry is None:
            return
        batch, index, qi = entry
        batch.answers[(index, qi)] = self.engine.answer(batch.requests[index].questions[qi], out, batch.options)
        batch.open -= 1
        if batch.open == 0:
            self._complete(batch)

    def _complete(self, batch: _Batch) -> None:
        for (index, _), answer in sorted(batch.answers.items()):  # in question order, whatever finished first
            batch.results[index].answers.append(answer)
        try:
            self.engine.attach_embeddings(batch.results, batch.keys)
        except BaseException as e:  # noqa: BLE001
            batch.future.set_exception(e)
            return
        with self._lock:
            self._stats.completed.append((time.perf_counter() - (self._first_submit or 0.0), len(batch.requests)))
        batch.future.set_result(batch.results)

    def _fail_all(self, error: BaseException) -> None:
        batches = {id(b): b for b, _, _ in self._pending.values()}
        self._pending.clear()
        if not self.engine.healthy():
            self._dead = error
        for b in batches.values():
            if not b.future.done():
                b.future.set_exception(error)



_NOTHING = object()


__all__ = ["EngineFeeder", "FeedStats"]
