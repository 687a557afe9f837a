"""The decoding work itself, in whichever process runs it: sample T indices, decode them, resize + centre crop.

- Sampling: the model's own rules (`stllm.frame_sampling`): the original's by default (min(n, T) frames), or
  segment midpoints (`sampling="midpoint"`, always T frames) when a job asks for it.
- Decoders: decord first (the original's), PyAV when decord cannot open or read the file (AV1, for one).
  Probe facts (codec, size, fps, duration) always come from PyAV, which only reads the headers for that.
- Fast path: decord's frames reach numpy through DLPack (no copy). Where keyframes allow, the wanted frames are
  cut into runs that readers on their own threads decode and resize side by side (`keyframe_runs`); else one
  reader decodes while a low-priority thread pool resizes (PIL releases the GIL).

`pipeline.decode` runs this in a killable worker process (the public API); `decode_inline` runs it here.
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

# The model's own sampling and transforms: the decode stage and the engines cannot drift apart.
from stllm.frame_sampling import FrameSampling, frame_indices
from stllm.transforms import resize_crop_image

Decoder = Literal["auto", "decord", "pyav"]
Source = bytes | os.PathLike | str  # the video's bytes, or a local file the decoders read (and seek) themselves

THUMBNAIL_MAX_WIDTH = 320
_CHUNK = 4  # frames per decord get_batch call: small enough to overlap decoding with resizing
_TAIL = 4  # the last frames come one per call: what is left to resize when decoding ends is about one frame
# One decord thread plus resize threads on the remaining cores: decord's frame-threaded decoding of a single
# video gains little on short clips, and an oversubscribed core slows both sides (measured on 2 cores).
_THREADS = int(os.environ.get("STLLM_DECODE_THREADS", max(1, min(4, (os.cpu_count() or 1) - 1))))
_DECORD_THREADS = int(os.environ.get("STLLM_DECORD_THREADS", 1))
# Where keyframes allow, the wanted frames are cut at keyframes into runs decoded side by side, each by its own
# single-threaded reader that also resizes its frames: no frame decoded twice, both cores busy until the end.
# (FFmpeg's frame threads, what bare decord uses, lose to the resizes on the other core: 0.70 vs 0.86.)
_PARTS = int(os.environ.get("STLLM_DECODE_PARTS", max(1, min(4, os.cpu_count() or 1))))
_RESIZE_COST = 4.0  # one resize to 224 ≈ decoding 4 frames of the same video (measured: 320×240, 640×360)
_PART_MAX_BYTES = 64 << 20  # decord copies a file object's bytes per reader; paths are read, not copied
_SPLIT_GAIN = 0.9


class DecodeError(Exception):
    """A video could not be decoded. `stage` says where: probe, decord.open, decord.read, pyav.open,
    pyav.read, transform, worker, or the stage a timeout hit."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with both args (Ray ships exceptions)
        return (type(self), (self.stage, self.message))


class DecodeTimeout(DecodeError):
    """The decode did not finish in time; its process was killed."""


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, size, size, 3); (T, H, W, 3) when decoded with size=None
    frame_indices: list[int]
    n_frames: int  # frames in the video, as the decoder counted them
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str  # canonical FFmpeg name: h264, hevc, vp9, av1, ...
    decoder: str  # "decord" or "pyav"
    thumbnail_jpeg: bytes = field(repr=False)

    def info(self) -> dict[str, Any]:
        """Everything but the frames (what a result row stores)."""
        d = asdict(self)
        del d["frames"]
        return d


def open_source(data: Source) -> Any:
    """What decord and PyAV open: a file path as is (they read only what they need), bytes as a file object."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)


# ---------------------------------------------------------------- transforms


def thumbnail_jpeg(img: Image.Image, max_width: int = THUMBNAIL_MAX_WIDTH) -> bytes:
    w, h = img.size
    if w > max_width:
        img = img.resize((max_width, max(1, round(h * max_width / w))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lowest_priority() -> None:
    """Resize threads yield to the decoding thread (Linux: a thread's own nice value): they fill the time the
    decoder leaves, and the decoding thread, at normal priority, takes over what is left when it ends."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: only slower
        pass


def _resize_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _THREADS), thread_name_prefix="resize",
                                       initializer=_lowest_priority)
        return _pool


