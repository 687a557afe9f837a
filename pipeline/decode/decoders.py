"""The decoding work itself, in whichever process runs it: sample T indices, decode them, resize + centre crop.

- Sampling: the model's own rules (`stllm.frame_sampling`): the original's by default (min(n, T) frames), or
  segment midpoints (`sampling="midpoint"`, always T frames) when a job asks for it.
- Decoders: decord first (the original's), PyAV when decord cannot open or read the file (AV1, for one).
  Probe facts (codec, size, fps, duration) always come from PyAV, which only reads the headers for that.
- Fast path (`decord_runs`): decord's frames reach numpy through DLPack (no copy). Where keyframes allow, the
  wanted frames are cut into runs that readers on their own threads decode and resize side by side; else one
  reader decodes while the low-priority resize pool (`frames.FrameCollector`) resizes (PIL releases the GIL).

`pipeline.decode` runs this in a killable worker process (the public API); `decode_inline` runs it here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from pipeline.decode.decord_runs import keyframe_runs, read_run, read_runs
from pipeline.decode.frames import (
    DecodeError,
    FrameCollector,
    Source,
    open_source,
    resize_pool,
    short_message,
)

# The model's own sampling: the decode stage and the engines cannot drift apart.
from stllm.frame_sampling import FrameSampling, frame_indices

Decoder = Literal["auto", "decord", "pyav"]
_DECORD_THREADS = int(os.environ.get("STLLM_DECORD_THREADS", 1))
# Where keyframes allow, the wanted frames are cut at keyframes into runs decoded side by side, each by its own
# single-threaded reader that also resizes its frames: no frame decoded twice, both cores busy until the end.
# (FFmpeg's frame threads, what bare decord uses, lose to the resizes on the other core: 0.70 vs 0.86.)
_PARTS = int(os.environ.get("STLLM_DECODE_PARTS", max(1, min(4, os.cpu_count() or 1))))
_PART_MAX_BYTES = 64 << 20  # decord copies a file object's bytes per reader; paths are read, not copied


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
    # a few of the frames at the source's aspect ratio (uint8 (k, h, w, 3), longer side <= NATIVE_MAX_SIDE), when
    # asked for (`native`): what OCR reads (pipeline.decode.scores)
    native_frames: np.ndarray | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        """Everything but the frames (what a result row stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("frames", "native_frames")}


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


Decoded = tuple[np.ndarray, list[int], int, bytes, np.ndarray | None]  # frames, indices, n, thumbnail, native


def _decode_decord(data: Source, num_frames: int, size: int | None, sampling: FrameSampling,
                   progress: Progress, probed: Callable[[], object] = lambda: None, native: int = 0) -> Decoded:
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
    collector = FrameCollector(indices, size, native)
    unique = sorted(set(indices))  # already clipped to n-1: never ask past the reported end (#373)
    runs = [unique]
    if size is not None and _PARTS > 1 and (not isinstance(data, (bytes, bytearray, memoryview))
                                            or len(data) <= _PART_MAX_BYTES):
        try:
            runs = keyframe_runs(unique, list(vr.get_key_indices()), _PARTS)
        except Exception:  # noqa: BLE001 — no key index: decode in one run
            pass
    progress("decord.read")
    try:
        if len(runs) > 1:
            read_runs(data, vr, runs, collector)
        else:
            read_run(vr, unique, collector.add)  # resized on the pool while decord decodes the next frames
    except Exception as e:  # noqa: BLE001
        collector.drain()  # let queued resizes finish before the error propagates
        raise e if isinstance(e, DecodeError) else DecodeError("decord.read", short_message(e)) from None
    progress("transform")
    frames, thumb = collector.result()
    return frames, indices, n, thumb, collector.native_frames()


def _count_packets(data: Source) -> int:
    import av

    with av.open(open_source(data)) as c:
        s = c.streams.video[0]
        return sum(1 for p in c.demux(s) if p.size)


def _decode_pyav(data: Source, num_frames: int, size: int | None, sampling: FrameSampling, header_frames: int,
                 progress: Progress, native: int = 0) -> Decoded:
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
    collector = FrameCollector(indices, size, native)
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
    return frames, indices, n, thumb, collector.native_frames()


def decode_inline(data: Source, num_frames: int, size: int | None, decoder: Decoder, sampling: FrameSampling,
            progress: Progress = _no_progress, native: int = 0) -> DecodedVideo:
    """`native`: keep that many of the sampled frames at the source's aspect ratio too (`native_frames`)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    progress("probe")
    # The probe (PyAV reads the headers, ~1-2 ms) runs on the resize pool while decord opens the file; decord
    # reads no frame before the probe accepted the file (an open that crashes decord on garbage would kill
    # the worker: reported as a worker DecodeError, the job goes on).
    probing = resize_pool().submit(probe, data)
    used, first_error = decoder, None
    result = None
    if decoder in ("auto", "decord"):
        try:
            result = _decode_decord(data, num_frames, size, sampling, progress, probing.result, native)
            used = "decord"
        except (DecodeError, ImportError) as e:  # ImportError: platforms without a decord wheel
            if decoder == "decord":
                raise e if isinstance(e, DecodeError) else DecodeError("decord.open", str(e)) from None
            first_error = e
    facts = probing.result()  # a probe error wins over decord's (it is the clearer message)
    if result is None:
        try:
            result = _decode_pyav(data, num_frames, size, sampling, facts["frames"], progress, native)
        except DecodeError as e:
            if first_error is not None:
                raise DecodeError(e.stage, f"{e.message} (decord: {first_error})") from None
            raise
        used = "pyav"
    frames, indices, n, thumb, kept = result
    return DecodedVideo(frames=frames, frame_indices=indices, n_frames=n, fps=facts["fps"],
                        duration_s=facts["duration_s"], width=facts["width"], height=facts["height"],
                        codec=facts["codec"], decoder=used, thumbnail_jpeg=thumb, native_frames=kept)
