"""A run's Prometheus metrics, served while it runs (`runtime.metrics_port`, `stllm-index run --metrics-port`).

The driver knows what the writer did and reads what the workers report (`pipeline.run_stats`); this module turns
the latest of both into Prometheus metrics at `http://<host>:<port>/metrics`. The engine's figures keep vLLM's own
names (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, summed over the model actors), so vLLM dashboards work;
the pipeline's are `stllm_*`:

| metric | what |
|---|---|
| `stllm_videos_total{state}` | listed, skipped, known_bad, deferred, indexed (cells computed), copies, failed |
| `stllm_generations_total{kind}` | captions and answers generated |
| `stllm_stage_{rows,busy_seconds,errors}_total{stage}` | per stage (decode, model) |
| `stllm_stage_queue_rows{stage}` | rows a stage has not taken yet (decoded, not yet through the model) |
| `stllm_engine_busy_ratio` | the engines' busy time over their wall time (mean over model actors) |
| `stllm_writer_busy_ratio`, `stllm_writer_commits_total`, `stllm_writer_commit_seconds{quantile}` | the writer |
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

STATES = {"listed": "listed", "skipped": "skipped", "known_bad": "known_bad", "deferred": "deferred",
          "indexed": "indexed", "copies": "copies", "errors": "failed"}


class RunMetrics:
    """A Prometheus collector over the run's latest figures, with its own HTTP server (closed by `close`)."""

    def __init__(self, port: int, job: str, run_id: str, counts: Callable[[], dict[str, Any]],
                 writer: Callable[[], dict[str, Any]], stats: Callable[[], dict[str, Any]],
                 host: str = "0.0.0.0"):
        """`counts`, `writer`, `stats` (the workers' figures, `RunStats.snapshot`): read at each scrape, so the
        figures are live whatever the driver is doing (waiting for the first batch, say)."""
        from prometheus_client import CollectorRegistry, start_http_server

        self.labels = {"job": job, "run_id": run_id}
        self._counts, self._writer, self._stats = counts, writer, stats
        self.stats: dict[str, Any] = {}
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names, values = list(self.labels), list(self.labels.values())
        try:
            self.stats = self._stats()
        except Exception as e:  # noqa: BLE001 — the last figures serve while the stats actor does not answer
            log.warning("run stats unavailable for the metrics: %s", e)
        self.counts = {**self._counts(), **(self.stats.get("tally") or {})}
        self.writer = self._writer()

        def family(kind: Any, name: str, doc: str, extra: list[str] = ()) -> Any:
            return kind(name, doc, labels=[*names, *extra])

        videos = family(CounterMetricFamily, "stllm_videos", "objects of the run by what happened", ["state"])
        for key, state in STATES.items():
            videos.add_metric([*values, state], float(self.counts.get(key) or 0))
        yield videos
        gen = family(CounterMetricFamily, "stllm_generations", "captions and answers generated", ["kind"])
        for kind, n in (self.counts.get("generations") or {}).items():
            gen.add_metric([*values, kind], float(n))
        yield gen
        stages = self.stats.get("stages") or {}
        for key, name, doc in (("rows", "stllm_stage_rows", "rows a stage finished"),
                               ("busy_s", "stllm_stage_busy_seconds", "seconds a stage's actors worked"),
                               ("errors", "stllm_stage_errors", "rows a stage failed")):
            m = family(CounterMetricFamily, name, doc, ["stage"])
            for stage, figures in stages.items():
                m.add_metric([*values, stage], float(figures.get(key) or 0))
            yield m
        queue = family(GaugeMetricFamily, "stllm_stage_queue_rows", "rows waiting for a stage", ["stage"])
        if "decode" in stages:
            waiting = (stages["decode"].get("rows") or 0) - (stages.get("model", {}).get("rows") or 0)
            queue.add_metric([*values, "model"], float(max(waiting, 0)))
        yield queue
        yield from self._engine_metrics(names, values)
        yield from self._writer_metrics(names, values, family, GaugeMetricFamily, CounterMetricFamily)

    def _engine_metrics(self, names: list[str], values: list[str]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engines = self.stats.get("engines") or []
        for name, key, kind, doc in (
                ("vllm:num_requests_running", "requests_running", GaugeMetricFamily, "requests in the batch"),
                ("vllm:num_requests_waiting", "requests_waiting", GaugeMetricFamily, "requests waiting"),
                ("vllm:prompt_tokens", "prompt_tokens", CounterMetricFamily, "prompt tokens processed"),
                ("vllm:generation_tokens", "generation_tokens", CounterMetricFamily, "tokens generated")):
            m = kind(name, doc, labels=names)
            m.add_metric(values, float(sum(e.get(key) or 0 for e in engines)))
            yield m
        for name, key, doc in (("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage, 1 = full"),
                               ("stllm_engine_busy_ratio", "busy_fraction", "engine busy time over its wall time")):
            m = GaugeMetricFamily(name, doc + " (mean over the model actors)", labels=names)
            seen = [e[key] for e in engines if e.get(key) is not None]
            m.add_metric(values, sum(seen) / len(seen) if seen else 0.0)
            yield m

    def _writer_metrics(self, names: list[str], values: list[str], family: Any, gauge: Any,
                        counter: Any) -> Iterator[Any]:
        w = self.writer
        busy = family(gauge, "stllm_writer_busy_ratio", "the writer thread's busy time over the run's")
        busy.add_metric(values, float(w.get("busy_fraction") or 0.0))
        yield busy
        commits = family(counter, "stllm_writer_commits", "commit groups written")
        commits.add_metric(values, float(w.get("commits") or 0))
        yield commits
        latency = gauge("stllm_writer_commit_seconds", "seconds a commit group took", labels=[*names, "quantile"])
        for q, key in (("0.5", "commit_p50_s"), ("0.95", "commit_p95_s")):
            if w.get(key) is not None:
                latency.add_metric([*values, q], float(w[key]))
        yield latency


__all__ = ["RunMetrics"]