class FrameCollector:
    """Resizes frames as they arrive (on the pool), writing each into its slots of the output array.
    With size None the frames are kept at their native size (one copy, no resize)."""

    def __init__(self, indices: Sequence[int], size: int | None):
        self.size = size
        self.count = len(indices)
        self.out: np.ndarray | None = None
        if size is not None:
            self.out = np.empty((self.count, size, size, 3), dtype=np.uint8)
        self.slots: dict[int, list[int]] = {}
        for pos, idx in enumerate(indices):
            self.slots.setdefault(idx, []).append(pos)
        self.thumb_pos = self.count // 2
        self.thumbnail = b""
        self._queued: list[tuple[Future[None], list[int], np.ndarray]] = []

    def add(self, index: int, frame: np.ndarray) -> None:
        slots = self.slots[index]
        if self.size is not None:
            self._queued.append((_resize_pool().submit(self._one, slots, frame), slots, frame))
            return
        if self.out is None:
            self.out = np.empty((self.count, *frame.shape), dtype=np.uint8)
        if frame.shape != self.out.shape[1:]:
            raise DecodeError("transform", f"frame size changed: {frame.shape} vs {self.out.shape[1:]}")
        for pos in slots:
            self.out[pos] = frame
        if self.thumb_pos in slots:
            self.thumbnail = thumbnail_jpeg(Image.fromarray(frame))

    def put(self, index: int, frame: np.ndarray) -> None:
        """Resize on the calling thread (a decoding run resizes its own frames)."""
        self._one(self.slots[index], frame)

    def _one(self, slots: list[int], frame: np.ndarray) -> None:
        assert self.out is not None and self.size is not None
        img = Image.fromarray(frame)
        small = resize_crop_image(img, self.size)
        for pos in slots:
            self.out[pos] = small
        if self.thumb_pos in slots:
            self.thumbnail = thumbnail_jpeg(img)

    def result(self) -> tuple[np.ndarray, bytes]:
        """Wait for the resizes; the decoding thread, now free, takes over those the pool has not started."""
        try:
            for f, slots, frame in reversed(self._queued):  # the pool works from the front
                if f.cancel():
                    self._one(slots, frame)
            for f, _, _ in self._queued:
                if not f.cancelled():
                    f.result()
        except Exception as e:  # noqa: BLE001
            raise DecodeError("transform", short_message(e)) from None
        assert self.out is not None
        return self.out, self.thumbnail

    def drain(self) -> None:
        """Cancel or wait for queued work, ignoring its errors (the caller is already failing)."""
        for f, _, _ in self._queued:
            if not f.cancel():
                f.exception()


# ---------------------------------------------------------------- decoders (run in the worker or inline)

Progress = Callable[[str], None]


def _no_progress(stage: str) -> None:
    pass


