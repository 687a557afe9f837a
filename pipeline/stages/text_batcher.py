"""Embed the text of several batches in one call, on one thread.

The model actor finishes batches one by one while several are on the engine. Each embedding its own few
captions on a thread of its own meant small matrix products, side by side: MiniLM-L6 on one thread costs ~5 ms
of CPU per caption 4 at a time against ~3 ms 32 at a time, and two embedding threads competed with vLLM's
worker on a small machine. Here one thread takes what was submitted; while the submitters say more text is on
its way (other batches are still on the engine) it waits for it, up to `min_texts` texts, `max_submits`
submits or `max_wait_s`, then encodes everything in one call. Each submit's future gets its own rows back.
A submit waiting here holds its batch (and its Ray task) back, so the model actor waits for at most half of
the batches it works on: the other half keeps the engine fed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

Encode = Callable[[list[str]], np.ndarray]  # texts → (len(texts), dim) float32


@dataclass
class _Submitted:
    texts: list[str]
    more_coming: bool
    future: Future


class TextBatcher:
    def __init__(self, encode: Encode, min_texts: int = 32, max_submits: int = 4, max_wait_s: float = 0.2):
        self._encode = encode
        self._min_texts = min_texts
        self._max_submits = max_submits  # each waiting submit holds a batch back from its stage's next step
        self._max_wait_s = max_wait_s
        self._queue: queue.Queue[_Submitted | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.calls = 0  # encode calls so far, the texts they took, and this thread's CPU seconds in them
        self.texts = 0
        self._thread = threading.Thread(target=self._loop, name="stllm-text-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], more_coming: bool = False) -> Future:
        """A future of the texts' embeddings, (len(texts), dim) float32. `more_coming`: more text will be
        submitted soon, worth waiting for (at most `max_wait_s`)."""
        future: Future = Future()
        with self._lock:  # nothing is queued behind close()'s end marker
            if not self._closed:
                self._queue.put(_Submitted(list(texts), more_coming, future))
                return future
        future.set_exception(RuntimeError("the text batcher is closed"))
        return future

    def close(self, timeout_s: float = 60.0) -> None:
        """Embed what was submitted, then stop."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        try:
            while self._next_call():
                pass
        finally:  # whatever ended the loop, no submit is left waiting forever
            with self._lock:
                self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item.future.set_running_or_notify_cancel():
                    item.future.set_exception(RuntimeError("the text batcher stopped"))

    def _next_call(self) -> bool:
        """Take the next group of submits and encode it; False once close() was called and all is done."""
        item = self._queue.get()
        if item is None:
            return False
        waiting = [item]
        deadline = time.monotonic() + self._max_wait_s
        while True:
            try:  # what is already there joins this call
                item = self._queue.get_nowait()
            except queue.Empty:
                enough = (sum(len(w.texts) for w in waiting) >= self._min_texts
                          or len(waiting) >= self._max_submits)
                if enough or not waiting[-1].more_coming:
                    break
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
            if item is None:
                self._run(waiting)
                return False
            waiting.append(item)
        self._run(waiting)
        return True

    def _run(self, waiting: list[_Submitted]) -> None:
        # a submit whose caller gave up (its future cancelled) is left out; the others can no longer be cancelled
        waiting = [w for w in waiting if w.future.set_running_or_notify_cancel()]
        if not self._encode_into(waiting):  # one bad batch must not fail the others it was grouped with
            for w in waiting:
                self._encode_into([w])

    def _encode_into(self, group: list[_Submitted]) -> bool:
        """Encode a group's texts in one call and hand each submit its rows; False if a group of several
        failed (nothing is set then: the caller tries them one by one)."""
        texts = [t for w in group for t in w.texts]
        try:
            vectors = self._encode(texts) if texts else np.zeros((0, 0), np.float32)
        except BaseException as e:  # noqa: BLE001
            if len(group) > 1:
                return False
            for w in group:
                w.future.set_exception(e)
            return True
        self.calls += 1
        self.texts += len(texts)
        start = 0
        for w in group:
            w.future.set_result(vectors[start:start + len(w.texts)])
            start += len(w.texts)
        return True
