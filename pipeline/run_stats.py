"""What a run's workers report while they work, outside the data rows: the listing's counts per page (listed,
skipped, known-bad, deferred), each stage's rows and busy seconds, each model actor's engine statistics (vLLM's
own: requests running and waiting, tokens, KV-cache use). One small Ray actor per run holds them; the driver reads
a snapshot for the progress bar, the manifest and the metrics endpoint (`pipeline.metrics`).

`RunStats` is a plain class, made a Ray actor by the runner (`ray.remote(RunStats)`): workers get its handle.
`Reporter` is what a stage keeps: it sends its latest figures after each batch, without waiting.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

STAGE_COUNTERS = ("rows", "busy_s", "errors")  # summed over a stage's actors


class RunStats:
    def __init__(self) -> None:
        self.tally: Counter[str] = Counter()
        self.stages: dict[str, dict[str, dict[str, Any]]] = {}  # stage → actor → its latest figures

    def add_tally(self, counts: dict[str, int]) -> None:
        self.tally.update(counts)

    def report(self, stage: str, actor: str, figures: dict[str, Any]) -> None:
        self.stages.setdefault(stage, {})[actor] = figures

    def snapshot(self) -> dict[str, Any]:
        """{"tally": {...}, "stages": {stage: summed counters}, "actors": {stage: [each actor's latest figures]},
        "engines": [each model actor's engine stats]}."""
        stages = {stage: {k: sum(a.get(k) or 0 for a in actors.values()) for k in STAGE_COUNTERS}
                  for stage, actors in self.stages.items()}
        engines = [a["engine"] for a in self.stages.get("model", {}).values() if a.get("engine")]
        return {"tally": dict(self.tally), "stages": stages, "engines": engines,
                "actors": {stage: list(actors.values()) for stage, actors in self.stages.items()}}


class Reporter:
    """A stage's figures, sent to the run's `RunStats` actor (fire and forget: a slow driver never holds a stage
    up; one small actor call per batch). No hub (a stage used outside a run): nothing is sent."""

    def __init__(self, hub: Any, stage: str):
        self.hub, self.stage = hub, stage
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.counters: Counter[str] = Counter()

    def add(self, figures: Callable[[], dict[str, Any]] | None = None, **counts: float) -> None:
        """Count `counts` and send them, with `figures()` added."""
        self.counters.update(counts)
        if self.hub is not None:
            self.hub.report.remote(self.stage, self.actor, {**self.counters, **(figures() if figures else {})})


__all__ = ["Reporter", "RunStats", "STAGE_COUNTERS"]
