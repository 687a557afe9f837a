"""Everything one run writes, owned by the driver: results and the error ledger (each a `TableStore`: Parquet +
LanceDB, exactly once), exact copies resolved to the result they reuse, and the run manifest.

Layout: Parquet datasets `<output.parquet>/<table>/` and `<output.parquet>/<errors_table>/`; LanceDB tables
`<table>` and `<errors_table>` in `<output.lancedb>`; the manifest at `<output.manifest_dir>/<run_id>.json`
(default `<output.parquet or output.lancedb>/_manifests/`), rewritten as the run goes (status `running`, a
heartbeat, counts so far) and at its end (`succeeded` / `failed`). One writer at a time per index: every
commit holds the index lock (`pipeline.io.locks`), so two runs on one index interleave their commits.

Per batch, in this order (a crash between two steps leaves an object either indexed or retried, never lost or
doubled): the ledger drops the objects that now succeeded and records the failures (attempts, first/last
seen), then the segments table takes the moments of the new rows (jobs with `segments`), then the results
take the new rows — the video row is what marks an object done, so a video is held back until all its
segments have arrived, and is written with them (`pipeline.io.segment_sinks`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from pipeline.io.indexes import maintain_indexes
from pipeline.io.listing import COPY, SEGMENT, TALLY, TALLY_FIELDS, WORK, IndexLocation
from pipeline.io.locks import IndexLock
from pipeline.io.segment_sinks import SegmentSink
from pipeline.io.sinks import (
    answers_and_text,
    check_existing,
    is_null,
    join_path,
    mark_interrupted,
    to_records,
    utc_now,
    write_manifest,
)
from pipeline.redact import redact
from schemas import embedding_dims, error_schema, video_schema

if TYPE_CHECKING:
    from pipeline.jobs import JobConfig

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
COUNT_KEYS = ("listed", "skipped", "known_bad", "indexed", "copies", "errors", "model_calls")
# Columns a copy takes from its own listing row; everything else comes from the row whose result it reuses.
_OWN = ("video_id", "content_id", "uri", "size", "etag")


class JobSinks:
    def __init__(self, job: JobConfig, *, run_id: str, config_hash: str, model_id: str):
        self.job, self.run_id, self.config_hash, self.model_id = job, run_id, config_hash, model_id
        self.questions_hash = job.questions_hash()
        out = job.output
        self.s3 = out.s3
        self.index = IndexLocation(parquet_root=out.parquet, lancedb=out.lancedb, videos_table=out.table,
                                   errors_table=out.errors_table, s3=out.s3, segments_table=out.segments_table)
        self.lock = IndexLock(self.index.lock_root, out.s3)
        self.videos, self.errors = self.index.stores()
        self.segments = None if job.segments.mode == "whole" else SegmentSink(
            self.index.segment_store(), config_hash=config_hash, run_id=run_id)
        with self.lock:  # finish or discard what a crashed run left, before anything reads the index
            self.videos.recover()
            self.errors.recover()
            if self.segments is not None:
                self.segments.store.recover()
        self.errors.schema = error_schema()
        if (existing := self.errors.existing_schema()) is not None:
            check_existing(existing, self.errors.schema, f"errors table '{out.errors_table}'")
        self.dims: dict[str, int | None] = {"caption_embedding": None, "visual_embedding": None}
        if (schema := self.videos.existing_schema()) is not None:
            self.dims.update(embedding_dims(schema))
            check_existing(schema, video_schema(self.dims["caption_embedding"] or 1,
                                                self.dims["visual_embedding"] or 1), f"table '{out.table}'")
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNT_KEYS, 0))
        self._unwritten: list[dict[str, Any]] = []  # results waiting for the embedding sizes
        self._unwritten_segments: list[dict[str, Any]] = []
        self._content_done: dict[str, str] = {}  # content_id → video_id of its result, this run
        self._content_failed: dict[str, dict[str, Any]] = {}  # content_id → the failure, this run
        self._pending_copies: dict[str, list[dict[str, Any]]] = {}  # copies waiting for their content's result
        self._manifest: dict[str, Any] = {}
        self._beat = 0.0

    # ---- results ---------------------------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        return video_schema(self.dims["caption_embedding"], self.dims["visual_embedding"])

    def _video_row(self, r: dict[str, Any], now: datetime) -> dict[str, Any]:
        answers, answers_text = answers_and_text(r)
        return {
            "video_id": r["video_id"], "content_id": r.get("content_id") or "", "uri": r["uri"],
            "size": r["size"], "etag": r["etag"], "copy_of": None, "run_id": self.run_id,
            "model_id": self.model_id, "config_hash": self.config_hash, "questions_hash": self.questions_hash,
            "caption": r.get("caption"), "answers": answers, "answers_text": answers_text,
            "caption_embedding": r.get("caption_embedding"), "visual_embedding": r.get("visual_embedding"),
            "duration_s": r.get("duration_s"), "fps": r.get("fps"), "width": r.get("width"),
            "height": r.get("height"), "codec": r.get("codec"), "decoder": r.get("decoder"),
            "n_frames": r.get("n_frames"), "frame_indices": r.get("frame_indices"),
            "thumbnail": r.get("thumbnail") or None,
            "timings": {k: r.get(k) for k in ("fetch_s", "decode_s", "model_s", "embed_s")},
            "indexed_at": now, "part": None,
        }

    def _copy_rows(self, copies: list[dict[str, Any]], source: dict[str, Any], now: datetime) -> list[dict]:
        """Rows for exact copies of `source` (a results row): its results, their own identity."""
        out = []
        for c in copies:
            row = dict(source)
            row.update({k: c[k] for k in _OWN})
            # A refresh (the same object, touched but unchanged) keeps its own provenance.
            copy_of = source["copy_of"] if source["video_id"] == c["video_id"] else (
                source["copy_of"] or source["video_id"])
            row.update(copy_of=copy_of, run_id=self.run_id, indexed_at=now, part=None)
            out.append(row)
        return out

    def _ledger_row(self, r: dict[str, Any], now: datetime, stage: str, error_type: str, message: str,
                    retryable: bool) -> dict[str, Any]:
        prev = r.get("prev_attempts")
        first = r.get("first_seen")
        return {
            "video_id": r["video_id"], "config_hash": self.config_hash, "uri": r["uri"], "etag": r.get("etag"),
            "size": None if is_null(r.get("size")) else int(r["size"]), "content_id": r.get("content_id"),
            "stage": stage, "error_type": error_type, "message": redact(message), "retryable": bool(retryable),
            "attempts": (0 if is_null(prev) else int(prev)) + 1,
            "first_seen": now if is_null(first) else pd.Timestamp(first).to_pydatetime(), "last_seen": now,
            "run_id": self.run_id, "part": None,
        }

    def _sources_of(self, video_ids: list[str]) -> dict[str, dict[str, Any]]:
        found = self.videos.lookup(self.config_hash, "video_id", sorted(set(video_ids)))
        return {} if found is None else {r["video_id"]: r for r in found.to_pylist()}

    def _resolve_copies(self, copies: list[dict[str, Any]], now: datetime,
                        fresh: dict[str, dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        """(result rows, ledger rows) for copies whose source is known (`fresh`: results about to be committed
        with them, by video_id; else the index); the others wait."""
        rows: list[dict] = []
        bad: list[dict] = []
        by_source: dict[str, list[dict]] = {}
        for c in copies:
            cid = c.get("content_id")
            if not is_null(c.get("copy_of")):
                by_source.setdefault(c["copy_of"], []).append(c)
            elif cid in self._content_done:
                by_source.setdefault(self._content_done[cid], []).append(c)
            elif cid in self._content_failed:
                f = self._content_failed[cid]
                bad.append(self._ledger_row(c, now, f["stage"], f["error_type"],
                                            f"an exact copy of {f['uri']}, which failed: {f['message']}",
                                            f["retryable"]))
            else:
                self._pending_copies.setdefault(cid, []).append(c)
        sources = self._sources_of([v for v in by_source if v not in fresh])
        sources.update({v: fresh[v] for v in by_source if v in fresh})
        for vid, group in by_source.items():
            if vid in sources:
                rows += self._copy_rows(group, sources[vid], now)
            else:  # its source went away meanwhile (another run replaced it): do the work next run
                for c in group:
                    bad.append(self._ledger_row(c, now, "copy", "SourceGone",
                                                f"the result this exact copy reuses ({vid}) is gone", True))
        return rows, bad

    def write(self, batch: pd.DataFrame) -> dict[str, int]:
        """One batch of the stages' rows (work results, copies, tallies) → both tables, committed."""
        now = utc_now()
        before = Counter(self.counts)
        records = to_records(batch)
        ok, bad, copies = [], [], []
        for r in records:
            kind = r.get("kind") or WORK
            if kind == TALLY:
                for f in TALLY_FIELDS:
                    self.counts[f] += int(r.get(f) or 0)
            elif kind == COPY:
                copies.append(r)
            elif kind == SEGMENT:
                if self.segments is not None:
                    self.segments.take(r, bad)
            elif is_null(r.get("error_stage")):
                ok.append(r)
            else:
                bad.append(r)
            self.counts["model_calls"] += int(r.get("model_calls") or 0)
        if self.segments is not None:
            ok = self.segments.complete(ok, bad)
            for r in bad:
                self.segments.video_failed(r["video_id"])
        results = [self._video_row(r, now) for r in ok]
        for r in ok:
            if r.get("content_id"):
                self._content_done[r["content_id"]] = r["video_id"]
        ledger = []
        for r in bad:
            ledger.append(self._ledger_row(r, now, r["error_stage"], r.get("error_type") or "Error",
                                           r.get("error_message") or "", bool(r.get("error_retryable"))))
            if r.get("content_id"):
                self._content_failed[r["content_id"]] = {
                    "uri": r["uri"], "stage": r["error_stage"], "error_type": r.get("error_type") or "Error",
                    "message": r.get("error_message") or "", "retryable": bool(r.get("error_retryable"))}
        # Copies waiting for a content that has now succeeded or failed in this batch.
        for cid in list(self._pending_copies):
            if cid in self._content_done or cid in self._content_failed:
                copies += self._pending_copies.pop(cid)
        segments = [] if self.segments is None else [s for r in ok for s in self.segments.rows(r, now)]
        self._commit(results, ledger, copies, now, segments)
        self.counts["indexed"] += len(ok)
        self.counts["errors"] += len(bad)
        self._heartbeat()
        return {k: self.counts[k] - before[k] for k in COUNT_KEYS}

    def _commit(self, results: list[dict], ledger: list[dict], copies: list[dict], now: datetime,
                segments: list[dict] | None = None) -> None:
        for col in self.dims:
            if self.dims[col] is None:
                self.dims[col] = next((len(r[col]) for r in results if r.get(col) is not None), None)
        with self.lock:  # lookups of copy sources and the commits see one state of the index
            fresh = {r["video_id"]: r for r in self._unwritten + results}
            copy_rows, copy_bad = self._resolve_copies(copies, now, fresh) if copies else ([], [])
            ledger += copy_bad
            rows = self._unwritten + results + copy_rows
            segs = self._unwritten_segments + (segments or [])
            if self.segments is not None and copy_rows:
                segs += self.segments.copies(copy_rows, segs, now)
            if rows and any(d is None for d in self.dims.values()):
                self._unwritten, self._unwritten_segments = rows, segs  # embedding sizes unknown: keep for now
                rows, segs = [], []
            else:
                self._unwritten, self._unwritten_segments = [], []
            done_keys = [(r["video_id"], self.config_hash) for r in rows]
            if ledger or done_keys:
                upserts = pa.Table.from_pylist(_last_per_key(ledger), schema=self.errors.schema) if ledger else None
                self.errors.commit(upserts, deletes=done_keys, run_id=self.run_id)
            if segs and self.segments is not None:  # before the video rows, which mark the videos done
                self.segments.commit(segs, [r["video_id"] for r in rows], self.dims)
            if rows:
                self.videos.schema = self.schema
                self.videos.commit(pa.Table.from_pylist(_last_per_key(rows), schema=self.schema),
                                   run_id=self.run_id)
        self.counts["copies"] += len(copy_rows)
        self.counts["errors"] += len(copy_bad)

    def finish(self) -> None:
        """Resolve the copies still waiting (their content's result came from another run meanwhile, or
        never came), then fold the new rows into the search indexes."""
        now = utc_now()
        waiting = [c for group in self._pending_copies.values() for c in group]
        self._pending_copies = {}
        if waiting:
            found = self.videos.lookup(self.config_hash, "content_id",
                                       sorted({c["content_id"] for c in waiting}), ["content_id", "video_id"])
            known = {} if found is None else dict(zip(found.column("content_id").to_pylist(),
                                                      found.column("video_id").to_pylist(), strict=True))
            resolvable = []
            for c in waiting:
                if c["content_id"] in known:
                    resolvable.append({**c, "copy_of": known[c["content_id"]]})
                else:
                    self._content_failed.setdefault(c["content_id"], {
                        "uri": c["uri"], "stage": "copy", "error_type": "NoResult",
                        "message": "no result for this content was produced", "retryable": True})
                    resolvable.append(c)
            self._commit([], [], resolvable, now)
        lost = [] if self.segments is None else self.segments.incomplete()
        if lost:
            self._commit([], [self._ledger_row(r, now, "segments", "IncompleteSegments",
                                               "not all segments of this video came back", True) for r in lost],
                         [], now)
        if self._unwritten:
            raise ValueError(f"{len(self._unwritten)} row(s) not written: all their embeddings are null, so "
                             "the embedding sizes are unknown")
        if self.counts["indexed"] + self.counts["copies"] and self.videos.lance_table is not None:
            maintain_indexes(self.videos.lance_table, fts_columns=("caption", "answers_text"),
                             scalar_columns=("video_id", "content_id"),
                             vector_columns=("caption_embedding", "visual_embedding"))
            if self.segments is not None:
                self.segments.maintain_indexes()

    # ---- manifest --------------------------------------------------------------------------------------

    def locations(self) -> dict[str, Any]:
        out = self.job.output
        loc: dict[str, Any] = {"table": out.table, "errors_table": out.errors_table}
        if out.parquet:
            loc["parquet"] = join_path(out.parquet, out.table)
            loc["errors_parquet"] = join_path(out.parquet, out.errors_table)
        if out.lancedb:
            loc["lancedb"] = out.lancedb
        loc["manifest"] = self.manifest_path()
        return loc

    def manifest_dir(self) -> str:
        out = self.job.output
        return out.manifest_dir or join_path(out.parquet or out.lancedb or ".", "_manifests")

    def manifest_path(self) -> str:
        return join_path(self.manifest_dir(), f"{self.run_id}.json")

    def start_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Write the manifest now (status running), and mark earlier runs that died while running."""
        mark_interrupted(self.manifest_dir(), self.s3)
        self._manifest = {**manifest, "status": "running", "job_config": self.job.redacted()}
        self._write_manifest()

    def _heartbeat(self) -> None:
        if time.monotonic() - self._beat >= HEARTBEAT_S:
            self._write_manifest()

    def _write_manifest(self, **final: Any) -> None:
        self._manifest.update(final)
        self._manifest["counts"] = {k: self.counts[k] for k in COUNT_KEYS}
        self._manifest["heartbeat_at"] = utc_now().isoformat()
        self._manifest["outputs"] = self.locations()
        write_manifest(self.manifest_path(), self._manifest, s3=self.s3)
        self._beat = time.monotonic()

    def end_manifest(self, **final: Any) -> dict[str, Any]:
        if "error" in final and final["error"]:
            final["error"] = redact(str(final["error"]))
        self._write_manifest(**final)
        return dict(self._manifest)


def _last_per_key(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (video_id, config_hash), the last given (a merge with two rows for one key is refused)."""
    return list({(r["video_id"], r["config_hash"]): r for r in rows}.values())


__all__ = ["JobSinks", "COUNT_KEYS"]
