"""Reading decord's frames: DLPack views (no copy), small calls (the last frames one per call, so that about one
resize is left when decoding ends), and `keyframe_runs`: the wanted frames cut at keyframes into runs that
readers on their own threads decode and resize side by side (`read_runs`) — nothing is decoded twice."""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.decode.frames import DecodeError, FrameCollector, Source, open_source, short_message

_CHUNK = 4  # frames per decord get_batch call: small enough to overlap decoding with resizing
_TAIL = 4  # the last frames come one per call: what is left to resize when decoding ends is about one frame
_RESIZE_COST = 4.0  # one resize to 224 ≈ decoding 4 frames of the same video (measured: 320×240, 640×360)
_SPLIT_GAIN = 0.9  # a cut is taken when the longest run costs less than this share of one reader's work


class _DLPackView:
    """Hands decord's DLPack capsule to numpy.from_dlpack: the frames are not copied."""

    def __init__(self, nd: Any):
        self.nd = nd

    def __dlpack__(self, **_: Any) -> Any:
        return self.nd.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def as_numpy(nd: Any) -> np.ndarray:
    try:
        return np.from_dlpack(_DLPackView(nd))
    except Exception:  # noqa: BLE001 — older numpy/decord: one copy instead
        return nd.asnumpy()


def chunks(indices: list[int]) -> list[list[int]]:
    """`_CHUNK` frames per decord call, then the last `_TAIL` one by one (decord's per-call cost is ~nil,
    measured: 64 single-frame calls ≈ 8 calls of 8)."""
    body = max(0, len(indices) - _TAIL)
    return ([indices[i:min(i + _CHUNK, body)] for i in range(0, body, _CHUNK)]
            + [[i] for i in indices[body:]])


def keyframe_runs(wanted: list[int], keyframes: list[int], parts: int,
                  resize_cost: float = _RESIZE_COST) -> list[list[int]]:
    """Cut the sorted `wanted` frames into at most `parts` runs of about equal cost, only where a keyframe lies
    between two wanted frames (a run's reader seeks there: nothing is decoded twice). Cost of a wanted frame =
    the frames decoded to reach it (from the previous wanted frame or its keyframe) + its resize. One run when
    no cut beats decoding on one thread beside the resizes (the wall time is then max(decoding, resizing))."""
    if parts < 2 or len(wanted) < 2 or not keyframes:
        return [wanted]
    cost, cuts, decoded = [], [], 0.0
    for j, w in enumerate(wanted):
        kf = keyframes[max(0, bisect.bisect_right(keyframes, w) - 1)]
        fresh = j > 0 and kf > wanted[j - 1]  # a keyframe after the previous wanted frame: a run may start here
        step = (w - kf + 1) if (j == 0 or fresh) else (w - wanted[j - 1])
        if fresh:
            cuts.append(j)
        decoded += step
        cost.append(step + resize_cost)
    if not cuts:
        return [wanted]
    prefix = np.cumsum(cost)
    total = float(prefix[-1])
    chosen: list[int] = []
    for k in range(1, parts):  # the cut nearest each k/parts of the cost
        target = total * k / parts
        best = min(cuts, key=lambda j: abs(prefix[j - 1] - target))
        if (not chosen or best > chosen[-1]) and 0 < best < len(wanted):
            chosen.append(best)
    bounds = [0, *chosen, len(wanted)]
    longest = max(float(prefix[b - 1] - (prefix[a - 1] if a else 0.0)) for a, b in itertools.pairwise(bounds))
    if longest >= _SPLIT_GAIN * max(decoded, resize_cost * len(wanted)):
        return [wanted]
    return [wanted[a:b] for a, b in itertools.pairwise(bounds)]


def read_run(vr: Any, run: list[int], take: Callable[[int, np.ndarray], None]) -> None:
    """Decode `run` (sorted frame indices) in small calls; each frame goes to `take(index, frame)`."""
    for chunk in chunks(run):
        batch = as_numpy(vr.get_batch(chunk))
        for j, idx in enumerate(chunk):
            take(idx, batch[j])


def read_runs(data: Source, vr: Any, runs: list[list[int]], collector: FrameCollector) -> None:
    """The first run on this thread with the open reader, the others on their own threads and readers."""
    import decord

    errors: list[BaseException] = []

    def other(run: list[int]) -> None:
        try:
            read_run(decord.VideoReader(open_source(data), ctx=decord.cpu(0), num_threads=1), run,
                     collector.put)
        except BaseException as e:  # noqa: BLE001 — raised on the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=other, args=(run,), name="decode-run", daemon=True) for run in runs[1:]]
    for t in threads:
        t.start()
    try:
        read_run(vr, runs[0], collector.put)
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    for t in threads:
        t.join()
    if errors:
        e = errors[0]
        raise e if isinstance(e, DecodeError) else DecodeError("decord.read", short_message(e)) from None


__all__ = ["as_numpy", "chunks", "keyframe_runs", "read_run", "read_runs"]
