"""decode_vs_floor: our sampling stage's frames/s over decord `get_batch` on the same indices.

Real clips from ../shared/videos when present (else generated ones). Ours = `decode_video` as the pipeline
runs it (killable worker process, decord, resize + crop to 224); the floor = decord alone on the same bytes
and indices, no resize. Best of N per clip; the ratio is over the summed times.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_VIDEOS, Result

NUM_FRAMES = 64
REPEATS = 3


def _clips() -> list[tuple[str, bytes]]:
    if SHARED_VIDEOS.is_dir() and list(SHARED_VIDEOS.glob("*.mp4")):
        return [(p.name, p.read_bytes()) for p in sorted(SHARED_VIDEOS.glob("*.mp4"))]
    from pipeline.fixtures import make_test_video

    with tempfile.TemporaryDirectory() as tmp:
        paths = [make_test_video(Path(tmp) / f"gen{i}.mp4", "h264", n_frames=300, size=(320, 240), fps=25, seed=i)
                 for i in range(3)]
        return [(p.name, p.read_bytes()) for p in paths]


def _best(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_decode() -> list[Result]:
    import decord

    from pipeline.decode import decode_video, decode_video_inline
    from stllm.sampling import segment_midpoints

    decode_video(_clips()[0][1], NUM_FRAMES)  # start the worker once, as a running pipeline has it
    floor_s = ours_s = sampling_only_s = 0.0
    per_clip = {}
    for name, data in _clips():
        n = len(decord.VideoReader(io.BytesIO(data)))
        idx = segment_midpoints(n, NUM_FRAMES)

        def floor(data=data, idx=idx) -> None:
            decord.VideoReader(io.BytesIO(data)).get_batch(idx).asnumpy()

        f = _best(floor)
        o = _best(lambda data=data: decode_video(data, NUM_FRAMES))
        s = _best(lambda data=data: decode_video_inline(data, NUM_FRAMES, size=None))
        floor_s, ours_s, sampling_only_s = floor_s + f, ours_s + o, sampling_only_s + s
        per_clip[name] = round(f / o, 3)
    return [Result("decode_vs_floor", floor_s / ours_s, ">= 0.9", detail={
        "frames_per_clip": NUM_FRAMES, "clips": len(per_clip),
        "floor_fps": round(NUM_FRAMES * len(per_clip) / floor_s, 1),
        "ours_fps": round(NUM_FRAMES * len(per_clip) / ours_s, 1),
        "sampling_only_inline_ratio": round(floor_s / sampling_only_s, 3), "per_clip": per_clip})]
