"""Long recordings as moments: split a video into segments (fixed windows or shots) and decode each segment's
sampled frames in one pass through the file.

- `fixed_segments`: windows of `length_s` every `length_s − overlap_s`; a tail shorter than `min_s` joins the
  window before it; a video no longer than one window stays one segment.
- `detect_cuts` + `shot_segments`: shot boundaries from PySceneDetect's content detector (PyAV backend), then
  shots shorter than `min_s` merged into a neighbour and shots longer than `max_s` split evenly.
- `decode_segments`: a generator of each segment's T frames (the model's own frame sampling, applied within the
  segment), in order. The file is read once: a demux pass indexes the keyframes (no decoding), then decoding
  seeks to the keyframe before a wanted frame only when that skips frames, else reads on. Only the frames of
  segments not yet handed out are held (a window and the one overlapping it), whatever the file's duration.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.decode.decoders import probe
from pipeline.decode.frames import DecodeError, FrameCollector, Source, open_source, short_message
from stllm.frame_sampling import FrameSampling, frame_indices

SegmentMode = Literal["whole", "fixed", "shots"]
ReadStrategy = Literal["frame", "slice"]  # the decoder's threads: frame threads, or slice threads only
# With frame threads, a seek pays only when it skips at least this many frames, and frame threads pay only when
# at least this many frames are decoded per seek (each seek loses the frames the threads decoded ahead).
FRAME_THREADS_MIN_RUN = 8
FrameIndex = tuple[np.ndarray, list[int]]  # (presentation timestamps in order, keyframe frame numbers)


@dataclass(frozen=True)
class Segment:
    index: int
    start_frame: int
    end_frame: int  # exclusive
    fps: float

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame

    def sampled(self, num_frames: int, sampling: FrameSampling = "original") -> list[int]:
        """The video frame indices the model sees for this segment (the model's rule, inside the segment)."""
        return [self.start_frame + i for i in frame_indices(self.n_frames, num_frames, sampling)]


@dataclass
class DecodedSegment:
    segment: Segment
    frames: np.ndarray  # uint8 (T, size, size, 3)
    frame_indices: list[int]  # in the whole video
    thumbnail_jpeg: bytes = field(repr=False)
    native_frames: np.ndarray | None = field(default=None, repr=False)  # as `DecodedVideo.native_frames`


@dataclass
class DecodeCounts:
    frames_decoded: int = 0
    frames_used: int = 0
    seeks: int = 0


# ---------------------------------------------------------------- planning


def _renumber(bounds: list[tuple[int, int]], fps: float) -> list[Segment]:
    return [Segment(i, a, b, fps) for i, (a, b) in enumerate(bounds)]


def fixed_segments(n_frames: int, fps: float, length_s: float, overlap_s: float = 0.0,
                   min_s: float = 0.0) -> list[Segment]:
    if length_s <= 0 or not 0 <= overlap_s < length_s:
        raise ValueError(f"need length_s > 0 and 0 <= overlap_s < length_s, got {length_s}, {overlap_s}")
    if n_frames < 1 or fps <= 0:
        raise ValueError(f"cannot segment a video of {n_frames} frames at {fps} fps")
    length, step = max(1, round(length_s * fps)), max(1, round((length_s - overlap_s) * fps))
    bounds: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + length, n_frames)
        bounds.append((start, end))
        if end >= n_frames:
            break
        start += step
    # a tail shorter than min_s (or entirely inside the window before it) joins that window
    while len(bounds) > 1 and (bounds[-1][1] - bounds[-1][0] < min_s * fps or bounds[-1][0] <= bounds[-2][0]):
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return _renumber(bounds, fps)


def shot_segments(cuts: list[int], n_frames: int, fps: float, min_s: float, max_s: float) -> list[Segment]:
    """Shots from the frames where a new shot starts: merged up to `min_s`, split down to `max_s`."""
    if min_s < 0 or max_s <= 0 or min_s > max_s:
        raise ValueError(f"need 0 <= min_s <= max_s and max_s > 0, got {min_s}, {max_s}")
    edges = [0, *sorted(c for c in set(cuts) if 0 < c < n_frames), n_frames]
    shots = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    merged: list[tuple[int, int]] = []
    min_f = min_s * fps
    for a, b in shots:
        if merged and (b - a < min_f or merged[-1][1] - merged[-1][0] < min_f):
            merged[-1] = (merged[-1][0], b)  # a short shot (or a short one before it) becomes one segment
        else:
            merged.append((a, b))
    out: list[tuple[int, int]] = []
    max_f = max(1, round(max_s * fps))
    for a, b in merged:
        parts = math.ceil((b - a) / max_f)
        cuts_in = [a + round(k * (b - a) / parts) for k in range(parts + 1)]
        out += list(zip(cuts_in, cuts_in[1:], strict=False))
    return _renumber(out, fps)


