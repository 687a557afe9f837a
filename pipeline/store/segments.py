"""The moments of long recordings in one run (jobs with `segments.mode` fixed or shots), held by the writer.

The decode stage emits a video's segment rows before its video row, but Ray Data may hand them to the writer in
any order and in different batches. A video's cells are written with all its segments' cells, so a video is held
back until all its segment rows have come (`segment_rows` on the video row says how many). One failed segment
fails the video (it is retried whole); segments of a failed video are dropped.
"""

from __future__ import annotations

from typing import Any

from schemas.stages import WORK

Row = dict[str, Any]


class SegmentHold:
    def __init__(self) -> None:
        self._held: dict[str, Row] = {}  # video rows waiting for their segment rows
        self._results: dict[str, list[Row]] = {}  # segment rows waiting for their video row
        self._failed: set[str] = set()  # videos that failed this run
        self._held_failures: dict[str, Row] = {}  # a segment failed before its video row came

    def take(self, r: Row, bad: list[Row]) -> None:
        """A segment row (a result or a failure; a failure that fails a held video goes to `bad`)."""
        vid = r["video_id"]
        if vid in self._failed:
            return  # its video already failed: the segment is dropped with it
        if r.get("error_stage") is None:
            self._results.setdefault(vid, []).append(r)
            return
        self.video_failed(vid)
        held = self._held.pop(vid, None)
        failed = dict(held or r)
        failed.update(kind=WORK, error_stage=r["error_stage"], error_type=r.get("error_type"),
                      error_message=f"segment {r.get('segment')}: {r.get('error_message') or ''}",
                      error_retryable=bool(r.get("error_retryable")))
        if held is not None:
            bad.append(failed)
        else:
            self._held_failures[vid] = failed

    def video_failed(self, vid: str) -> None:
        self._failed.add(vid)
        self._results.pop(vid, None)

    def complete(self, ok: list[Row], bad: list[Row]) -> list[Row]:
        """Of the video rows so far (these and the held ones), those whose segment rows have all come."""
        for r in ok:
            vid = r["video_id"]
            if vid in self._held_failures:  # a segment failed before its video row came
                self._failed.add(vid)
                bad.append({**self._held_failures.pop(vid), **{k: r[k] for k in ("uri", "etag", "size")}})
            else:
                self._held[vid] = r
        done = []
        for vid, r in list(self._held.items()):
            if len(self._results.get(vid, ())) >= int(r.get("segment_rows") or 0):
                done.append(self._held.pop(vid))
        return done

    def segments_of(self, vid: str) -> list[Row]:
        """A completed video's segment rows, in order (none when it needed no segment work)."""
        return sorted(self._results.pop(vid, []), key=lambda s: int(s["segment"]))

    def incomplete(self) -> list[Row]:
        """Videos still waiting at the end of the run (only if rows were lost on the way): never index half."""
        lost = [*self._held.values(), *self._held_failures.values()]
        self._held, self._held_failures = {}, {}
        return lost


__all__ = ["SegmentHold"]
