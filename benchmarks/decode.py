"""decode_vs_floor: per clip, the floor's time over ours for the same 64 frames; the figure is the median over the
clips (per repetition; median and range over the repetitions).

Clips: the held-out set of `benchmarks.clips` (new encodes of the real clips: 180 and 720 lines, keyframes every
0.5 s, 2 s and x264's default GOP) — not what the decoder was tuned on.

Ours: `decode_video(path, 64)` as the decode stage calls it (the shared killable worker process, decord, resize +
centre crop to 224, frames back over the socket), timed from the caller.
The floor: the best a user gets from the same library for the same frames, with no resize, in the same process
set-up (a worker subprocess with the decode worker's malloc settings, timed from the caller around a request
whose answer is a few bytes: the frames never leave it), per clip the faster of
- `decord_default`: `VideoReader(path)` with decord's default threads, `get_batch(indices)`;
- `decord_split`: the same keyframe-split parallel reading ours uses (`keyframe_runs` with no resize cost, so
  a cut is taken whenever it shortens the longest run; two single-threaded readers side by side).
Repetitions interleave ours and both floors per clip, in a rotating order.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, from_reps, spread

NUM_FRAMES = 64
REPS = 3
FLOORS = ("decord_default", "decord_split")


def floor_main() -> None:
    """The floor's worker: one JSON request per line on stdin (path, method) → one line back (frames, checksum)."""
    import threading

    import decord
    import numpy as np

    from pipeline.decode.decord_runs import as_numpy, keyframe_runs
    from stllm.frame_sampling import frame_indices

    for line in sys.stdin:
        req = json.loads(line)
        path, method = req["path"], req["method"]
        if method == "decord_default":
            vr = decord.VideoReader(path)
            idx = frame_indices(len(vr), req["num_frames"])
            frames = [as_numpy(vr.get_batch(sorted(set(idx))))]
        else:
            vr = decord.VideoReader(path, num_threads=1)
            idx = sorted(set(frame_indices(len(vr), req["num_frames"])))
            runs = keyframe_runs(idx, list(vr.get_key_indices()), 2, resize_cost=0.0)
            parts: list[Any] = [None] * len(runs)

            def read(k: int, run: list[int], reader: Any, into: list[Any] = parts) -> None:
                into[k] = as_numpy(reader.get_batch(run))

            threads = [threading.Thread(target=read, args=(k, run, decord.VideoReader(path, num_threads=1)))
                       for k, run in enumerate(runs[1:], 1)]
            for t in threads:
                t.start()
            read(0, runs[0], vr)
            for t in threads:
                t.join()
            frames = parts
        total = sum(int(f.shape[0]) for f in frames)
        print(json.dumps({"frames": total, "runs": len(frames), "sum": int(np.asarray(frames[0][0, 0, 0]).sum())}),
              flush=True)


class _Floor:
    def __init__(self) -> None:
        from pipeline.decode.worker import _PACKAGE_ROOT, _WORKER_MALLOC

        env = {**_WORKER_MALLOC, **os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-c", "from benchmarks.decode import floor_main; floor_main()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, path: Path, method: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "method": method, "num_frames": NUM_FRAMES}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def bench_decode(quick: bool = False, reps: int = REPS) -> list[Result]:
    from benchmarks.clips import decode_clips, keyframe_count
    from pipeline.decode import decode_video

    clips = decode_clips(quick)
    floor = _Floor()
    kinds = ("ours", *FLOORS)
    times: dict[tuple[str, str], list[float]] = {(c.name, k): [] for c in clips for k in kinds}
    runs: dict[str, int] = {}
    try:
        for c in clips:  # warm: the worker processes started, each file read once (the page cache holds it)
            decode_video(c.path, NUM_FRAMES)
            floor(c.path, "decord_default")
        for r in range(reps):
            for i, c in enumerate(clips):
                shift = (r + i) % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    t0 = time.perf_counter()
                    if kind == "ours":
                        decode_video(c.path, NUM_FRAMES)
                    else:
                        out = floor(c.path, kind)
                        if kind == "decord_split":
                            runs[c.name] = out["runs"]
                    times[c.name, kind].append(time.perf_counter() - t0)
    finally:
        floor.close()

    def floor_s(name: str, r: int) -> float:
        return min(times[name, k][r] for k in FLOORS)

    # per repetition: the median over the clips of floor / ours
    per_rep = [statistics.median(floor_s(c.name, r) / times[c.name, "ours"][r] for c in clips) for r in range(reps)]
    per_clip = {c.name: spread([floor_s(c.name, r) / times[c.name, "ours"][r] for r in range(reps)]) for c in clips}
    winner = {c.name: min(FLOORS, key=lambda k, c=c: statistics.median(times[c.name, k])) for c in clips}
    med = {k: {c.name: statistics.median(times[c.name, k]) for c in clips} for k in kinds}
    floor_total = sum(statistics.median(floor_s(c.name, r) for r in range(reps)) for c in clips)
    frames = NUM_FRAMES * len(clips)

    def group(key: str) -> dict[str, dict[str, float]]:  # the per-clip ratios by size / GOP
        values: dict[str, list[float]] = {}
        for c in clips:
            values.setdefault(str(getattr(c, key)), []).append(per_clip[c.name]["median"])
        return {k: spread(v) for k, v in values.items()}

    return [from_reps("decode_vs_floor", per_rep, ">= 0.9", baseline={
        "what": "per clip the faster of decord's default and the same keyframe-split reading, no resize, "
                "same worker set-up", "frames_per_s": round(frames / floor_total, 1)}, detail={
        "figure": "median over clips of floor time / our time", "clips": len(clips), "frames_per_clip": NUM_FRAMES,
        "reps": reps, "per_clip_ratio": per_clip, "by_height": group("height"), "by_gop": group("gop"),
        "ratio_of_totals": round(floor_total / sum(med["ours"].values()), 3),
        "ours_frames_per_s": round(frames / sum(med["ours"].values()), 1),
        "floor_winner": winner, "split_runs": runs,
        "median_s": {k: {n: round(v, 4) for n, v in d.items()} for k, d in med.items()},
        "frames_keyframes": {c.name: keyframe_count(c.path) for c in clips}})]