def detect_cuts(data: Source, threshold: float = 27.0, min_shot_frames: int = 2) -> list[int]:
    """Frames where a new shot starts, by PySceneDetect's ContentDetector (HSV content change) on every frame,
    decoded by its PyAV backend."""
    from scenedetect import ContentDetector, SceneManager, open_video

    try:
        video = open_video(str(data), backend="pyav")
        manager = SceneManager()
        manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_shot_frames))
        manager.detect_scenes(video, show_progress=False)
        scenes = manager.get_scene_list(start_in_scene=True)
    except Exception as e:  # noqa: BLE001
        raise DecodeError("shots", short_message(e)) from None
    return [start.frame_num for start, _ in scenes[1:]]


def plan_segments(data: Source, mode: SegmentMode, *, length_s: float = 10.0, overlap_s: float = 0.0,
                  min_s: float = 2.0, max_s: float = 30.0, threshold: float = 27.0,
                  frames: FrameIndex | None = None, fps: float | None = None) -> list[Segment]:
    """The segments of a video file. A video no longer than one window (`length_s`, or `max_s` for shots)
    stays one segment, as does every video in mode `whole`. `frames` / `fps`: the file's `frame_index` and
    frame rate when the caller has them already (no second pass over the file)."""
    return segment_plan(data, mode, length_s=length_s, overlap_s=overlap_s, min_s=min_s, max_s=max_s,
                        threshold=threshold, frames=frames, fps=fps)[0]


def segment_plan(data: Source, mode: SegmentMode, *, length_s: float = 10.0, overlap_s: float = 0.0,
                 min_s: float = 2.0, max_s: float = 30.0, threshold: float = 27.0, frames: FrameIndex | None = None,
                 fps: float | None = None) -> tuple[list[Segment], list[int] | None]:
    """`plan_segments`, and the frames where the shot detector found a new shot starting: None where it did
    not run (modes whole and fixed, and a video that stays one segment). The curation scores count them."""
    n = (frames or frame_index(data))[0].size
    fps = fps or probe(data)["fps"]
    if n < 1 or fps <= 0:
        raise DecodeError("probe", f"cannot segment: {n} frames at {fps} fps")
    single = length_s if mode == "fixed" else max_s
    if mode == "whole" or n <= single * fps:
        return [Segment(0, 0, n, fps)], None
    if mode == "fixed":
        return fixed_segments(n, fps, length_s, overlap_s, min_s), None
    if mode == "shots":
        cuts = detect_cuts(data, threshold)
        return shot_segments(cuts, n, fps, min_s, max_s), cuts
    raise ValueError(f"segment mode must be whole, fixed or shots, got {mode!r}")


# ---------------------------------------------------------------- decoding


def frame_index(data: Source) -> FrameIndex:
    """(the presentation timestamps of the video's frames in order, the frame numbers of its keyframes), from
    one demux pass (no decoding)."""
    import av

    pts: list[int] = []
    key_pts: list[int] = []
    try:
        with av.open(open_source(data)) as c:
            s = c.streams.video[0]
            for p in c.demux(s):
                if p.size and p.pts is not None:
                    pts.append(p.pts)
                    if p.is_keyframe:
                        key_pts.append(p.pts)
    except Exception as e:  # noqa: BLE001
        raise DecodeError("pyav.open", short_message(e)) from None
    order = np.unique(np.asarray(pts, dtype=np.int64))
    keys = sorted(int(np.searchsorted(order, k)) for k in set(key_pts))
    return order, keys or [0]


def seek_reads(needed: list[int], keys: list[int], min_skip: int = 1) -> tuple[int, int]:
    """(frames decoded, seeks) to reach the sorted `needed` frames when reading seeks to the keyframe before a
    wanted frame whenever that skips at least `min_skip` frames (as `decode_segments` reads)."""
    decoded, seeks, at = 0, 0, -1
    for target in needed:
        key = keys[bisect.bisect_right(keys, target) - 1]
        if at < 0 or key - (at + 1) >= min_skip:
            decoded, seeks = decoded + target - key + 1, seeks + 1
        elif target > at:
            decoded += target - at
        at = max(at, target)
    return decoded, seeks


