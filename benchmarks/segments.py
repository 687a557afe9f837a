"""Long recordings.

long_video_decode_vs_sequential_kf{1s,2.5s,default}: producing every window's frames over one sequential decode of
the whole file, at three keyframe intervals. The recording (`benchmarks.clips.recording`): the real clips back to
back for 30 minutes, 640×360 at 10 fps, H.264 with x264's defaults and a keyframe every 1 s, every 2.5 s, or x264's
own GOP (250 frames = 25 s here, plus scene-cut keyframes). Fixed 20 s windows with 8 frames each (the model's
sampling inside the window: a wanted frame every 2.5 s) through `pipeline.decode.segments.decode_segments`,
resized to 224 as the pipeline does. The floor: PyAV decoding every frame once with its frame threads (both
cores), no conversion. Repetitions interleave the two; median and range of the per-repetition ratios; frames
decoded per frame used beside each.

segment_marginal_cost_20_over_5min: indexing wall time (the whole `run`, start-up included, tiny model, fixed 10 s
windows) of generated recordings of 2.5, 5, 10 and 20 minutes. The marginal cost per minute at 5 minutes is the
slope from 2.5 to 5, at 20 minutes the slope from 10 to 20; the figure is their ratio, from the median wall of
each size (each repetition's own ratio gives the range). The cluster is started before each run (its start-up is
no cost of the job). The fixed cost and the marginal cost per minute of a least-squares line through the four
sizes are in the details.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, from_reps, spread

KEYFRAMES = {"1s": 1.0, "2.5s": 2.5, "default": None}
GOALS = {"1s": "<= 0.5", "2.5s": "<= 0.5", "default": "<= 1.0"}


def _sequential(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def bench_segments(quick: bool = False, reps: int = 3, window_s: float = 20.0, frames: int = 8) -> list[Result]:
    from benchmarks.clips import keyframe_count, recording
    from pipeline.decode.segments import DecodeCounts, decode_segments, plan_segments

    minutes = 3.0 if quick else 30.0
    out = []
    for tag, keyint in KEYFRAMES.items():
        t0 = time.perf_counter()
        path = recording(minutes, keyint)
        made_s = time.perf_counter() - t0
        segments = plan_segments(path, "fixed", length_s=window_s)
        seq, win, counts = [], [], DecodeCounts()
        _sequential(path)  # warm: the file in the page cache
        for r in range(reps):
            order = ("seq", "win") if r % 2 == 0 else ("win", "seq")
            for kind in order:
                t0 = time.perf_counter()
                if kind == "seq":
                    n = _sequential(path)
                    seq.append(time.perf_counter() - t0)
                else:
                    counts = DecodeCounts()
                    produced = sum(1 for _ in decode_segments(path, segments, frames, size=224, counts=counts))
                    win.append(time.perf_counter() - t0)
                    assert produced == len(segments)
        n_frames, n_keys = keyframe_count(path)
        out.append(from_reps(f"long_video_decode_vs_sequential_kf{tag}", [w / s for w, s in zip(win, seq, strict=True)],
                             GOALS[tag], baseline={"what": "PyAV decoding every frame once, frame threads",
                                                   "frames_per_s": round(n / statistics.median(seq), 1)}, detail={
            "minutes": minutes, "fps": 10, "size": "640x360", "frames": n, "keyframes": n_keys,
            "keyframe_interval_s": round(n_frames / 10 / max(n_keys, 1), 2), "encoder": "x264 defaults (medium)",
            "windows": len(segments), "frames_per_window": frames, "windows_s": [round(x, 2) for x in win],
            "sequential_s": [round(x, 2) for x in seq],
            "frames_decoded_per_frame_used": round(counts.frames_decoded / max(counts.frames_used, 1), 2),
            "seeks": counts.seeks, "made_s": round(made_s, 1)}))
    return out


def _index_once(src: Path, out: Path) -> dict[str, Any]:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import init_ray, run_job

    ray.shutdown()
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                          f"output.manifest_dir={out}/runs", "segments.mode=fixed", "segments.length_s=10",
                          "model.max_new_tokens=8", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0"])
    init_ray(None, job)  # the cluster's start-up is the same for every size: not in the job's cost
    t0 = time.perf_counter()
    try:
        manifest = run_job(job, progress=False)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    assert manifest["status"] == "succeeded" and manifest["counts"]["indexed"] == 1, manifest["counts"]
    return {"wall_s": wall, "model_calls": manifest["counts"]["model_calls"]}


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b·x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def bench_segment_linearity(quick: bool = False, reps: int = 3) -> list[Result]:
    from pipeline.demo.clips import SCENE_COLOURS, make_scene_video

    sizes = (0.5, 1.0, 2.0, 4.0) if quick else (2.5, 5.0, 10.0, 20.0)

    def scenes(total_s: float) -> list[tuple[float, str, str]]:
        colours, motions, out, t = list(SCENE_COLOURS), ("left", "right", "up", "down"), [], 0.0
        while t < total_s:
            d = min(25.0 + 10.0 * (len(out) % 4), total_s - t)
            out.append((d, colours[len(out) % len(colours)], motions[len(out) % len(motions)]))
            t += d
        return out

    walls: dict[float, list[float]] = {m: [] for m in sizes}
    calls: dict[float, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for m in sizes:
            make_scene_video(root / f"m{m:g}" / "rec.mp4", scenes(m * 60), fps=4)
        _index_once(root / f"m{sizes[0]:g}", root / "warm")  # imports, the model's first build
        for r in range(reps):
            for m in (sizes if r % 2 == 0 else sizes[::-1]):
                got = _index_once(root / f"m{m:g}", root / f"out-{m:g}-{r}")
                walls[m].append(got["wall_s"])
                calls[m] = got["model_calls"]
    a, b, c, d = sizes
    med = {m: statistics.median(walls[m]) for m in sizes}

    def ratio(w: dict[float, float]) -> float:
        return ((w[d] - w[c]) / (d - c)) / ((w[b] - w[a]) / (b - a))

    fixed, marginal = _line(list(sizes), [med[m] for m in sizes])
    # each repetition's own ratio; the figure is their median (the ratio of the per-size medians is in the details)
    return [from_reps(f"segment_marginal_cost_{d:g}_over_{b:g}min",
                      [ratio({m: walls[m][r] for m in sizes}) for r in range(reps)], "in [0.9, 1.1]",
                      baseline={"what": f"the marginal cost per minute at {b:g} min (slope {a:g}→{b:g} min)",
                                "s_per_minute": round((med[b] - med[a]) / (b - a), 2)},
                      detail={"figure": "per repetition: slope 10→20 min over slope 2.5→5 min",
                              "of_the_per_size_medians": round(ratio(med), 4),
                              "minutes": list(sizes), "wall_s": {f"{m:g}": [round(x, 1) for x in walls[m]]
                                                                 for m in sizes},
                              "model_calls": {f"{m:g}": calls[m] for m in sizes},
                              "fit_fixed_s": round(fixed, 2), "fit_marginal_s_per_minute": round(marginal, 2),
                              "wall_spread": {f"{m:g}": spread(walls[m]) for m in sizes}})]
