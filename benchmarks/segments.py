"""Long recordings: producing every window's frames vs one sequential decode of the whole file.

A 30-minute 640×360 recording made of the real clips in ../shared/videos played one after another, over and
over (re-encoded with H.264 at 10 fps, a keyframe every second, as streaming encodes have); fixed 20 s
windows with 8 frames each (the model's sampling inside the window: sparse), through
`pipeline.decode.segments.decode_segments` (seeks to the keyframe before a wanted frame when that skips
frames), resized to 224 as the pipeline does. The floor is PyAV decoding every frame once, without any
conversion. Both best of 2, interleaved.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_VIDEOS, Result


def _real_recording(path: Path, minutes: float, fps: int, size: tuple[int, int]) -> Path:
    """The shared real clips back to back until `minutes` are filled, resampled to `fps` by time."""
    from fractions import Fraction

    import av

    clips = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not clips:
        raise FileNotFoundError(f"no real clips in {SHARED_VIDEOS}")
    total, written = round(minutes * 60 * fps), 0
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(fps), "keyint_min": str(fps), "sc_threshold": "0"}
        while written < total:
            for clip in clips:
                with av.open(str(clip)) as c:
                    s = c.streams.video[0]
                    next_t = 0.0
                    for frame in c.decode(s):
                        if frame.time is None or frame.time < next_t:
                            continue
                        next_t += 1.0 / fps
                        img = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                        img.pts, img.time_base = written, Fraction(1, fps)
                        for packet in stream.encode(img):
                            out.mux(packet)
                        written += 1
                        if written >= total:
                            break
                if written >= total:
                    break
        for packet in stream.encode():
            out.mux(packet)
    return path


def _sequential(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def bench_segments(minutes: float = 30.0, fps: int = 10, window_s: float = 20.0, frames: int = 8) -> list[Result]:
    from pipeline.decode.segments import DecodeCounts, decode_segments, plan_segments

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = _real_recording(Path(tmp) / "long.mp4", minutes, fps, (640, 360))
        encode_s = time.perf_counter() - t0
        segments = plan_segments(path, "fixed", length_s=window_s)
        seq, win, counts = [], [], DecodeCounts()
        for _ in range(2):
            t0 = time.perf_counter()
            n = _sequential(path)
            seq.append(time.perf_counter() - t0)
            counts = DecodeCounts()
            t0 = time.perf_counter()
            produced = sum(1 for _ in decode_segments(path, segments, frames, size=224, counts=counts))
            win.append(time.perf_counter() - t0)
        size_mb = path.stat().st_size / 1e6
    assert produced == len(segments)
    return [Result("long_video_decode_vs_sequential", min(win) / min(seq), "<= 0.5", detail={
        "minutes": minutes, "fps": fps, "frames": n, "size_mb": round(size_mb, 1), "windows": len(segments),
        "frames_per_window": frames, "windows_s": round(min(win), 2), "sequential_s": round(min(seq), 2),
        "frames_decoded_per_frame_used": round(counts.frames_decoded / counts.frames_used, 2),
        "seeks": counts.seeks, "encode_s": round(encode_s, 1)})]


def _index_once(src: Path, out: Path) -> dict:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    ray.shutdown()
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lance",
                          f"output.manifest_dir={out}/runs", "segments.mode=fixed", "segments.length_s=10",
                          "model.max_new_tokens=8", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0"])
    t0 = time.perf_counter()
    manifest = run_job(job, progress=False)
    wall = time.perf_counter() - t0
    ray.shutdown()
    assert manifest["status"] == "succeeded" and manifest["counts"]["indexed"] == 1, manifest["counts"]
    return {"wall_s": wall, "model_calls": manifest["counts"]["model_calls"]}


def bench_segment_linearity(minutes: float = 10.0) -> list[Result]:
    """Indexing wall time (the whole `run`, start-up included) of a 2×-long generated recording vs the 1× one,
    fixed 10 s windows, tiny model; 1× run twice (the first warms caches), then 2×."""
    from pipeline.demo.clips import SCENE_COLOURS, make_scene_video

    def scenes(total_s: float) -> list[tuple[float, str, str]]:
        colours, motions, out, t = list(SCENE_COLOURS), ("left", "right", "up", "down"), [], 0.0
        while t < total_s:
            d = min(25.0 + 10.0 * (len(out) % 4), total_s - t)
            out.append((d, colours[len(out) % len(colours)], motions[len(out) % len(motions)]))
            t += d
        return out

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, m in (("short", minutes), ("long", 2 * minutes)):
            make_scene_video(root / name / f"{name}.mp4", scenes(m * 60), fps=4)
        _index_once(root / "short", root / "warm")
        one = _index_once(root / "short", root / "one")
        two = _index_once(root / "long", root / "two")
    return [Result("segment_cost_linearity", two["wall_s"] / one["wall_s"], "<= 2.1", detail={
        "minutes": [minutes, 2 * minutes], "wall_s": [round(one["wall_s"], 1), round(two["wall_s"], 1)],
        "model_calls": [one["model_calls"], two["model_calls"]]})]
