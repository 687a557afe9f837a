"""Is the vLLM engine kept busy? The model stage (the pipeline's own operator) with the tiny model on vLLM (CPU), on
clips whose frames all differ (no feature cache can serve one for another), its input decoded beforehand (what
the stage itself does to its engine), 3 repetitions, each on a fresh Ray cluster with a fresh engine:

- `engine_busy_fraction`: the time vLLM held unfinished requests over the stage's whole wall time on the engine,
  first submit to last result — idle gaps (starvation) count against it;
- `sequences_running_mean_over_max`: vLLM's own scheduler statistics (`num_running_reqs`), time-weighted over the
  busy time, over `max_num_seqs` — what vLLM runs, not what our queue holds. From the engine's stat loggers
  (`engine.stats()` key `requests_running_mean_over_max`); an engine without them yields no figure;
- `model_stage_vs_engine_alone`: the stage's videos/s over its second half (its rows as its batches report them to
  the run's RunStats, sampled every 0.1 s; a fresh engine on CPU runs its first
  ~100 videos ~40% slower while oneDNN builds kernels per shape) over one engine's videos/s on the same videos
  handed to it directly in one call, its caches emptied first (the stage's engine is fresh: nothing cached either
  side), warm (started once, on other videos). The engine alone is timed right before and right after each
  stage run; a repetition's ratio is the stage over the mean of those two.

The details hold the engine's figures inside the whole pipeline (listing → decode → model → sinks, one run): on
2 cores decoding shares the cores, so there the engine waits for input, which the stage's own figures do not show.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, busy_cores, from_reps
from benchmarks.pipeline import distinct_clips

QUESTIONS = '["What is the main object in the video?", "Which direction does it move?"]'


def _job_overrides(clips: Path, out: Path, batch_size: int, max_seqs: int) -> list[str]:
    return [f"source.uri={clips}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
            f"output.manifest_dir={out}/runs", "model.engine=vllm", f"questions={QUESTIONS}",
            "model.max_new_tokens=16", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0",
            f"runtime.batch_size={batch_size}", f"model.engine_kwargs={{max_batch_size: {max_seqs}}}"]


def _engine_stats(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The one model actor's engine statistics from a run's `RunStats` snapshot (vLLM's own metrics)."""
    [engine] = snapshot["engines"]
    return engine


def _pipeline_stats(clips: Path, out: Path, batch_size: int, max_seqs: int) -> dict[str, Any]:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    ray.shutdown()
    try:
        manifest = run_job(load_job(None, _job_overrides(clips, out, batch_size, max_seqs)), progress=False)
    finally:
        ray.shutdown()
    return {**_engine_stats(manifest), "indexed": manifest["counts"]["indexed"]}


def _stage_on_decoded(clips: Path, out: Path, batch_size: int, max_seqs: int) -> dict[str, Any]:
    import ray

    from benchmarks.pipeline import work_rows
    from pipeline.jobs import load_job
    from pipeline.run_stats import RunStats
    from pipeline.runner import init_ray, model_facts, stage_ops

    ray.shutdown()
    try:
        job = load_job(None, _job_overrides(clips, out, batch_size, max_seqs))
        init_ray(None, job)
        hub = ray.remote(RunStats).options(num_cpus=0).remote()  # the stages report their engine's figures here
        ops = stage_ops(job, model_facts(job), hub)
        decoded = ops["decode"](ray.data.from_items(work_rows(job))).materialize()
        with _RowsOverTime(hub, "model") as progress:
            rows = ops["model"](decoded).materialize().count()
        snapshot = ray.get(hub.snapshot.remote())
    finally:
        ray.shutdown()
    return {**_engine_stats(snapshot), "rows": rows, "completed": progress.completed}


class _RowsOverTime:
    """A stage's rows done over time, from the run's RunStats (each batch reports when it is done), sampled every
    `every_s`: [[seconds since start, rows done since the last sample], ...] — the stage's completion times."""

    def __init__(self, hub: Any, stage: str, every_s: float = 0.1):
        self.hub, self.stage, self.every_s = hub, stage, every_s
        self.completed: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rows(self) -> int:
        import ray

        return int(ray.get(self.hub.snapshot.remote())["stages"].get(self.stage, {}).get("rows", 0))

    def _poll(self) -> None:
        t0, seen = time.monotonic(), 0
        while True:
            stopping = self._stop.wait(self.every_s)
            now = self._rows()
            if now > seen:
                self.completed.append([time.monotonic() - t0, now - seen])
                seen = now
            if stopping:
                return

    def __enter__(self) -> _RowsOverTime:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _second_half_rate(completed: list[list[float]]) -> float:
    """videos/s over the second half of a run, from [seconds since the first submit, videos] per batch."""
    done, total = 0, sum(n for _, n in completed)
    for t, n in sorted(completed):
        done += n
        if done >= total / 2:
            end = max(t for t, _ in completed)
            return (total - done) / max(end - t, 1e-9)
    raise RuntimeError(f"too few completed batches for a rate: {completed}")


