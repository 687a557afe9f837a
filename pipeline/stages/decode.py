"""The decode stage: `listing_schema` rows in, `decoded_schema` rows out (schemas/stages.py).

Rows carry keys, not bytes: the decode actor fetches the object itself (to a spool file: memory stays bounded
whatever the file's size), probes it, samples the model's frames (resized and cropped to the model's input: ≈ T·150
KB) and computes the curation signals from them. Only `work` rows are worked on; `copy` rows pass through. A
failure becomes the row's `error_*` fields and the row keeps flowing, so the writer records it and the job goes on.
A long recording's moments (segment jobs) come as rows of their own before the video's row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.redact import redact
from pipeline.run_stats import Reporter
from schemas.stages import SEGMENT, WORK, decoded_schema

SEGMENT_BLOCK_ROWS = 8  # rows per output block of a segmented video: a few windows' frames in memory at a time


def failed(row: dict[str, Any], stage: str, exc: BaseException, retryable: bool = False) -> dict[str, Any]:
    row.update(error_stage=stage, error_type=type(exc).__name__, error_message=redact(str(exc) or repr(exc)),
               error_retryable=retryable)
    return row


class DecodeStage:
    """Decode actor: fetch the bytes, probe, sample the model's frames, resize/crop to the model's input size."""

    def __init__(self, num_frames: int, image_size: int, timeout_s: float, s3_options: Any = None, nice: int = 0,
                 frame_sampling: str = "original", max_bytes: int | None = None,
                 fetch_timeout_s: float | None = None, segments: dict[str, Any] | None = None,
                 scores: dict[str, Any] | None = None, hub: Any = None):
        from pipeline.decode.scores import Scorer

        if nice > os.getpriority(os.PRIO_PROCESS, 0):
            # Lower CPU priority for this actor and its decode subprocess (inherited): decoding fills the cycles
            # the model actors leave, instead of slowing the slowest stage where they share cores.
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self.image_size = image_size
        self.timeout_s = timeout_s
        self.s3_options = s3_options
        self.max_bytes, self.fetch_timeout_s = max_bytes, fetch_timeout_s
        self.segments = segments if segments and segments.get("mode", "whole") != "whole" else None
        self.scorer = Scorer(scores or {})  # the job's curation signals (`scores`: none without it)
        self.schema = decoded_schema()
        self.report = Reporter(hub, "decode")

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """A few rows per call (Ray Data's per-task overhead costs more CPU than decoding a short clip); a
        segmented video's rows go out a few at a time, as they are decoded."""
        out: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        errors = 0
        for row in batch.to_pylist():
            for decoded in self.decode(row):
                out.append(decoded)
                errors += decoded["error_stage"] is not None
                if len(out) >= SEGMENT_BLOCK_ROWS:
                    yield pa.Table.from_pylist(out, schema=self.schema)
                    out = []
        if out:
            yield pa.Table.from_pylist(out, schema=self.schema)
        self.report.add(rows=batch.num_rows, busy_s=time.perf_counter() - t0, errors=errors)

    def decode(self, listed: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The rows of one listed object: itself when there is nothing to decode (`copy`), else — after a row per
        moment for a segmented video that needs them — its own row, with its frames and what decoding found, or
        the failure. The one path from fetch to frames, for whole videos and long recordings alike."""
        from pipeline.decode import decode_video
        from pipeline.io.fetch import TransientFetchError, fetched

        base = {**dict.fromkeys(self.schema.names), **listed, "error_retryable": False}
        base["kind"] = base["kind"] or WORK
        if base["kind"] != WORK:
            yield base
            return
        segmented = self.segments is not None and bool(base.get("need_segments"))
        t0 = time.perf_counter()
        try:
            with fetched(base["uri"], self.s3_options, max_bytes=self.max_bytes,
                         deadline_s=self.fetch_timeout_s) as path:
                try:
                    v = decode_video(path, num_frames=self.num_frames, size=self.image_size,
                                     timeout_s=self.timeout_s, sampling=self.frame_sampling, native=self.scorer.native)
                    video = self._fill(base, v, t0)
                    plan, index, cuts = self._plan(path, video) if segmented else ([], None, None)
                except Exception as e:  # noqa: BLE001 — any decode failure becomes an error record
                    yield failed(base, "decode", e)
                    return
                video.update(self.scorer(v.frames, v.frame_indices, v.fps, v.native_frames, cuts, name=video["uri"]))
                n = 0
                if len(plan) > 1:
                    try:
                        for seg in self._segments(path, plan, index):
                            yield self._segment_row(video, seg, cuts)
                            n += 1
                    except Exception as e:  # noqa: BLE001 — the video fails whole (the writer drops its segments)
                        yield failed(video, "segments", e)
                        return
                video.update(segment_rows=n)
                if segmented:
                    video.update(start_s=0.0, end_s=plan[-1].end_s)
                yield video
        except TransientFetchError as e:
            yield failed(base, "fetch", e, retryable=True)
        except Exception as e:  # noqa: BLE001 — any fetch failure becomes an error record
            yield failed(base, "fetch", e)

    def decode_row(self, listed: dict[str, Any]) -> dict[str, Any]:
        """The object's own row (`decode` without the moments' rows)."""
        *_, row = self.decode(listed)
        return row

    def _plan(self, path: str, video: dict[str, Any]) -> tuple[list[Any], Any, list[int] | None]:
        from pipeline.decode.segments import frame_index, segment_plan

        spec = {k: self.segments[k] for k in ("length_s", "overlap_s", "min_s", "max_s", "threshold")}
        index = frame_index(path)  # one demux pass, for the plan and the decoding
        plan, cuts = segment_plan(path, self.segments["mode"], frames=index, fps=video["fps"], **spec)
        return plan, index, cuts

    def _segments(self, path: str, plan: list[Any], index: Any) -> Iterator[Any]:
        """The moments' frames, in order, one pass; the whole-file deadline applies per moment."""
        from pipeline.decode.segments import decode_segments

        started = time.perf_counter()
        for n, seg in enumerate(decode_segments(path, plan, self.num_frames, self.image_size, self.frame_sampling,
                                                frames=index, native=self.scorer.native), 1):
            yield seg
            if time.perf_counter() - started > self.timeout_s * (n + 1):
                raise TimeoutError(f"segment decoding exceeded {self.timeout_s:g}s per segment")

    @staticmethod
    def _fill(row: dict[str, Any], v: Any, t0: float) -> dict[str, Any]:
        row.update(frames=v.frames.tobytes(), frames_shape=list(v.frames.shape),
                   frame_indices=[int(i) for i in v.frame_indices], duration_s=v.duration_s, fps=v.fps,
                   width=v.width, height=v.height, codec=v.codec, decoder=v.decoder, n_frames=v.n_frames,
                   thumbnail=v.thumbnail_jpeg, decode_s=time.perf_counter() - t0)
        return row

    def _segment_row(self, video: dict[str, Any], seg: Any, cuts: list[int] | None) -> dict[str, Any]:
        row = dict(video)
        s = seg.segment
        row.update(kind=SEGMENT, segment_id=f"{video['video_id']}:{s.index:05d}", segment=s.index,
                   start_s=s.start_s, end_s=s.end_s, frames=seg.frames.tobytes(), frames_shape=list(seg.frames.shape),
                   frame_indices=[int(i) for i in seg.frame_indices], thumbnail=seg.thumbnail_jpeg)
        row.update(self.scorer(seg.frames, seg.frame_indices, video["fps"], seg.native_frames, cuts,
                               (s.start_frame, s.end_frame), name=row["segment_id"]))
        return row


__all__ = ["DecodeStage", "SEGMENT_BLOCK_ROWS", "failed"]
