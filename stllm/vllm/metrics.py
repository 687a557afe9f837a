"""Engine statistics from vLLM's own metrics, through its public stat-logger interface.

`EngineMetrics` is a `StatLoggerBase` given to `AsyncLLM(stat_loggers=[...])`: vLLM's output handler calls
`record()` once per engine step with the scheduler's `SchedulerStats` (requests running and waiting, KV-cache
usage) and the step's `IterationStats` (prompt and generation tokens, time to first token). From them:

- busy periods: a period starts when a request arrives at an idle engine (the step's time to first token says
  when, vLLM's own TTFT) and ends at the first step after which vLLM holds no unfinished request (a request
  ending on a stop string is finished by the front end, after the scheduler's last report, so the front end's
  count decides);
- time-weighted means over the busy time of the requests running and waiting and of the KV-cache usage: each
  step's report holds until the next one (it is the state the next step starts from);
- tokens and tokens/s over the engine's wall time, from the first submit to the last result (or to now while
  batches are in flight) — the batches' submit and result times are the only figures the engine itself adds.

vLLM documents that `SchedulerStats` and `IterationStats` may change between releases: the fields read here
are listed in docs/engine.md and checked by tests/test_vllm.py. A failure here turns the metrics off (logged)
instead of failing vLLM's output handler, which would fail every request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

log = logging.getLogger(__name__)


class EngineMetrics(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0):
        self.engine_index = engine_index
        self.max_num_seqs: int = vllm_config.scheduler_config.max_num_seqs
        # vLLM's count of unfinished requests (`AsyncLLM.get_num_unfinished_requests`), set once the engine exists
        self.unfinished: Callable[[], int] | None = None
        self.enabled = True
        self._lock = threading.Lock()
        # busy periods, from the steps' reports (time.monotonic)
        self._busy_since: float | None = None
        self._idle_since = float("-inf")
        self._last_t = 0.0
        self._state = (0, 0, 0.0)  # running, waiting, KV-cache usage after the last step
        self._batches_open = 0
        self._zero()

    def _zero(self) -> None:
        """The figures start again (what is in flight stays in flight)."""
        now = time.monotonic()
        if self._busy_since is not None:  # an open busy period counts from now on
            self._busy_since = self._last_t = now
        self._busy_s = 0.0
        self._integrals = [0.0, 0.0, 0.0]  # of the state over busy time
        self._running_max = 0
        self._kv_max = 0.0
        self._steps = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        # the engine's batches (its callers' view)
        self._first_submit: float | None = now if self._batches_open else None
        self._last_result: float | None = None
        self._batches = 0

    def reset(self) -> None:
        with self._lock:
            self._zero()

    # ---- vLLM's side (its output handler, on the engine's event loop) --------------------------------------

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None,
               mm_cache_stats: MultiModalCacheStats | None = None, engine_idx: int = 0) -> None:
        if not self.enabled:
            return
        try:
            self._record(time.monotonic(), scheduler_stats, iteration_stats)
        except Exception:  # noqa: BLE001 — never fail vLLM's output handler (it would fail every request)
            self.enabled = False
            log.exception("engine metrics turned off: vLLM's stats did not read as expected")

    def log_engine_initialized(self) -> None:
        pass

    def _record(self, t: float, sched: SchedulerStats | None, it: IterationStats | None) -> None:
        ttft = None
        with self._lock:
            if it is not None:
                self._prompt_tokens += it.num_prompt_tokens
                self._generation_tokens += it.num_generation_tokens
                ttft = max(it.time_to_first_tokens_iter, default=None)
            state = self._state
            if sched is not None:
                self._steps += 1
                state = (sched.num_running_reqs, sched.num_waiting_reqs + sched.num_skipped_waiting_reqs,
                         float(sched.kv_cache_usage))
            active = (self.unfinished() if self.unfinished is not None else state[0] + state[1]) > 0
            if self._busy_since is None:
                if not active and ttft is None:
                    self._state = state
                    return
                # a new busy period: it began when its first request arrived (at most at the last idle report)
                self._busy_since = max(t - (ttft or 0.0), self._idle_since)
                self._add(state, t - self._busy_since)
            else:
                self._add(self._state, t - self._last_t)
                if ttft is not None and t - ttft < self._busy_since:  # a request that arrived before we knew
                    start = max(t - ttft, self._idle_since)
                    self._add(state, self._busy_since - start)
                    self._busy_since = start
            self._state, self._last_t = state, t
            self._running_max = max(self._running_max, state[0])
            self._kv_max = max(self._kv_max, state[2])
            if not active:
                self._busy_s += t - self._busy_since
                self._busy_since, self._idle_since = None, t

    def _add(self, state: tuple[int, int, float], dt: float) -> None:
        for i, v in enumerate(state):
            self._integrals[i] += v * dt

    # ---- the engine's side (any thread) --------------------------------------------------------------------

    def batch_submitted(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._first_submit is None:
                self._first_submit = now
            self._batches_open += 1
            self._batches += 1

    def batch_done(self) -> None:
        with self._lock:
            self._batches_open -= 1
            self._last_result = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """The figures so far (see the module docstring; docs/engine.md says what each key means)."""
        with self._lock:
            now = time.monotonic()
            busy, integrals = self._busy_s, list(self._integrals)
            if self._busy_since is not None:  # the open period counts up to now, in its last reported state
                busy += now - self._busy_since
                for i, v in enumerate(self._state):
                    integrals[i] += v * (now - self._last_t)
            start = self._first_submit
            end = now if self._batches_open else self._last_result
            wall = (end - start) if start is not None and end is not None else 0.0

            def per(x: float, over: float, digits: int = 4) -> float | None:
                return round(x / over, digits) if over > 0 else None

            running = per(integrals[0], busy, 3)
            return {
                "wall_s": round(wall, 3), "busy_s": round(busy, 3), "busy_fraction": per(busy, wall),
                # the scheduler's last report: what a dashboard shows now
                "requests_running": self._state[0], "requests_waiting": self._state[1],
                "kv_cache_usage": round(self._state[2], 4),
                "requests_running_mean": running, "requests_running_max": self._running_max,
                "requests_waiting_mean": per(integrals[1], busy, 3), "max_num_seqs": self.max_num_seqs,
                "requests_running_mean_over_max": round(running / self.max_num_seqs, 4) if running is not None
                else None,
                "kv_cache_usage_mean": per(integrals[2], busy), "kv_cache_usage_max": round(self._kv_max, 4),
                "prompt_tokens": self._prompt_tokens, "generation_tokens": self._generation_tokens,
                "prompt_tokens_per_s": per(self._prompt_tokens, wall, 1),
                "generation_tokens_per_s": per(self._generation_tokens, wall, 1),
                "steps": self._steps, "batches": self._batches, "metrics_enabled": self.enabled,
            }


__all__ = ["EngineMetrics"]
