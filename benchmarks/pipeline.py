"""Pipeline benchmarks on CPU with the tiny model, on clips whose frames all differ (no cache of the engine or the
index can serve one clip's work for another's).

pipeline_vs_slowest_stage: end-to-end wall time of a job over the wall time of its slowest stage run alone
through the same Ray Data operators (the decode actors; the model actor, which also embeds the text), each on a
fresh Ray cluster started beforehand (the same cold state on both sides: actors, engine and caches start empty;
the cluster's start-up on neither) on the same clips.
Repetitions interleave the three; the figure is the median of the per-repetition ratios.

peak_rss_1000_over_500 (memory): the peak RSS of every process of a run (driver, raylet, the decode actor, its
decode subprocess, the model actor, ...) at 50, 250, 500 and 1,000 videos, each size on a fresh Ray cluster; a
repetition's figure is the largest ratio, over the processes, of the peak at 1,000 over that at 500 — memory must
level off, not grow with the archive (median and range of 3 repetitions; the per-size peaks show the curve). The
whole tree's PSS (shared pages counted once) beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ProcessMemory, Result, from_reps

COMMON = [
    "runtime.decode_concurrency=1", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0", "runtime.batch_size=8",
    "runtime.skip_existing=false", "model.max_new_tokens=16", "runtime.buffer_mb=64",
]
CLIP_SIZE, CLIP_FRAMES = (160, 120), 48


def distinct_clips(folder: Path, n: int, first_seed: int = 0) -> Path:
    """n short generated clips, each from its own seed: distinct bytes AND distinct frames (the engine's
    feature caches and the index's copy detection see n different videos)."""
    from pipeline.demo.clips import make_test_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"clip{first_seed + i:05d}.mp4"
        if not path.exists():
            make_test_video(path, "h264", n_frames=CLIP_FRAMES, size=CLIP_SIZE, seed=first_seed + i)
    return folder


def work_rows(job) -> list[dict]:
    """The job's rows as the listing sends them into the stages (every one needs the model here)."""
    from pipeline.io.listing import iter_work
    from pipeline.runner import model_facts, work_plan

    plan = work_plan(job, job.spec(model_facts(job)))
    return [r for block in iter_work(plan) for r in block.to_pylist() if r["kind"] == "work"]


def make_job(clips: Path, out: Path, extra: list[str] = ()):
    from pipeline.jobs import load_job

    return load_job(None, [f"source.uri={clips}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                           f"output.manifest_dir={out}/runs", *COMMON, *extra])


def _stage_alone(clips: Path, out: Path, stage: str) -> float:
    """Wall seconds of one stage over the job's rows on a fresh cluster; the model stage's input is decoded
    beforehand (not timed)."""
    import ray

    from pipeline.runner import init_ray, model_facts, stage_ops

    ray.shutdown()
    job = make_job(clips, out)
    init_ray(None, job)
    try:
        ops = stage_ops(job, model_facts(job))
        rows = ray.data.from_items(work_rows(job))
        if stage == "model":
            rows = ops["decode"](rows).materialize()
        t0 = time.perf_counter()
        n = ops[stage](rows).materialize().count()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert n == len(list(clips.glob("*.mp4"))), n
    return wall


def _end_to_end(clips: Path, out: Path) -> float:
    """The job's wall time (listing, stages, writer, indexes), the cluster started beforehand as for the stages."""
    import ray

    from pipeline.runner import init_ray, run_job

    ray.shutdown()
    job = make_job(clips, out)
    init_ray(None, job)
    try:
        manifest = run_job(job, progress=False)
    finally:
        ray.shutdown()
    n = len(list(clips.glob("*.mp4")))
    assert manifest["counts"]["indexed"] == n, manifest["counts"]
    return float(manifest["wall_s"])


def bench_pipeline(quick: bool = False, videos: int | None = None, reps: int = 3) -> list[Result]:
    videos = videos or (48 if quick else 192)
    times: dict[str, list[float]] = {"end_to_end": [], "decode": [], "model": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = distinct_clips(tmp / "clips", videos)
        _end_to_end(distinct_clips(tmp / "warm", 4, first_seed=90_000), tmp / "warm-out")  # imports, model build
        for r in range(reps):
            times["decode"].append(_stage_alone(clips, tmp / f"d{r}", "decode"))
            times["model"].append(_stage_alone(clips, tmp / f"m{r}", "model"))
            times["end_to_end"].append(_end_to_end(clips, tmp / f"e{r}"))
    ratios = [e / max(d, m) for e, d, m in zip(times["end_to_end"], times["decode"], times["model"], strict=True)]
    slowest = "model" if statistics.median(times["model"]) >= statistics.median(times["decode"]) else "decode"
    return [from_reps("pipeline_vs_slowest_stage", ratios, "<= 1.15", baseline={
        "what": "the slowest stage alone, same operators, fresh cluster", "stage": slowest,
        "videos_per_s": round(videos / statistics.median(times[slowest]), 2)}, detail={
        "videos": videos, "distinct_frames": True, "reps": reps,
        **{f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()},
        "end_to_end_videos_per_s": round(videos / statistics.median(times["end_to_end"]), 2)})]


def _memory_run(clips: Path, out: Path, n: int) -> dict[str, Any]:
    import ray

    from pipeline.runner import run_job

    ray.shutdown()  # a fresh local cluster per size: the peak belongs to that run alone
    job = make_job(clips, out, [f"source.limit={n}", "questions=[]"])
    try:
        with ProcessMemory() as mem:
            t0 = time.perf_counter()
            manifest = run_job(job, progress=False)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert manifest["counts"]["indexed"] == n, manifest["counts"]
    return {"peak_mib": mem.peak_mib(), "parts_mib": mem.parts_mib(), "tree_pss_mib": round(mem.tree_pss_peak / 2**20),
            "wall_s": round(wall, 1), "timeline": mem.timeline}


def bench_memory(quick: bool = False, sizes: tuple[int, ...] | None = None, reps: int | None = None) -> list[Result]:
    """Each repetition runs every size in turn; its figure is the largest per-process ratio of the last size's peak
    over the one before (the median over the repetitions, range beside; the per-size peaks of the last one)."""
    sizes = sizes or ((40, 120, 240) if quick else (50, 250, 500, 1000))
    reps = reps or (1 if quick else 3)
    big, half = sizes[-1], sizes[-2]
    figures, trees, worst_by_rep = [], [], []
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = distinct_clips(tmp / "clips", max(sizes))
        for r in range(reps):
            for n in sizes:
                runs[n] = _memory_run(clips, tmp / f"out{n}-{r}", n)
            roles = sorted(set(runs[big]["peak_mib"]) & set(runs[half]["peak_mib"]))
            ratio = {x: runs[big]["peak_mib"][x] / max(runs[half]["peak_mib"][x], 1e-9) for x in roles}
            worst = max(ratio, key=ratio.get)
            figures.append(ratio[worst])
            worst_by_rep.append({"process": worst, "ratio_by_process": {x: round(v, 3) for x, v in ratio.items()}})
            trees.append(runs[big]["tree_pss_mib"] / runs[half]["tree_pss_mib"])
    per_size = {n: {"peak_rss_mib": runs[n]["peak_mib"], "tree_pss_mib": runs[n]["tree_pss_mib"],
                    "wall_s": runs[n]["wall_s"]} for n in sizes}
    common = {"sizes": list(sizes), "reps": reps, "buffer_mb": 64,
              "clip": f"{CLIP_SIZE[0]}x{CLIP_SIZE[1]}, {CLIP_FRAMES} frames, distinct"}
    return [
        from_reps(f"peak_rss_{big}_over_{half}", figures, "<= 1.05", detail={
            **common, "figure": "the largest ratio over the run's processes", "worst_by_rep": worst_by_rep,
            "last_rep_per_size": per_size, "parts_at_peak_mib": runs[big]["parts_mib"]},
            baseline={"what": f"the same run at {half} videos"}),
        from_reps(f"tree_pss_{big}_over_{half}", trees, "<= 1.05", detail={
            **common, "tree_pss_mib_last_rep": {n: runs[n]["tree_pss_mib"] for n in sizes}}),
    ]