def read_strategy(needed: list[int], keys: list[int]) -> ReadStrategy:
    """How to read a file for `needed` frames, from its keyframes (no decoding): `frame` threads (every core) when
    a seek is followed by a long enough run of decoding for them to pay for the frames they decode ahead and lose
    at every seek — keyframes far apart next to the wanted frames' spacing, up to x264's default 250-frame GOP
    where reading mostly goes on; else `slice` threads (keyframes about as often as wanted frames: short runs)."""
    decoded, seeks = seek_reads(needed, keys)
    return "frame" if decoded >= FRAME_THREADS_MIN_RUN * seeks else "slice"


def decode_segments(data: Source, segments: list[Segment], num_frames: int, size: int | None = 224,
                    sampling: FrameSampling = "original", counts: DecodeCounts | None = None,
                    frames: FrameIndex | None = None, native: int = 0,
                    strategy: ReadStrategy | None = None) -> Iterator[DecodedSegment]:
    """Each segment's sampled frames, resized like the whole-video path, in segment order (see the module doc).
    `frames`: the file's `frame_index`, when the caller has it already. `native`: as `decode_video`'s.
    `strategy`: how to read the file (default: `read_strategy`'s choice)."""
    import av

    counts = counts if counts is not None else DecodeCounts()
    pts, keys = frames or frame_index(data)
    n = int(pts.size)
    if n < 1:
        raise DecodeError("pyav.open", "the video stream has no frames")
    wanted = [[min(i, n - 1) for i in seg.sampled(num_frames, sampling)] for seg in segments]
    needed = sorted({i for w in wanted for i in w})
    strategy = strategy or read_strategy(needed, keys)
    waiting: dict[int, list[int]] = {}  # frame → segments that want it
    for k, w in enumerate(wanted):
        for i in sorted(set(w)):
            waiting.setdefault(i, []).append(k)
    last_needed = [max(w) for w in wanted]
    open_: dict[int, FrameCollector] = {}  # segments with frames decoded, not handed out yet
    pos_of = {int(p): i for i, p in enumerate(pts)}
    next_out = 0

    def deliver(index: int, rgb: np.ndarray) -> None:
        for k in waiting.pop(index, ()):
            if k not in open_:
                open_[k] = FrameCollector(wanted[k], size, native)
            open_[k].add(index, rgb)

    try:
        with av.open(open_source(data)) as c:
            stream = c.streams.video[0]
            # Frame threads only where seeks are rare or far apart: a seek flushes the decoder, and frame threading
            # then refills its pipeline (slice threads: 0.32 s vs 0.52 s for the same 72 seeks, keyframe/s).
            stream.thread_type = "SLICE" if strategy == "slice" else "AUTO"
            min_skip = FRAME_THREADS_MIN_RUN if strategy == "frame" else 1
            decoded: Iterator[Any] | None = None
            at, frame = -1, None  # the last frame decoded
            for target in needed:
                if target not in waiting:
                    continue  # a frame decoded on the way to an earlier one
                key = keys[bisect.bisect_right(keys, target) - 1]
                # seek when that skips enough frames, or to go back
                if decoded is None or key - (at + 1) >= min_skip or at >= target:
                    c.seek(int(pts[key]), stream=stream, backward=True, any_frame=False)
                    decoded, at = c.decode(stream), -1
                    counts.seeks += 1
                while at < target:
                    frame = next(decoded, None)
                    if frame is None:
                        raise DecodeError("pyav.read", f"the stream ended before frame {target} of {n}")
                    counts.frames_decoded += 1
                    at = pos_of.get(int(frame.pts), at + 1) if frame.pts is not None else at + 1
                    if at in waiting and at <= target:
                        deliver(at, frame.to_ndarray(format="rgb24"))
                if target in waiting:  # the stream skipped this frame: the next one stands in
                    deliver(target, frame.to_ndarray(format="rgb24"))
                counts.frames_used += 1
                while next_out < len(segments) and last_needed[next_out] <= at:
                    collector = open_.pop(next_out)
                    out, thumb = collector.result()
                    yield DecodedSegment(segments[next_out], out, wanted[next_out], thumb, collector.native_frames())
                    next_out += 1
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        for collector in open_.values():
            collector.drain()
        raise DecodeError("pyav.read", short_message(e)) from None
