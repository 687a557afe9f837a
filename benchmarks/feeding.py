"""Is the vLLM engine kept busy? Short videos through the model stage with the tiny model on vLLM (CPU), from
the engine's own stats (vLLM's metrics, `stllm.vllm.metrics`) and the stage's batch completion times:

- `engine_busy_fraction`: the share of the model stage's active time during which the engine had sequences,
  the stage's input decoded beforehand (2×`videos` rows ready: what the stage itself does to its engine);
- `sequences_in_flight_mean_over_max`: sequences in flight per engine step / `max_num_seqs`, same run;
- `model_stage_vs_engine_alone`: the model stage's videos/s (the pipeline's own operator, same run) over the
  engine's videos/s on the same videos handed to it directly in one call — both warm: the stage's rate is
  taken over the second half (from its batches' completion times), the engine alone is timed on the second
  half after a call on the first, right before and right after the stage's run, each once the machine is quiet
  (the mean of the two: this VM's speed drifts over minutes). On CPU a fresh engine runs its first ~100 videos
  ~40% slower (oneDNN kernels built per new shape; on a GPU that is done at start-up), which says nothing about
  feeding.

The details hold the same figures inside the whole pipeline (`videos` videos, listing → decode → model →
sinks), with several batches in flight (8) and one at a time (a barrier after every batch, how it ran
before), and the pipeline's videos/s from the first submit to the last batch done. On 2 cores decoding shares
the cores with everything else and the pipeline is decode-bound: there the engine waits for input, which the
in-pipeline busy fraction shows and the stage's own figures do not. The cold figures and the CPU each process
took per video (the engine alone and the stage) are there too.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result
from benchmarks.pipeline import _make_clips

QUESTIONS = '["What is the main object in the video?", "Which direction does it move?"]'


def _pipeline_stats(clips: Path, out: Path, in_flight: int, batch_size: int, max_seqs: int) -> dict:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    stats_dir = out / "stats"
    stats_dir.mkdir(parents=True)
    os.environ["STLLM_ENGINE_STATS_DIR"] = str(stats_dir)
    ray.shutdown()
    job = load_job(None, [f"source.uri={clips}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                          f"output.manifest_dir={out}/runs", "model.engine=vllm", f"questions={QUESTIONS}",
                          "model.max_new_tokens=16", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0",
                          f"runtime.batch_size={batch_size}", f"runtime.model_batches_in_flight={in_flight}",
                          f"model.engine_kwargs={{max_batch_size: {max_seqs}}}"])
    manifest = run_job(job, progress=False)
    ray.shutdown()
    os.environ.pop("STLLM_ENGINE_STATS_DIR")
    [path] = glob.glob(str(stats_dir / "engine-*.json"))
    stats = json.loads(Path(path).read_text())
    stats["indexed"] = manifest["counts"]["indexed"]
    return stats


def _stage_on_decoded(clips: Path, out: Path, in_flight: int, batch_size: int, max_seqs: int) -> dict:
    """The model stage (the pipeline's own operator) over rows decoded beforehand: its speed when its input is
    ready — on 2 cores the decode actor shares a core with everything else and starves it otherwise."""
    import ray

    from benchmarks.pipeline import _work_rows
    from pipeline.jobs import load_job
    from pipeline.runner import init_ray, model_facts, stage_ops

    stats_dir = out / "stats"
    stats_dir.mkdir(parents=True)
    os.environ["STLLM_ENGINE_STATS_DIR"] = str(stats_dir)
    ray.shutdown()
    job = load_job(None, [f"source.uri={clips}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                          "model.engine=vllm", f"questions={QUESTIONS}", "model.max_new_tokens=16",
                          "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0", f"runtime.batch_size={batch_size}",
                          f"runtime.model_batches_in_flight={in_flight}",
                          f"model.engine_kwargs={{max_batch_size: {max_seqs}}}"])
    init_ray(None, job)
    ops = stage_ops(job, model_facts(job))
    decoded = ops["decode"](ray.data.from_items(_work_rows(job))).materialize()
    rows = ops["model"](decoded).materialize().count()
    ray.shutdown()
    os.environ.pop("STLLM_ENGINE_STATS_DIR")
    [path] = glob.glob(str(stats_dir / "engine-*.json"))
    return {**json.loads(Path(path).read_text()), "rows": rows}


def _half_point(completed: list[list[float]]) -> tuple[float, int, int]:
    """(seconds, videos done, videos in all) at the batch that completes the first half of a run, from
    [seconds since the first submit, videos] per completed batch."""
    if len(completed) < 2:
        raise RuntimeError(f"too few completed batches for a rate: {completed}")
    done, total = 0, sum(n for _, n in completed)
    for t, n in sorted(completed):
        done += n
        if done >= total / 2:
            return t, done, total
    raise AssertionError("unreachable: the last batch completes the run")


def _half_rates(completed: list[list[float]]) -> tuple[float, float]:
    """videos/s over the first and the second half of a run."""
    half_t, half, total = _half_point(completed)
    end = max(t for t, _ in completed)
    return half / half_t, (total - half) / max(end - half_t, 1e-9)


def _warm_half_cpu(marks: list[list[float]], completed: list[list[float]]) -> dict[str, float]:
    """CPU seconds per video over the stage's second half, split: the actor (vLLM's front end, our batches,
    the embedder), its engine processes (vLLM's engine core and worker), and everything else (Ray, the driver).
    `marks`: [s, actor, engine, machine] per finished batch, from the actor."""
    half_t, half, total = _half_point(completed)
    first = min(marks, key=lambda m: abs(m[0] - half_t))
    last = marks[-1]
    own, engine, machine = (last[i] - first[i] for i in (1, 2, 3))
    return _per_video({"own": own, "children": engine, "others": machine - own - engine}, total - half)


def _per_video(split: dict[str, float], videos: int) -> dict[str, float]:
    names = {"own": "front_ms", "children": "engine_procs_ms", "others": "others_ms"}
    return {names[k]: round(1000 * v / max(videos, 1), 2) for k, v in split.items()}


def _wait_until_quiet(cores: float = 0.15, timeout_s: float = 30.0) -> float:
    """Wait until the machine's busy cores over one second fall below `cores` (or `timeout_s` passes); returns
    the last second's busy cores."""
    from pipeline.proc_stats import machine_busy_s

    end = time.monotonic() + timeout_s
    busy = float("nan")
    while time.monotonic() < end:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(1.0)
        busy = (machine_busy_s() - b0) / (time.monotonic() - t0)
        if busy < cores:
            break
    return round(busy, 3)


class _EngineAlone:
    """The vLLM engine given the videos' requests directly, in one call (decoded beforehand): the baseline. It
    starts on the first half of the videos (cold: oneDNN kernels are built per new shape on CPU); `warm()`
    times a call on the second half. Called right before and right after the stage's run: this VM's speed
    drifts by tens of percent over minutes, and the stage is compared with the mean of the two."""

    def __init__(self, clips: Path, n: int, max_seqs: int):
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
        self.quiet: list[float] = []  # busy cores in the second before each warm call
        try:
            prompts = ["Describe the video in detail.", *json.loads(QUESTIONS)]
            reqs = [VideoRequest(p.name, decode_video(p, 8).frames, prompts, sampled=True)
                    for p in sorted(clips.glob("*.mp4"))[:n]]
            self.options = GenerationOptions(max_new_tokens=16)
            self.first, self.second = reqs[: n // 2], reqs[n // 2:]
            self.cold = self._timed(self.first)[0]
        except BaseException:
            self.engine.close()
            raise

    def warm(self) -> tuple[float, dict[str, float]]:
        """(videos/s, CPU ms per video by process) of a call on the second half, once the machine is quiet (Ray
        and the stage's engine take ~1.3 cores for ~2 s after a run while they exit)."""
        self.quiet.append(_wait_until_quiet())
        return self._timed(self.second)

    def _timed(self, reqs: list) -> tuple[float, dict[str, float]]:
        from pipeline.proc_stats import cpu_snapshot, cpu_split

        # each call computes its videos' features and sends their frames, as the stage does once per video
        self.engine.reset_caches()
        before = cpu_snapshot()
        t0 = time.perf_counter()
        results = self.engine.generate(reqs, self.options)
        rate = len(reqs) / (time.perf_counter() - t0)
        assert all(r.ok for r in results)
        return rate, _per_video(cpu_split(before, cpu_snapshot()), len(reqs))

    def close(self) -> None:
        self.engine.close()


def bench_feeding(videos: int = 96, batch_size: int = 4, max_seqs: int = 32) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        twice = _make_clips(tmp / "twice", 2 * videos)
        clips = tmp / "clips"  # the pipeline runs' videos: the first `videos` of them
        clips.mkdir()
        for p in sorted(twice.glob("*.mp4"))[:videos]:
            os.link(p, clips / p.name)
        before = _pipeline_stats(clips, tmp / "one", 1, batch_size, max_seqs)
        after = _pipeline_stats(clips, tmp / "many", 8, batch_size, max_seqs)
        # The baseline engine starts right before its first timed call: left idle for minutes (through the
        # pipeline runs) it ran 10-30% slower than a fresh one (likely this VM reclaiming idle memory: kdamond runs).
        engine = _EngineAlone(twice, 2 * videos, max_seqs)
        try:
            alone_before, alone_cpu = engine.warm()
            ready = _stage_on_decoded(twice, tmp / "ready", 8, batch_size, max_seqs)
            alone_after, _ = engine.warm()
        finally:
            engine.close()
    alone = 2 / (1 / alone_before + 1 / alone_after)  # the same videos twice: the mean of their times
    assert before["indexed"] == after["indexed"] == videos and ready["rows"] == 2 * videos, (before, after, ready)
    cold_stage, stage = _half_rates(ready["completed"])

    def wall_rate(stats: dict) -> float:  # videos / (first submit → last batch done), idle gaps included
        return round(videos / max(t for t, _ in stats["completed"]), 2)

    pipeline = {"videos": videos, "batch_size": batch_size, "max_num_seqs": max_seqs,
                "in_pipeline_busy": after["busy_fraction"],
                "in_pipeline_inflight": after["requests_running_mean_over_max"],
                "in_pipeline_busy_one_batch_at_a_time": before["busy_fraction"],
                "in_pipeline_inflight_one_batch_at_a_time": before["requests_running_mean_over_max"],
                "pipeline_videos_per_s": wall_rate(after),
                "pipeline_videos_per_s_one_batch_at_a_time": wall_rate(before)}
    return [
        Result("engine_busy_fraction", ready["busy_fraction"], ">= 0.95", detail=pipeline),
        Result("sequences_in_flight_mean_over_max", ready["requests_running_mean_over_max"], ">= 0.8",
               detail={"inflight_mean": ready["requests_running_mean"], "inflight_max": ready["requests_running_max"],
                       "stage_peak_batches_on_engine": ready.get("stage_peak_batches_on_engine")}),
        Result("model_stage_vs_engine_alone", stage / alone, ">= 0.9", detail={
            "stage_videos_per_s": round(stage, 2), "engine_alone_videos_per_s": round(alone, 2),
            "engine_alone_before_and_after": [round(alone_before, 2), round(alone_after, 2)],
            "busy_cores_before_each_engine_alone_call": engine.quiet,
            "cold_stage_videos_per_s": round(cold_stage, 2), "cold_engine_alone_videos_per_s": round(engine.cold, 2),
            "stage_actor_cpu_s": ready.get("actor_cpu_s"), "text_embedder": ready.get("text_embedder"),
            # CPU ms per video, warm: who took the cores (2 here) — the engine alone vs the stage's second half
            "cpu_ms_per_video_engine_alone": alone_cpu,
            "cpu_ms_per_video_stage": _warm_half_cpu(ready["cpu_marks"], ready["completed"]),
            "in_pipeline_ratio": round(wall_rate(after) / alone, 3)}),
    ]