class _EngineAlone:
    """The vLLM engine given the stage's second-half videos directly, in one call, decoded beforehand."""

    def __init__(self, clips: list[Path], warmup: list[Path], max_seqs: int):
        from pipeline.decode import decode_video
        from pipeline.paths import ensure_tiny_model
        from stllm.engine import GenerationOptions, VideoRequest
        from stllm.vllm.engine import VLLMEngine

        env = dict(os.environ)
        self.engine = VLLMEngine.from_pretrained(str(ensure_tiny_model()), dtype="float32", device="cpu",
                                                 max_batch_size=max_seqs)
        # vLLM's CPU platform sets this process's environment for its workers (LD_PRELOAD, OpenMP settings): the
        # stage's Ray workers must not inherit it (in a pipeline the engine starts in the actor, not the driver)
        os.environ.clear()
        os.environ.update(env)
        self.busy_before: list[float] = []
        try:
            prompts = ["Describe the video in detail.", *json.loads(QUESTIONS)]
            self.options = GenerationOptions(max_new_tokens=16)
            self.reqs = [VideoRequest(p.name, decode_video(p, 8).frames, prompts, sampled=True) for p in clips]
            self.engine.generate([VideoRequest(p.name, decode_video(p, 8).frames, prompts, sampled=True)
                                  for p in warmup], self.options)  # oneDNN's kernels, on other videos
        except BaseException:
            self.engine.close()
            raise

    def rate(self) -> float:
        self.engine.reset_caches()  # the ViT feature cache and vLLM's multimodal cache
        self.busy_before.append(round(busy_cores(0.5), 2))
        t0 = time.perf_counter()
        results = self.engine.generate(self.reqs, self.options)
        rate = len(self.reqs) / (time.perf_counter() - t0)
        assert all(r.ok for r in results)
        return rate

    def close(self) -> None:
        self.engine.close()


def bench_feeding(quick: bool = False, videos: int | None = None, batch_size: int = 4, max_seqs: int = 32,
                  reps: int = 3) -> list[Result]:
    videos = videos or (24 if quick else 96)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = distinct_clips(tmp / "clips", 2 * videos)  # the stage's videos
        warmup = sorted(distinct_clips(tmp / "warmup", videos, first_seed=50_000).glob("*.mp4"))
        half = sorted(clips.glob("*.mp4"))[videos:]  # the second half: the stage's rate is taken over it
        in_pipeline = _pipeline_stats(distinct_clips(tmp / "pipeline", videos, first_seed=70_000), tmp / "p",
                                      batch_size, max_seqs)
        engine = _EngineAlone(half, warmup, max_seqs)
        stage: list[dict[str, Any]] = []
        try:
            alone = [engine.rate()]
            for r in range(reps):
                stage.append(_stage_on_decoded(clips, tmp / f"s{r}", batch_size, max_seqs))
                alone.append(engine.rate())
        finally:
            engine.close()
    assert all(s["rows"] == 2 * videos for s in stage) and in_pipeline["indexed"] == videos, (stage, in_pipeline)
    busy = [s["busy_fraction"] for s in stage]  # vLLM busy over first submit → last result, idle gaps included
    rates = [_second_half_rate(s["completed"]) for s in stage]
    ratios = [rates[r] / ((alone[r] + alone[r + 1]) / 2) for r in range(reps)]
    common = {"videos": 2 * videos, "distinct_frames": True, "batch_size": batch_size, "max_num_seqs": max_seqs,
              "batches_in_flight": "the job's default", "reps": reps}
    in_pipe = {"in_pipeline_busy_fraction": in_pipeline["busy_fraction"],
               "in_pipeline_sequences_running_mean_over_max": in_pipeline.get("requests_running_mean_over_max"),
               "in_pipeline_videos": videos}
    out = [
        from_reps("engine_busy_fraction", busy, ">= 0.9", detail={
            **common, "definition": "busy_s / (first submit → last result)",
            "busy_s": [s["busy_s"] for s in stage], "wall_s": [s["wall_s"] for s in stage],
            **in_pipe}),
        from_reps("model_stage_vs_engine_alone", ratios, ">= 0.9", baseline={
            "what": "the engine alone, same videos in one call, caches emptied",
            "videos_per_s": round(statistics.median(alone), 2)}, detail={
            **common, "stage_videos_per_s": [round(x, 2) for x in rates],
            "engine_alone_videos_per_s": [round(x, 2) for x in alone],
            "busy_cores_before_each_engine_alone_call": engine.busy_before}),
    ]
    running = [s.get("requests_running_mean_over_max") for s in stage]
    if all(x is not None for x in running):
        out.append(from_reps("sequences_running_mean_over_max", running, "info", detail={
            **common, "source": "vLLM's SchedulerStats.num_running_reqs, time-weighted over busy time",
            "requests_running_mean": [s.get("requests_running_mean") for s in stage],
            "requests_waiting_mean": [s.get("requests_waiting_mean") for s in stage]}))
    else:
        print("sequences_running_mean_over_max: this engine reports no vLLM scheduler statistics "
              "(requests_running_mean_over_max); no figure")
    return out
