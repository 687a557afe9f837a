"""What a run has to do: the source listed page by page, each page checked against the index, as a stream of
small rows — produced inside Ray (one read task), so the driver never holds the listing or the index's ids.

Per page (S3 `list_objects_v2` pages, or as many local files):
- an object indexed with the same etag under this config → skipped;
- an object in the error ledger with the same etag → skipped as known-bad (unless the run retries errors, or
  its last failure is older than the job's backoff, or the failure was the store's, not the object's);
- else it is new or changed: its content_id (free on S3; a sha256 locally) decides whether the model must run —
  a content already indexed under this config (another key, an earlier run) or already sent in this run
  becomes a `copy` row that reuses that result; the first object of a new content becomes a `work` row.
Every page also yields one `tally` row (listed / skipped / known-bad), so the driver counts without listing.
`limit` caps the new objects (work + copies) of a run, so a capped nightly job advances through the archive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from pipeline.io.sinks import connect_lance
from pipeline.io.sources import S3Options, VideoSource, content_id, iter_pages, object_id
from pipeline.io.tables import TableStore

WORK, COPY, TALLY = "work", "copy", "tally"
SEGMENT = "segment"  # a moment of a long recording: model work like a video, written to the segments table
TALLY_FIELDS = ("listed", "skipped", "known_bad")


@dataclass(frozen=True)
class IndexLocation:
    """Where a job's index lives (picklable: it travels to the read task)."""

    parquet_root: str | None
    lancedb: str | None
    videos_table: str
    errors_table: str
    s3: S3Options | None
    segments_table: str = "segments"

    def _common(self) -> dict[str, Any]:
        db = connect_lance(self.lancedb, self.s3) if self.lancedb else None
        return dict(parquet_root=self.parquet_root, lance_db=db, s3=self.s3, lance_uri=self.lancedb or "")

    def stores(self) -> tuple[TableStore, TableStore]:
        common = self._common()
        return TableStore(self.videos_table, **common), TableStore(self.errors_table, **common)

    def segment_store(self) -> TableStore:
        """The moments of long recordings (jobs with segments), keyed by (segment_id, config_hash)."""
        return TableStore(self.segments_table, **self._common(), key_column="segment_id")

    @property
    def lock_root(self) -> str:
        return self.parquet_root or self.lancedb or "."


@dataclass(frozen=True)
class WorkPlan:
    source_uri: str
    extensions: tuple[str, ...]
    source_s3: S3Options | None
    config_hash: str
    index: IndexLocation
    skip_existing: bool = True
    retry_errors: bool = False
    retry_after_s: float | None = None  # a known-bad object is tried again once its last failure is this old
    limit: int | None = None
    page_size: int = 1000


def _by_id(table: Any, key: str, *cols: str) -> dict[str, tuple[Any, ...]]:
    if table is None or not table.num_rows:
        return {}
    values = [table.column(c).to_pylist() for c in (key, *cols)]
    return {row[0]: row[1:] for row in zip(*values, strict=True)}


def _retry_due(last_seen: datetime | None, retry_after_s: float | None) -> bool:
    return retry_after_s is not None and last_seen is not None and time.time() - last_seen.timestamp() >= retry_after_s


def _row(kind: str, src: VideoSource, vid: str, cid: str | None, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "uri": src.uri, "video_id": vid, "content_id": cid, "size": src.size, "etag": src.etag,
            "mtime": src.mtime, "copy_of": None, "prev_attempts": 0, "first_seen": None, **extra}


def _candidates(plan: WorkPlan, videos: TableStore, errors: TableStore, page: list[VideoSource],
                tally: dict[str, int]) -> list[tuple[VideoSource, str, tuple[Any, ...] | None, tuple | None]]:
    """The page's objects that need work: (source, video_id, ledger record, indexed (etag, content_id))."""
    cfg = plan.config_hash
    ids = [object_id(v.uri) for v in page]
    done = _by_id(videos.lookup(cfg, "video_id", ids, ["video_id", "etag", "content_id"]), "video_id",
                  "etag", "content_id") if plan.skip_existing else {}
    bad = _by_id(errors.lookup(cfg, "video_id", ids, ["video_id", "etag", "attempts", "first_seen",
                                                       "last_seen", "retryable"]),
                 "video_id", "etag", "attempts", "first_seen", "last_seen", "retryable")
    tally["listed"] += len(page)
    todo = []
    for src, vid in zip(page, ids, strict=True):
        if vid in done and done[vid][0] == src.etag:
            tally["skipped"] += 1
            continue
        led = bad.get(vid)
        if (led is not None and led[0] == src.etag and not led[4] and not plan.retry_errors
                and not _retry_due(led[3], plan.retry_after_s)):
            tally["known_bad"] += 1
            continue
        todo.append((src, vid, led, done.get(vid)))
    return todo