def probe(data: Source) -> dict[str, Any]:
    import av

    try:
        with av.open(open_source(data), mode="r") as c:
            if not c.streams.video:
                raise DecodeError("probe", "the file has no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0.0)
            if c.duration:
                duration = c.duration / 1_000_000  # AV_TIME_BASE
            elif s.duration and s.time_base:
                duration = float(s.duration * s.time_base)
            else:
                duration = s.frames / fps if s.frames and fps else 0.0
            return {"codec": s.codec_context.codec.canonical_name, "width": s.codec_context.width,
                    "height": s.codec_context.height, "fps": fps, "duration_s": duration, "frames": s.frames}
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 — av raises many types for garbage input
        raise DecodeError("probe", f"not a readable video ({type(e).__name__}: {e})") from None


class _DLPackView:
    """Hands decord's DLPack capsule to numpy.from_dlpack: the frames are not copied."""

    def __init__(self, nd: Any):
        self.nd = nd

    def __dlpack__(self, **_: Any) -> Any:
        return self.nd.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def _as_numpy(nd: Any) -> np.ndarray:
    try:
        return np.from_dlpack(_DLPackView(nd))
    except Exception:  # noqa: BLE001 — older numpy/decord: one copy instead
        return nd.asnumpy()


def _chunks(indices: list[int]) -> list[list[int]]:
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


def _read_run(vr: Any, run: list[int], collector: FrameCollector) -> None:
    for chunk in _chunks(run):
        batch = _as_numpy(vr.get_batch(chunk))
        for j, idx in enumerate(chunk):
            collector.put(idx, batch[j])


def _read_runs(data: Source, vr: Any, runs: list[list[int]], collector: FrameCollector) -> None:
    """The first run on this thread with the open reader, the others on their own threads and readers."""
    import decord

    errors: list[BaseException] = []

    def other(run: list[int]) -> None:
        try:
            _read_run(decord.VideoReader(open_source(data), ctx=decord.cpu(0), num_threads=1), run, collector)
        except BaseException as e:  # noqa: BLE001 — raised on the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=other, args=(run,), name="decode-run", daemon=True) for run in runs[1:]]
    for t in threads:
        t.start()
    try:
        _read_run(vr, runs[0], collector)
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    for t in threads:
        t.join()
    if errors:
        e = errors[0]
        raise e if isinstance(e, DecodeError) else DecodeError("decord.read", short_message(e)) from None


def _decode_decord(data: Source, num_frames: int, size: int | None, sampling: FrameSampling,
                   progress: Progress, probed: Callable[[], object] = lambda: None
                   ) -> tuple[np.ndarray, list[int], int, bytes]:
    """`probed()` waits for the probe running beside decord's open (and raises its error): a file the probe
    rejects is never read by decord."""
    import decord

    progress("decord.open")
    try:
        vr = decord.VideoReader(open_source(data), ctx=decord.cpu(0), num_threads=_DECORD_THREADS)
        n = len(vr)
    except Exception as e:  # noqa: BLE001 — decord raises DECORDError / RuntimeError
        probed()
        raise DecodeError("decord.open", short_message(e)) from None
    probed()
    if n < 1:
        raise DecodeError("decord.open", "decord reports zero frames")
    indices = frame_indices(n, num_frames, sampling)
    collector = FrameCollector(indices, size)
    unique = sorted(set(indices))  # already clipped to n-1: never ask past the reported end (#373)
    runs = [unique]
    if size is not None and _PARTS > 1 and (not isinstance(data, (bytes, bytearray, memoryview))
                                            or len(data) <= _PART_MAX_BYTES):
        try:
            runs = keyframe_runs(unique, list(vr.get_key_indices()), _PARTS)
        except Exception:  # noqa: BLE001 — no key index: decode in one run
            pass
    progress("decord.read")
    if len(runs) > 1:
        _read_runs(data, vr, runs, collector)
        progress("transform")
        frames, thumb = collector.result()
        return frames, indices, n, thumb
    try:
        for chunk in _chunks(unique):
            batch = _as_numpy(vr.get_batch(chunk))
            for j, idx in enumerate(chunk):
                collector.add(idx, batch[j])
    except Exception as e:  # noqa: BLE001
        collector.drain()  # let queued resizes finish before the error propagates
        raise e if isinstance(e, DecodeError) else DecodeError("decord.read", short_message(e)) from None
    progress("transform")
    frames, thumb = collector.result()
    return frames, indices, n, thumb


def _count_packets(data: Source) -> int:
    import av

    with av.open(open_source(data)) as c:
        s = c.streams.video[0]
        return sum(1 for p in c.demux(s) if p.size)


def _decode_pyav(data: Source, num_frames: int, size: int | None, sampling: FrameSampling, header_frames: int,
                 progress: Progress) -> tuple[np.ndarray, list[int], int, bytes]:
    import av

    progress("pyav.open")
    try:
        # The probe's frame count; WebM/MKV headers carry none: count packets (demux only, no decoding).
        n = header_frames or _count_packets(data)
    except Exception as e:  # noqa: BLE001
        raise DecodeError("pyav.open", short_message(e)) from None
    if n < 1:
        raise DecodeError("pyav.open", "the video stream has no frames")
    indices = frame_indices(n, num_frames, sampling)
    collector = FrameCollector(indices, size)
    wanted, last = set(indices), max(indices)
    progress("pyav.read")
    decoded, last_frame = 0, None
    try:
        with av.open(open_source(data)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(c.decode(stream)):
                decoded, last_frame = i + 1, frame
                if i in wanted:
                    collector.add(i, frame.to_ndarray(format="rgb24"))
                if i >= last:
                    break
    except Exception as e:  # noqa: BLE001
        collector.drain()
        raise e if isinstance(e, DecodeError) else DecodeError("pyav.read", short_message(e)) from None
    if last_frame is None:
        raise DecodeError("pyav.read", "no frame could be decoded")
    if decoded <= last:
        # The header over-reported its frame count. A few missing frames at the end are common (decord
        # #373 files); many mean a truncated or corrupt file.
        if n - decoded > max(2, n // 20):
            collector.drain()
            raise DecodeError("pyav.read", f"only {decoded} of the {n} frames the header promises could be "
                                           "decoded (truncated or corrupt file)")
        tail = last_frame.to_ndarray(format="rgb24")
        for idx in sorted(i for i in wanted if i >= decoded):
            collector.add(idx, tail)
        n = decoded
    progress("transform")
    frames, thumb = collector.result()
    return frames, indices, n, thumb


_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[12:00:00] /src/video_reader.cc:486: "


def short_message(e: BaseException, limit: int = 300) -> str:
    text = _DECORD_PREFIX.sub("", " ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def decode_inline(data: Source, num_frames: int, size: int | None, decoder: Decoder, sampling: FrameSampling,
            progress: Progress = _no_progress) -> DecodedVideo:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    progress("probe")
    # The probe (PyAV reads the headers, ~1-2 ms) runs on the resize pool while decord opens the file; decord
    # reads no frame before the probe accepted the file (an open that crashes decord on garbage would kill
    # the worker: reported as a worker DecodeError, the job goes on).
    probing = _resize_pool().submit(probe, data)
    used, first_error = decoder, None
    result = None
    if decoder in ("auto", "decord"):
        try:
            result = _decode_decord(data, num_frames, size, sampling, progress, probing.result)
            used = "decord"
        except (DecodeError, ImportError) as e:  # ImportError: platforms without a decord wheel
            if decoder == "decord":
                raise e if isinstance(e, DecodeError) else DecodeError("decord.open", str(e)) from None
            first_error = e
    facts = probing.result()  # a probe error wins over decord's (it is the clearer message)
    if result is None:
        try:
            result = _decode_pyav(data, num_frames, size, sampling, facts["frames"], progress)
        except DecodeError as e:
            if first_error is not None:
                raise DecodeError(e.stage, f"{e.message} (decord: {first_error})") from None
            raise
        used = "pyav"
    frames, indices, n, thumb = result
    return DecodedVideo(frames=frames, frame_indices=indices, n_frames=n, fps=facts["fps"],
                        duration_s=facts["duration_s"], width=facts["width"], height=facts["height"],
                        codec=facts["codec"], decoder=used, thumbnail_jpeg=thumb)
