"""What a decoder hands its frames to: the errors it raises, the source it opens, the resize pool and the
`FrameCollector` that resizes + centre-crops each wanted frame into its slots of the output (and makes the
thumbnail). Shared by the whole-video decoders and the segment decoder."""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from stllm.transforms import resize_crop_image

Source = bytes | os.PathLike | str  # the video's bytes, or a local file the decoders read (and seek) themselves
THUMBNAIL_MAX_WIDTH = 320
# Frames kept at the source's aspect ratio for OCR (`native`): the longer side at most this (no upscale): text in a
# corner or a caption line across the width survives, unlike in the model's centre crop.
NATIVE_MAX_SIDE = 640
# Resize threads on all cores but the decoding one (measured on 2 cores: an oversubscribed core slows both).
_THREADS = int(os.environ.get("STLLM_DECODE_THREADS", max(1, min(4, (os.cpu_count() or 1) - 1))))


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


_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[12:00:00] /src/video_reader.cc:486: "


def short_message(e: BaseException, limit: int = 300) -> str:
    text = _DECORD_PREFIX.sub("", " ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def open_source(data: Source) -> Any:
    """What decord and PyAV open: a file path as is (they read only what they need), bytes as a file object."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)


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


def resize_pool() -> ThreadPoolExecutor:
    """The process's resize threads (lowest priority), shared by every decode in it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _THREADS), thread_name_prefix="resize",
                                       initializer=_lowest_priority)
        return _pool


def spread_positions(count: int, k: int) -> list[int]:
    """`k` of `count` positions spread evenly (the middles of k equal parts), fewer when count < k."""
    return sorted({(2 * i + 1) * count // (2 * k) for i in range(k)}) if k > 0 and count > 0 else []


def native_copy(frame: np.ndarray, max_side: int = NATIVE_MAX_SIDE) -> np.ndarray:
    """A copy of an RGB frame at its own aspect ratio, the longer side at most `max_side` (area-averaged)."""
    import cv2

    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frame.copy()  # decord's buffers are reused: never keep a view
    return cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


class _Resize:
    """One queued resize. The decoding thread takes over those the pool has not started by cancelling them, but a
    cancelled item stays in the pool's queue until a (lowest-priority) resize thread pops it: cleared, it holds
    neither the frame nor the collector's output meanwhile (on busy cores they piled up: 11 segments' outputs)."""

    __slots__ = ("collector", "slots", "frame")

    def __init__(self, collector: FrameCollector, slots: list[int], frame: np.ndarray):
        self.collector: FrameCollector | None = collector
        self.slots, self.frame = slots, frame

    def __call__(self) -> None:
        if self.collector is not None:
            self.collector._one(self.slots, self.frame)

    def clear(self) -> None:
        self.collector, self.frame = None, None


class FrameCollector:
    """Resizes frames as they arrive (on the pool), writing each into its slots of the output array.
    With size None the frames are kept at their native size (one copy, no resize). `native`: that many of the
    frames, spread evenly, are also kept at the source's aspect ratio (`native_frames`, for OCR)."""

    def __init__(self, indices: Sequence[int], size: int | None, native: int = 0):
        self.size = size
        self.count = len(indices)
        self.native_pos = set(spread_positions(self.count, native))
        self.native: dict[int, np.ndarray] = {}
        self.out: np.ndarray | None = None
        if size is not None:
            self.out = np.empty((self.count, size, size, 3), dtype=np.uint8)
        self.slots: dict[int, list[int]] = {}
        for pos, idx in enumerate(indices):
            self.slots.setdefault(idx, []).append(pos)
        self.thumb_pos = self.count // 2
        self.thumbnail = b""
        self._queued: list[tuple[Future[None], _Resize]] = []

    def add(self, index: int, frame: np.ndarray) -> None:
        slots = self.slots[index]
        if self.size is not None:
            job = _Resize(self, slots, frame)
            self._queued.append((resize_pool().submit(job), job))
            return
        if self.out is None:
            self.out = np.empty((self.count, *frame.shape), dtype=np.uint8)
        if frame.shape != self.out.shape[1:]:
            raise DecodeError("transform", f"frame size changed: {frame.shape} vs {self.out.shape[1:]}")
        for pos in slots:
            self.out[pos] = frame
        self._keep_native(slots, frame)
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
        self._keep_native(slots, frame)
        if self.thumb_pos in slots:
            self.thumbnail = thumbnail_jpeg(img)

    def _keep_native(self, slots: list[int], frame: np.ndarray) -> None:
        for pos in slots:
            if pos in self.native_pos:
                self.native[pos] = native_copy(frame)
                return  # a frame in several slots is kept once

    def native_frames(self) -> np.ndarray | None:
        """The frames kept at the source's aspect ratio, in order, as uint8 (k, h, w, 3); None when none was
        asked for. Call after `result`. A frame whose size differs from the first one's (a stream that changes
        size midway) is left out."""
        frames = [self.native[p] for p in sorted(self.native)]
        frames = [f for f in frames if f.shape == frames[0].shape]
        return np.stack(frames) if frames else None

    def result(self) -> tuple[np.ndarray, bytes]:
        """Wait for the resizes; the decoding thread, now free, takes over those the pool has not started."""
        try:
            for f, job in reversed(self._queued):  # the pool works from the front
                if f.cancel():
                    self._one(job.slots, job.frame)
            for f, _ in self._queued:
                if not f.cancelled():
                    f.result()
        except Exception as e:  # noqa: BLE001
            raise DecodeError("transform", short_message(e)) from None
        finally:
            self._release()
        assert self.out is not None
        return self.out, self.thumbnail

    def drain(self) -> None:
        """Cancel or wait for queued work, ignoring its errors (the caller is already failing)."""
        for f, _ in self._queued:
            if not f.cancel():
                f.exception()
        self._release()

    def _release(self) -> None:
        for _, job in self._queued:
            job.clear()
        self._queued = []


__all__ = ["NATIVE_MAX_SIDE", "DecodeError", "DecodeTimeout", "FrameCollector", "Source", "THUMBNAIL_MAX_WIDTH",
           "native_copy", "open_source", "resize_pool", "short_message", "spread_positions", "thumbnail_jpeg"]