def _pages(plan: WorkPlan) -> Iterator[list[VideoSource]]:
    return iter_pages(plan.source_uri, extensions=plan.extensions, s3=plan.source_s3, page_size=plan.page_size)


def has_new_work(plan: WorkPlan) -> bool:
    """Whether any object needs work — stops at the first that does (etags only: nothing is read), so a rerun
    that finds nothing new can skip starting Ray altogether."""
    videos, errors = plan.index.stores()
    tally = dict.fromkeys(TALLY_FIELDS, 0)
    return any(_candidates(plan, videos, errors, page, tally) for page in _pages(plan))


def iter_work(plan: WorkPlan) -> Iterator[pd.DataFrame]:
    """The run's rows, one DataFrame per listing page (see the module docstring)."""
    videos, errors = plan.index.stores()
    cfg = plan.config_hash
    sent: set[str] = set()  # contents sent for model work in this run: bounded by the run's new work
    new = 0
    for page in _pages(plan):
        tally = dict.fromkeys(TALLY_FIELDS, 0)
        todo = _candidates(plan, videos, errors, page, tally)
        if plan.limit is not None:
            todo = todo[: max(plan.limit - new, 0)]
        cids = {}
        for src, vid, _, _ in todo:
            try:
                cids[vid] = content_id(src)
            except OSError:
                cids[vid] = None  # vanished or unreadable: the fetch stage records why
        known = {}
        wanted = sorted({c for c in cids.values() if c is not None} - sent)
        if wanted and plan.skip_existing:
            found = videos.lookup(cfg, "content_id", wanted, ["content_id", "video_id", "copy_of"])
            if found is not None:
                for c, v, copy_of in zip(*(found.column(n).to_pylist() for n in ("content_id", "video_id",
                                                                                   "copy_of")), strict=True):
                    known.setdefault(c, copy_of or v)  # the row that ran the model
        rows = []
        for src, vid, led, indexed in todo:
            cid = cids[vid]
            history = {"prev_attempts": led[1], "first_seen": led[2]} if led is not None and led[0] == src.etag \
                else {}
            if cid is not None and indexed is not None and indexed[1] == cid:
                rows.append(_row(COPY, src, vid, cid, copy_of=vid, **history))  # touched, same bytes: refresh
            elif cid is not None and cid in known:
                rows.append(_row(COPY, src, vid, cid, copy_of=known[cid], **history))
            elif cid is not None and cid in sent:
                rows.append(_row(COPY, src, vid, cid, **history))  # resolved when this run's result commits
            else:
                rows.append(_row(WORK, src, vid, cid, **history))
                if cid is not None:
                    sent.add(cid)
        new += len(rows)
        rows.append({"kind": TALLY, **tally})
        yield pd.DataFrame(rows)
        if plan.limit is not None and new >= plan.limit:
            return


def new_work_dataset(plan: WorkPlan) -> Any:
    """`iter_work` as a Ray Dataset read by ONE task (listing is sequential), with no CPU reservation (it
    mostly waits on the store; the decode and model actors keep the cores) and no retries (a retried listing
    would emit its rows twice; the job fails instead, and its rerun resumes)."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class NewWork(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(lambda: iter_work(plan), meta)]

    return ray.data.read_datasource(NewWork(), override_num_blocks=1, num_cpus=0,
                                    ray_remote_args={"max_retries": 0})  # no named parameter for it yet


__all__ = ["IndexLocation", "WorkPlan", "has_new_work", "iter_work", "new_work_dataset", "WORK", "COPY", "TALLY",
           "SEGMENT", "TALLY_FIELDS"]
