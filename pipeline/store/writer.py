"""Everything one run writes to its index, owned by the driver: `IndexWriter`.

Per batch of the stages' rows (results, failures, copies, tallies), in this order under the index lock — a crash
between two steps leaves an object either done or retried, never lost or doubled:
  1. the ledger drops the objects that now succeeded and records the failures;
  2. the cells the model computed are committed (`pipeline.store.cells`): the history, keyed by derivation;
  3. the view rows of those objects (and of copies, whose cells exist) are rebuilt from ALL their cells under the
     registry's rule (`pipeline.store.view`), the segments view first, then `videos`: the `videos` row, whose
     `jobs_done` names this job, is what marks an object done.
A long recording's video row is held back until all its segment rows have come (`pipeline.store.segments`).
An exact copy of a content this run is still computing waits for that content's cells.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pyarrow as pa

from pipeline.io.sources import S3Options
from pipeline.store.cells import JobSpec, cells_table, new_cells, plan_cell, segment_scope
from pipeline.store.commit import check_existing
from pipeline.store.files import utc_now
from pipeline.store.ledger import failure_row, ledger_row, ledger_table
from pipeline.store.location import IndexLocation
from pipeline.store.locks import IndexLock
from pipeline.store.registry import load_registry, plan_of, register
from pipeline.store.search_indexes import maintain_indexes
from pipeline.store.segments import SegmentHold
from pipeline.store.view import group_cells, segment_rows, video_row
from schemas import embedding_dims, segment_schema, video_schema
from schemas.stages import COPY, SEGMENT, TALLY_FIELDS

log = logging.getLogger(__name__)
# the columns lookups filter on, by table key (created while a run goes: the first run of an archive needs them)
SCALAR_INDEXES = {"video_id": ("video_id", "content_id"), "cell_id": ("cell_id", "content_id"),
                  "segment_id": ("segment_id", "video_id")}
COUNT_KEYS = ("listed", "skipped", "known_bad", "deferred", "indexed", "copies", "errors", "model_calls", "decoded",
              "visual_encodings", "cells_reused")
Row = dict[str, Any]


class IndexWriter:
    def __init__(self, location: IndexLocation, spec: JobSpec | None, *, run_id: str,
                 legacy_hash: str | None = None):
        """`spec`: what the running job asks (None: no job — views rebuilt from cells, as `prune` does);
        `legacy_hash`: the job's schema-2 `config_hash`, for migrating an index an earlier release made."""
        self.location, self.spec, self.run_id = location, spec, run_id
        self.s3: S3Options | None = location.s3
        self.lock = IndexLock(location.root, self.s3)
        self.videos, self.cells, self.errors = location.videos(), location.cells(), location.errors()
        self.segments = location.segments()
        with self.lock:  # finish or discard what a crashed run left, then say what this job asks
            from pipeline.store.migrate import migrate

            if spec is not None:
                migrate(location, spec, legacy_hash)
            for store in self._stores():
                store.recover()
            registry = register(location.roots, spec, run_id, self.s3) if spec is not None else load_registry(
                location.root, self.s3)
        self.plan = plan_of(registry)
        for what in self.plan.conflicts(spec) if spec is not None else []:
            log.warning("job '%s' also asks for %s: its results are kept in the cells table (search --model)",
                        spec.job, what)
        if self.plan.segmentation is None and self.segments.existing_schema() is None:
            self.segments = None  # no job segments this index
        self.dims: dict[str, int | None] = {"caption_embedding": None, "visual_embedding": None}
        for store, schema_of in ((self.videos, video_schema), (self.segments, segment_schema)):
            if store is not None and (schema := store.existing_schema()) is not None:
                self.dims.update(embedding_dims(schema))
                check_existing(schema, schema_of(self.dims["caption_embedding"] or 1,
                                                 self.dims["visual_embedding"] or 1), store.where)
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNT_KEYS, 0))
        self.generations: Counter[str] = Counter(caption=0, answer=0)
        self.hold = SegmentHold() if spec is not None and spec.segmentation else None
        self._content_done: dict[str, str] = {}  # content_id → the object that carried its work, this run
        self._content_failed: dict[str, Row] = {}  # content_id → its failure, this run
        self._pending_copies: dict[str, list[Row]] = {}  # copies waiting for their content's cells
        self._unwritten: list[Row] = []  # objects waiting for the embedding sizes (no vector seen yet)

    @property
    def _spec_hash(self) -> str:
        return self.spec.spec if self.spec is not None else ""

    def _stores(self):
        return [s for s in (self.errors, self.cells, self.segments, self.videos) if s is not None]

    def add_tally(self, counts: dict[str, int]) -> None:
        """The listing's counts (listed, skipped, known-bad, deferred): they travel outside the rows."""
        for f in TALLY_FIELDS:
            self.counts[f] += int(counts.get(f) or 0)

    def counts_json(self) -> dict[str, Any]:
        return {**{k: self.counts[k] for k in COUNT_KEYS}, "generations": dict(self.generations)}

    # ---- one batch -------------------------------------------------------------------------------------

    def write(self, batch: pa.Table | list[Row]) -> None:
        """One batch of the stages' rows → the index, committed."""
        records = batch.to_pylist() if isinstance(batch, pa.Table) else list(batch)
        ok: list[Row] = []
        bad: list[Row] = []
        copies: list[Row] = []
        for r in records:
            kind = r.get("kind")
            self.counts["model_calls"] += int(r.get("model_calls") or 0)
            if kind == COPY:
                copies.append(r)
                self.counts["cells_reused"] += int(r.get("reused") or 0)
            elif kind == SEGMENT:
                if self.hold is not None:
                    self.hold.take(r, bad)
            elif r.get("error_stage") is None:
                ok.append(r)
            else:
                bad.append(r)
        if self.hold is not None:
            ok = self.hold.complete(ok, bad)
            for r in bad:
                self.hold.video_failed(r["video_id"])
        now = utc_now()
        cells: list[Row] = []
        for r in ok:
            cells += self._cells_of(r, now)
        ledger = [failure_row(r, self._spec_hash, self.run_id, now) for r in bad]
        for r in bad:
            if r.get("content_id"):
                self._content_failed[r["content_id"]] = r
        self._commit(ok, cells, copies, ledger, now)
        self.counts["indexed"] += len(ok)
        self.counts["errors"] += len(bad)

    def _cells_of(self, r: Row, now: Any) -> list[Row]:
        """The cells a model result made: the video's, and with segments its moments' and their plan."""
        self.counts["decoded"] += 1
        self.counts["cells_reused"] += int(r.get("reused") or 0)
        out = new_cells(r, self.spec, "", run_id=self.run_id, now=now, caption_embedding=r.get("caption_embedding"))
        if self.hold is not None and r.get("need_segments"):
            parts = self.hold.segments_of(r["video_id"])
            for seg in parts:  # decoded again as a whole: every cell of each moment is (re)written
                seg = {**seg, "content_id": r["content_id"], "need_media": True, "need_visual": True,
                       "need_scores": True}
                out += new_cells(seg, self.spec, segment_scope(self.spec.segmentation, int(seg["segment"])),
                                 run_id=self.run_id, now=now, caption_embedding=seg.get("caption_embedding"))
            spans = [(float(s["start_s"]), float(s["end_s"])) for s in parts] or [
                (0.0, float(r.get("end_s") or r.get("duration_s") or 0.0))]
            out.append(plan_cell(r["content_id"], self.spec, spans, run_id=self.run_id, now=now))
            self.counts["decoded"] += len(parts)
        for c in out:
            if c["kind"] in ("caption", "answer"):
                self.generations[c["kind"]] += 1
            elif c["kind"] == "visual":
                self.counts["visual_encodings"] += 1
        return out

    # ---- committing --------------------------------------------------------------------------------------

    def _resolve_copies(self, copies: list[Row], fresh: dict[str, str], now: Any) -> tuple[list[Row], list[Row]]:
        """(copies whose content's cells exist now, ledger rows for copies of a content that failed); the others
        (their content is still being computed in this run) wait."""
        ready, failed = [], []
        for c in copies:
            cid = c["content_id"]
            if c.get("wait") and cid not in self._content_done and cid not in fresh:
                if cid in self._content_failed:
                    f = self._content_failed[cid]
                    failed.append(ledger_row(c, self._spec_hash, self.run_id, now, f["error_stage"],
                                             f.get("error_type") or "Error",
                                             f"an exact copy of {f['uri']}, which failed: {f.get('error_message')}",
                                             bool(f.get("error_retryable"))))
                else:
                    self._pending_copies.setdefault(cid, []).append(c)
                continue
            first = self._content_done.get(cid) or fresh.get(cid)
            ready.append({**c, "copy_of": first} if c.get("wait") and first != c["video_id"] else c)
        return ready, failed

    def _commit(self, ok: list[Row], cells: list[Row], copies: list[Row], ledger: list[Row], now: Any) -> None:
        fresh = {r["content_id"]: r["video_id"] for r in ok}
        for cid in list(self._pending_copies):  # copies whose content finished (or failed) in this batch
            if cid in fresh or cid in self._content_failed:
                copies += self._pending_copies.pop(cid)
        copies, copy_failures = self._resolve_copies(copies, fresh, now)
        ledger += copy_failures
        for c in cells:
            self._learn_dims(c)
        with self.lock:  # lookups and commits see one state of the index (another run may share it)
            self.plan = plan_of(load_registry(self.location.root, self.s3))
            if cells:
                self.cells.commit(cells_table(cells), run_id=self.run_id)
            objects = self._unwritten + [{**r, "timings": _timings(r)} for r in ok] + copies
            # what this commit just wrote needs no reading back: only cells from elsewhere (earlier commits,
            # runs, other jobs) are read, for the contents that have some
            by_content = self._cells_by_content(
                {o["content_id"] for o in objects}, cells,
                read={o["content_id"] for o in (*self._unwritten, *copies)})
            if objects and self.dims["caption_embedding"] is None and self.dims["visual_embedding"] is not None:
                # no caption yet (a questions-only job on a new index): the text embedder says its width
                from pipeline.embedder import DEFAULT_EMBEDDER, embedding_dim

                self.dims["caption_embedding"] = embedding_dim(self.spec.embedder if self.spec else DEFAULT_EMBEDDER)
            if objects and any(d is None for d in self.dims.values()):
                self._unwritten, objects = objects, []  # embedding sizes unknown: keep for now
            else:
                self._unwritten = []
            views = [video_row(o, by_content.get(o["content_id"], {}), self.plan, self.dims, run_id=self.run_id,
                               now=now) for o in objects]
            # the ledger records these objects leave: the ones the listing saw there (the rest have none)
            done = [(o["video_id"], self._spec_hash) for o in objects if o.get("in_ledger")] \
                if self.spec is not None else []
            if ledger or done:
                self.errors.commit(ledger_table(ledger) if ledger else None, deletes=done, run_id=self.run_id)
            if self.segments is not None and views:
                self._commit_segments(views, by_content, now)
            if views:
                schema = video_schema(self.dims["caption_embedding"], self.dims["visual_embedding"])
                unique = list({v["video_id"]: v for v in views}.values())
                self.videos.commit(pa.Table.from_pylist(unique, schema=schema), run_id=self.run_id)
        self._content_done.update(fresh)
        self.counts["copies"] += len(copies)
        self.counts["errors"] += len(copy_failures)

    def _learn_dims(self, cell: Row) -> None:
        for col, key in (("caption_embedding", "text_embedding"), ("visual_embedding", "visual_embedding")):
            if self.dims[col] is None and cell.get(key) is not None:
                self.dims[col] = len(cell[key])

    def _cells_by_content(self, contents: set[str], fresh: list[Row] = (),
                          read: set[str] | None = None) -> dict[str, dict[str, list[Row]]]:
        """Every cell of these contents: `fresh` (this commit's, committed already) and those made elsewhere —
        read for the contents in `read` and for any content with a cell another run made."""
        if not contents:
            return {}
        read = set(contents) if read is None else set(read)
        others = sorted(contents - read)
        if others:
            owners = self.cells.lookup("content_id", others, ["content_id", "run_id"])
            if owners is not None:
                read |= {c for c, run in zip(*(owners.column(n).to_pylist() for n in ("content_id", "run_id")),
                                             strict=True) if run != self.run_id}
        found = self.cells.lookup("content_id", sorted(read)) if read else None
        rows = [] if found is None else found.to_pylist()
        rows += [c for c in fresh if c["content_id"] not in read]
        for c in rows:  # an index that already holds vectors tells their sizes
            self._learn_dims(c)
        return group_cells(rows)

    def _commit_segments(self, views: list[Row], by_content: dict[str, Any], now: Any) -> None:
        """Each object's segment rows, and the removal of its older segment rows the new ones do not replace
        (a changed file may have fewer moments)."""
        rows = []
        for v in views:
            rows += segment_rows(v, by_content.get(v["content_id"], {}), self.plan, self.dims, run_id=self.run_id,
                                 now=now)
        new = {r["segment_id"] for r in rows}
        old = self.segments.lookup("video_id", sorted({v["video_id"] for v in views}), ["segment_id"])
        stale = [(sid,) for sid in ([] if old is None else old.column("segment_id").to_pylist()) if sid not in new]
        schema = segment_schema(self.dims["caption_embedding"], self.dims["visual_embedding"])
        self.segments.commit(pa.Table.from_pylist(rows, schema=schema) if rows else None, deletes=stale,
                             run_id=self.run_id)

    def finish(self) -> None:
        """Resolve the copies still waiting (their content's cells came from another run meanwhile, or never
        came), then fold the new rows into the search indexes."""
        now = utc_now()
        waiting = [c for group in self._pending_copies.values() for c in group]
        self._pending_copies = {}
        if waiting:
            have = self._cells_by_content({c["content_id"] for c in waiting})
            found = self.videos.lookup("content_id", sorted(have), ["content_id", "video_id", "copy_of"])
            firsts = {r["content_id"]: r["copy_of"] or r["video_id"]
                      for r in ([] if found is None else found.to_pylist())}
            ready = [{**c, "wait": False, "copy_of": firsts.get(c["content_id"])} for c in waiting
                     if c["content_id"] in have]
            lost = [ledger_row(c, self._spec_hash, self.run_id, now, "copy", "NoResult",
                               "no result for this content was produced", True)
                    for c in waiting if c["content_id"] not in have]
            self._commit([], [], ready, lost, now)
            self.counts["errors"] += len(lost)
        lost = [] if self.hold is None else self.hold.incomplete()
        if lost:
            self._commit([], [], [], [ledger_row(r, self._spec_hash, self.run_id, now, "segments",
                                                 "IncompleteSegments", "not all segments of this video came back",
                                                 True) for r in lost], now)
        if self._unwritten:
            raise ValueError(f"{len(self._unwritten)} row(s) not written: all their embeddings are null, so "
                             "the embedding sizes are unknown")
        if self.counts["indexed"] + self.counts["copies"]:
            self.maintain_indexes()

    def maintain(self) -> dict[str, Any]:
        """Between commits of a long run: fold small Parquet parts into large ones and compact LanceDB's fragments
        into its indexes (scalar indexes made on first use), so lookups and merges keep their cost flat."""
        with self.lock:
            return {store.name: store.fold(run_id=self.run_id, scalar_columns=SCALAR_INDEXES.get(store.key[0], ()))
                    for store in self._stores()}

    def maintain_indexes(self) -> None:
        """The search indexes take the run's rows. Under the lock: `optimize` rewrites fragments, and a commit of
        another run on the same index between its read and its commit would conflict with it."""
        with self.lock:
            for store in (self.videos, self.segments):
                if store is not None and store.lance_table is not None:
                    maintain_indexes(store.lance_table, fts_columns=("caption", "answers_text"),
                                     scalar_columns=SCALAR_INDEXES[store.key[0]],
                                     vector_columns=("caption_embedding", "visual_embedding"))
            if self.cells.lance_table is not None:
                maintain_indexes(self.cells.lance_table, fts_columns=("text",),
                                 scalar_columns=SCALAR_INDEXES["cell_id"])


def _timings(r: Row) -> dict[str, Any]:
    return {k: r.get(k) for k in ("fetch_s", "decode_s", "model_s", "embed_s")}


__all__ = ["IndexWriter", "COUNT_KEYS"]
