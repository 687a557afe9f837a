"""The moments of long recordings in one run (jobs with `segments.mode` fixed or shots), owned by `JobSinks`.

The decode stage emits a video's segment rows before its video row, but Ray Data may hand them to the sink in
any order and in different batches. The video row is what marks an object done, so a video is held back until
all its segment rows have come (`segment_rows` on the video row says how many), and its segments are committed
before it. One failed segment fails the video (it is retried whole); segments of a failed video are dropped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.io.indexes import maintain_indexes
from pipeline.io.listing import WORK
from pipeline.io.sinks import answers_and_text, is_null
from pipeline.io.tables import TableStore
from schemas import media_fragment, segment_schema

Row = dict[str, Any]


class SegmentSink:
    def __init__(self, store: TableStore, *, config_hash: str, run_id: str):
        self.store, self.config_hash, self.run_id = store, config_hash, run_id
        self._held: dict[str, Row] = {}  # video rows waiting for their segment rows
        self._results: dict[str, list[Row]] = {}  # segment rows waiting for their video row
        self._failed: set[str] = set()  # videos that failed this run
        self._held_failures: dict[str, Row] = {}  # a segment failed before its video row came

    # ---- routing the stages' rows ----------------------------------------------------------------------

    def take(self, r: Row, bad: list[Row]) -> None:
        """A segment row (a result or a failure; a failure that fails a held video goes to `bad`)."""
        vid = r["video_id"]
        if vid in self._failed:
            return  # its video already failed: the segment is dropped with it
        if is_null(r.get("error_stage")):
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
            expected = 0 if is_null(r.get("segment_rows")) else int(r["segment_rows"])
            if len(self._results.get(vid, ())) >= expected:
                done.append(self._held.pop(vid))
        return done

    def incomplete(self) -> list[Row]:
        """Videos still waiting at the end of the run (only if rows were lost on the way): never index half."""
        lost = [*self._held.values(), *self._held_failures.values()]
        self._held, self._held_failures = {}, {}
        return lost

    # ---- table rows ------------------------------------------------------------------------------------

    def rows(self, video: Row, now: datetime) -> list[Row]:
        """The segments table's rows of a completed video; a video no longer than one segment is its own."""
        parts = sorted(self._results.pop(video["video_id"], []), key=lambda s: int(s["segment"]))
        if not parts:
            end = video.get("end_s")
            end = float(video.get("duration_s") or 0.0) if is_null(end) else float(end)
            parts = [{**video, "segment_id": f"{video['video_id']}:00000", "segment": 0, "start_s": 0.0,
                      "end_s": end}]
        return [self._row(p, now) for p in parts]

    def _row(self, r: Row, now: datetime) -> Row:
        answers, text = answers_and_text(r)
        start, end = float(r["start_s"]), float(r["end_s"])
        return {
            "segment_id": r["segment_id"], "video_id": r["video_id"], "content_id": r.get("content_id") or "",
            "config_hash": self.config_hash, "segment": int(r["segment"]), "start_s": start, "end_s": end,
            "uri": r["uri"], "media_fragment": media_fragment(r["uri"], start, end), "copy_of": None,
            "run_id": self.run_id, "caption": r.get("caption"), "answers": answers, "answers_text": text,
            "caption_embedding": r.get("caption_embedding"), "visual_embedding": r.get("visual_embedding"),
            "frame_indices": r.get("frame_indices"), "thumbnail": r.get("thumbnail") or None,
            "indexed_at": now, "part": None,
        }

    def copies(self, copy_rows: list[Row], fresh: list[Row], now: datetime) -> list[Row]:
        """The segments of exact copies: their source's segments (`fresh`, or the table) under the copy's id."""
        by_video: dict[str, list[Row]] = {}
        for seg in fresh:
            by_video.setdefault(seg["video_id"], []).append(seg)
        sources = {r["copy_of"] or r["video_id"] for r in copy_rows}
        missing = sorted(v for v in sources if v not in by_video)
        found = self.store.lookup(self.config_hash, "video_id", missing) if missing else None
        for seg in ([] if found is None else found.to_pylist()):
            by_video.setdefault(seg["video_id"], []).append(seg)
        out = []
        for r in copy_rows:
            source = r["copy_of"] or r["video_id"]
            if source == r["video_id"]:
                continue  # a refresh of the same object: its segments are already there
            for seg in by_video.get(source, []):
                out.append({**seg, "segment_id": f"{r['video_id']}:{int(seg['segment']):05d}",
                            "video_id": r["video_id"], "content_id": r["content_id"], "uri": r["uri"],
                            "media_fragment": media_fragment(r["uri"], seg["start_s"], seg["end_s"]),
                            "copy_of": source, "run_id": self.run_id, "indexed_at": now, "part": None})
        return out

    # ---- writing ---------------------------------------------------------------------------------------

    def commit(self, segs: list[Row], videos: list[str], dims: dict[str, int | None]) -> None:
        """The new segments, and the removal of these videos' older segments that the new ones do not replace
        (a changed file may have fewer moments). The caller holds the index lock."""
        schema = segment_schema(dims["caption_embedding"], dims["visual_embedding"])
        self.store.schema = schema
        rows = list({(s["segment_id"], s["config_hash"]): s for s in segs}.values())
        new = {r["segment_id"] for r in rows}
        old = self.store.lookup(self.config_hash, "video_id", sorted(set(videos)), ["segment_id"])
        stale = [(sid, self.config_hash) for sid in ([] if old is None else old.column("segment_id").to_pylist())
                 if sid not in new]
        self.store.commit(pa.Table.from_pylist(rows, schema=schema), deletes=stale, run_id=self.run_id)

    def maintain_indexes(self) -> None:
        if self.store.lance_table is not None:
            maintain_indexes(self.store.lance_table, fts_columns=("caption", "answers_text"),
                             scalar_columns=("video_id", "segment_id"),
                             vector_columns=("caption_embedding", "visual_embedding"))


__all__ = ["SegmentSink"]
