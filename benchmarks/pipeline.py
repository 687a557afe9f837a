"""Pipeline benchmarks on CPU with the tiny model.

pipeline_vs_slowest_stage: end-to-end wall time of a job over the wall time of its slowest stage run
alone through the same Ray Data operators (decode actors; the model actor, which also embeds the text).
≤ 1.15 means the stages overlap instead of running one after the other.

rss_growth_50_to_500: peak memory of the whole job (driver + every Ray process, summed as PSS so pages shared
through Ray's object store count once) for 500 short videos over that for 50, minus 1. Memory must not grow
with the archive's size.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Result, tree_rss_bytes

COMMON = [
    "runtime.decode_concurrency=1", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0", "runtime.batch_size=8",
    "runtime.skip_existing=false", "model.max_new_tokens=16", "runtime.buffer_mb=64",
]


def _make_clips(folder: Path, n: int, distinct: int = 8) -> Path:
    """n short clips: `distinct` generated ones, then variants of them, each made unique by a trailing MP4
    `free` box — the same decoding work, but distinct bytes, so the index runs the model for every one (exact
    copies would reuse one result)."""
    import struct

    from pipeline.demo.clips import make_test_video

    folder.mkdir(parents=True, exist_ok=True)
    seeds = [make_test_video(folder / f"seed{i}.mp4", "h264", n_frames=48, size=(160, 120), seed=i)
             for i in range(distinct)]
    for i in range(n - distinct):
        box = struct.pack(">I", 16) + b"free" + struct.pack(">Q", i)
        (folder / f"copy{i:04d}.mp4").write_bytes(seeds[i % distinct].read_bytes() + box)
    return folder


def _work_rows(job) -> list[dict]:
    """The job's rows as the listing sends them into the stages (every one needs the model here)."""
    from pipeline.io.listing import iter_work
    from pipeline.runner import model_facts, work_plan

    plan = work_plan(job, job.config_hash(model_facts(job)["checkpoint_id"]))
    rows = [r for block in iter_work(plan) for r in block.to_dict("records") if r["kind"] == "work"]
    return rows


def _job(clips: Path, out: Path, extra: list[str] = ()):
    from pipeline.jobs import load_job

    return load_job(None, [f"source.uri={clips}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                           f"output.manifest_dir={out}/runs", *COMMON, *extra])


def bench_pipeline(videos: int = 192, rounds: int = 2) -> list[Result]:
    """Rounds interleave the end-to-end run and the stages alone (this VM's speed drifts); best of each."""
    import ray

    from pipeline.runner import init_ray, model_facts, run_job, stage_ops

    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = _job(_make_clips(tmp / "clips", videos), tmp / "out")
        init_ray(None, job)
        facts = model_facts(job)
        rows = _work_rows(job)
        ops = stage_ops(job, facts)
        run_job(_job(tmp / "clips", tmp / "warm", ["source.limit=2"]), progress=False)  # warm caches/imports
        for r in range(rounds):
            t0 = time.perf_counter()
            decoded = ops["decode"](ray.data.from_items(rows)).materialize()
            keep("decode", time.perf_counter() - t0)
            t0 = time.perf_counter()
            ops["model"](decoded).materialize()
            keep("model", time.perf_counter() - t0)
            del decoded
            manifest = run_job(_job(tmp / "clips", tmp / f"out{r}"), progress=False)
            assert manifest["counts"]["indexed"] == videos, manifest["counts"]
            keep("end_to_end", manifest["wall_s"])
        ray.shutdown()
    stages = {k: v for k, v in best.items() if k != "end_to_end"}
    slowest = max(stages, key=stages.get)
    return [Result("pipeline_vs_slowest_stage", best["end_to_end"] / stages[slowest], "<= 1.15", detail={
        "videos": videos, "rounds": rounds, "end_to_end_s": round(best["end_to_end"], 2), "slowest_stage": slowest,
        **{f"{k}_alone_s": round(v, 2) for k, v in stages.items()}})]


def _peak_rss(fn) -> tuple[float, object]:
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_bytes())
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return peak[0], out


def bench_memory(small: int = 50, large: int = 500) -> list[Result]:
    import ray

    from pipeline.runner import run_job

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = _make_clips(tmp / "clips", large)
        for n in (small, large):
            ray.shutdown()  # a fresh local cluster per size: the peak belongs to that run alone
            job = _job(clips, tmp / f"out{n}", [f"source.limit={n}", "questions=[]"])
            peaks[n], manifest = _peak_rss(lambda job=job: run_job(job, progress=False))
            assert manifest["counts"]["indexed"] == n, manifest["counts"]
        ray.shutdown()
    growth = peaks[large] / peaks[small] - 1
    return [Result(f"rss_growth_{small}_to_{large}", growth, "<= 0.10", detail={
        f"peak_rss_{small}_mib": round(peaks[small] / 2**20), f"peak_rss_{large}_mib": round(peaks[large] / 2**20)})]
