"""What a run has to do: the source listed page by page, each page checked against the index, as a stream of
small rows — produced inside Ray (one read task), so the driver never holds the listing or the index's ids.

Per page (S3 `list_objects_v2` pages, or as many local files):
- an object whose view row has the same etag and says this job is done with it (`jobs_done`) → skipped;
- an object in the error ledger under this job with the same etag → skipped as known-bad (unless the run retries
  errors, or its last failure is older than the job's backoff, or the failure was the store's, not the object's);
- `where` (a filter on the index's view, `run --where`) leaves out the objects it does not select (deferred);
- else its content_id (free on S3; a sha256 locally, reused from the view while the etag holds) finds the cells
  that exist for it: none missing → a `copy` row (the writer rebuilds the view row from the cells: an exact copy
  of another object, a question dropped, a view another job changed); some missing → a `work` row that says
  which (the caption? which questions? the segments?), or a `copy` row that waits when another object of this
  run already carries that content's work.
Every page's counts (listed / skipped / known-bad / deferred) go to `on_tally` — inside Ray, the run's
`pipeline.run_stats.RunStats` actor — so the driver counts without listing. `limit` caps the new work (work +
copies) of a run, so a capped nightly job advances through the archive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.io.sources import S3Options, VideoSource, content_id, iter_pages, object_id
from pipeline.store.cells import JobSpec, Needs, needs, segment_scope
from pipeline.store.lance import sql_in
from pipeline.store.location import IndexLocation
from schemas.stages import COPY, TALLY_FIELDS, WORK, listing_schema

VIEW_COLUMNS = ["video_id", "etag", "content_id", "copy_of", "jobs_done", "indexed_at"]


@dataclass(frozen=True)
class WorkPlan:
    source_uri: str
    extensions: tuple[str, ...]
    source_s3: S3Options | None
    spec: JobSpec
    index: IndexLocation
    skip_existing: bool = True
    retry_errors: bool = False
    retry_after_s: float | None = None  # a known-bad object is tried again once its last failure is this old
    limit: int | None = None
    page_size: int = 1000
    where: str | None = None  # only objects whose view row matches (a backfill steered by the index)


def _by_id(table: pa.Table | None, key: str) -> dict[str, dict[str, Any]]:
    if table is None or not table.num_rows:
        return {}
    return {r[key]: r for r in table.to_pylist()}


def _retry_due(last_seen: datetime | None, retry_after_s: float | None) -> bool:
    return retry_after_s is not None and last_seen is not None and time.time() - last_seen.timestamp() >= retry_after_s


def _row(kind: str, src: VideoSource, vid: str, cid: str | None, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "uri": src.uri, "video_id": vid, "content_id": cid, "size": src.size, "etag": src.etag,
            "mtime": src.mtime, "copy_of": None, "prev_attempts": 0, "first_seen": None, "indexed_at": None,
            "in_ledger": False,
            "wait": False, "caption_prompt": None, "questions": [], "need_media": False, "need_visual": False,
            "need_scores": False,
            "need_segments": False, "segment_caption_prompt": None, "segment_questions": [], "reused": 0,
            **extra}


class Stores:
    """The tables the listing reads (opened once per listing)."""

    def __init__(self, index: IndexLocation):
        self.videos, self.errors, self.cells = index.videos(), index.errors(), index.cells()


def _candidates(plan: WorkPlan, stores: Stores, page: list[VideoSource], tally: dict[str, int]) \
        -> list[tuple[VideoSource, str, dict | None, dict | None]]:
    """The page's objects that need work: (source, video_id, ledger record, view row)."""
    spec = plan.spec
    ids = [object_id(v.uri) for v in page]
    view = _by_id(stores.videos.lookup("video_id", ids, VIEW_COLUMNS), "video_id")
    bad = _by_id(stores.errors.lookup("video_id", ids, ["video_id", "etag", "attempts", "first_seen", "last_seen",
                                                        "retryable"], config_hash=spec.spec), "video_id")
    selected = None
    if plan.where:
        found = stores.videos.read_all(["video_id"], where=f"{sql_in('video_id', ids)} AND ({plan.where})")
        selected = set() if found is None else set(found.column("video_id").to_pylist())
    tally["listed"] += len(page)
    done_mark = f"{spec.job}:{spec.spec}"
    todo = []
    for src, vid in zip(page, ids, strict=True):
        row = view.get(vid)
        if (plan.skip_existing and row is not None and row["etag"] == src.etag
                and done_mark in (row["jobs_done"] or [])):
            tally["skipped"] += 1
            continue
        led = bad.get(vid)
        if (led is not None and led["etag"] == src.etag and not led["retryable"] and not plan.retry_errors
                and not _retry_due(led["last_seen"], plan.retry_after_s)):
            tally["known_bad"] += 1
            continue
        if selected is not None and vid not in selected:
            tally["deferred"] += 1
            continue
        todo.append((src, vid, led, row))
    return todo


def _existing_cells(stores: Stores, spec: JobSpec, contents: list[str]) -> dict[str, dict[str, set[str]]]:
    """{content_id: {scope: derivations present}} for this job's derivations, plus each plan's segment count
    (as the pseudo-derivation "#<n>" in the plan's scope)."""
    wanted = [*spec.required(), *([spec.segmentation] if spec.segmentation else [])]
    found = stores.cells.lookup("content_id", contents, ["content_id", "scope", "kind", "derivation", "text"]) \
        if contents else None
    out: dict[str, dict[str, set[str]]] = {}
    for r in ([] if found is None else found.to_pylist()):
        if r["derivation"] not in wanted:
            continue
        scopes = out.setdefault(r["content_id"], {})
        scopes.setdefault(r["scope"], set()).add(r["derivation"])
        if r["kind"] == "plan":
            scopes[r["scope"]].add(f"#{len(json.loads(r['text']))}")
    return out


def _segment_needs(spec: JobSpec, scopes: dict[str, set[str]]) -> Needs | None:
    """What the segments of one content still need (None: nothing); a content never segmented needs all."""
    if spec.segmentation is None:
        return None
    count = next((int(d[1:]) for d in scopes.get(spec.segmentation, ()) if d.startswith("#")), None)
    if count is None:
        return needs(spec, set())
    if count <= 1:
        return None  # one segment: the video's own cells
    merged = Needs()
    for i in range(count):
        n = needs(spec, scopes.get(segment_scope(spec.segmentation, i), set()))
        merged.media |= n.media
        merged.visual |= n.visual
        merged.scores |= n.scores
        merged.asks += [a for a in n.asks if a not in merged.asks]
    return merged if merged else None


def _work_fields(video: Needs, segs: Needs | None) -> dict[str, Any]:
    cap = next((a.prompt for a in video.asks if a.kind == "caption"), None)
    seg_cap = None if segs is None else next((a.prompt for a in segs.asks if a.kind == "caption"), None)
    return {"caption_prompt": cap, "questions": [a.prompt for a in video.asks if a.kind == "answer"],
            "need_media": video.media, "need_visual": video.visual, "need_scores": video.scores,
            "need_segments": segs is not None,
            "segment_caption_prompt": seg_cap,
            "segment_questions": [] if segs is None else [a.prompt for a in segs.asks if a.kind == "answer"]}


def has_new_work(plan: WorkPlan) -> bool:
    """Whether any object needs work — stops at the first that does (etags only: nothing is read), so a rerun
    that finds nothing new can skip starting Ray altogether."""
    stores = Stores(plan.index)
    tally = dict.fromkeys(TALLY_FIELDS, 0)
    return any(_candidates(plan, stores, page, tally) for page in _pages(plan))


def _pages(plan: WorkPlan) -> Iterator[list[VideoSource]]:
    return iter_pages(plan.source_uri, extensions=plan.extensions, s3=plan.source_s3, page_size=plan.page_size)


def iter_work(plan: WorkPlan, on_tally: Callable[[dict[str, int]], None] | None = None) -> Iterator[pa.Table]:
    """The run's rows, one Arrow table per listing page (see the module docstring); each page's counts go to
    `on_tally` before its rows are yielded."""
    stores = Stores(plan.index)
    spec = plan.spec
    n_required = len(spec.required())
    sent: set[str] = set()  # contents sent for model work in this run: bounded by the run's new work
    new = 0
    for page in _pages(plan):
        tally = dict.fromkeys(TALLY_FIELDS, 0)
        todo = _candidates(plan, stores, page, tally)
        if plan.limit is not None:
            todo = todo[: max(plan.limit - new, 0)]
        cids: dict[str, str | None] = {}
        for src, vid, _, row in todo:
            if row is not None and row["etag"] == src.etag:
                cids[vid] = row["content_id"]  # unchanged bytes: no need to hash them again
                continue
            try:
                cids[vid] = content_id(src)
            except OSError:
                cids[vid] = None  # vanished or unreadable: the fetch stage records why
        have = _existing_cells(stores, spec, sorted({c for c in cids.values() if c is not None}))
        firsts = _first_objects(stores, sorted({c for c in cids.values() if c is not None} - sent))
        rows = []
        for src, vid, led, row in todo:
            cid = cids[vid]
            history = {"prev_attempts": led["attempts"], "first_seen": led["first_seen"]} \
                if led is not None and led["etag"] == src.etag else {}
            own = {"indexed_at": row["indexed_at"] if row is not None else None,
                   "copy_of": _copy_of(row, vid, cid, firsts), "in_ledger": led is not None}
            scopes = have.get(cid, {}) if cid is not None else {}
            video, segs = needs(spec, scopes.get("", set())), _segment_needs(spec, scopes)
            if cid is not None and cid in sent:
                rows.append(_row(COPY, src, vid, cid, wait=True, **own, **history))  # its work is on the way
            elif cid is not None and not video and segs is None:
                rows.append(_row(COPY, src, vid, cid, reused=n_required, **own, **history))
            else:
                reused = n_required - (len(video.asks) + video.media + video.visual + video.scores)
                rows.append(_row(WORK, src, vid, cid, reused=max(reused, 0), **_work_fields(video, segs), **own,
                                 **history))
                if cid is not None:
                    sent.add(cid)
        new += len(rows)
        if on_tally is not None:
            on_tally(tally)
        yield pa.Table.from_pylist(rows, schema=listing_schema())
        if plan.limit is not None and new >= plan.limit:
            return


def _first_objects(stores: Stores, contents: list[str]) -> dict[str, str]:
    """{content_id: the object that first brought it to the index} for contents already in the view."""
    found = stores.videos.lookup("content_id", contents, ["content_id", "video_id", "copy_of"]) if contents else None
    out: dict[str, str] = {}
    for r in ([] if found is None else found.to_pylist()):
        out.setdefault(r["content_id"], r["copy_of"] or r["video_id"])
    return out


def _copy_of(row: dict | None, vid: str, cid: str | None, firsts: dict[str, str]) -> str | None:
    """The first object of this content, when it is another one (null for the first itself)."""
    if row is not None and row["content_id"] == cid:
        return row["copy_of"]  # unchanged bytes keep their provenance
    first = firsts.get(cid) if cid is not None else None
    return first if first is not None and first != vid else None


def _report_to(hub: Any) -> Callable[[dict[str, int]], None] | None:
    """Counts to the run's stats actor, each page's before its rows (so none is missing when the rows end)."""
    if hub is None:
        return None
    import ray

    return lambda tally: ray.get(hub.add_tally.remote(tally))


def new_work_dataset(plan: WorkPlan, hub: Any = None) -> Any:
    """`iter_work` as a Ray Dataset read by ONE task (listing is sequential; each page's counts go to `hub`, the
    run's RunStats actor), with no CPU reservation (it mostly waits on the store; the decode and model actors keep
    the cores) and no retries (a retried listing would emit its rows twice; the job fails instead, and its rerun
    resumes)."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class NewWork(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(lambda: iter_work(plan, _report_to(hub)), meta)]

    return ray.data.read_datasource(NewWork(), override_num_blocks=1, num_cpus=0,
                                    ray_remote_args={"max_retries": 0})  # no named parameter for it yet


__all__ = ["WorkPlan", "has_new_work", "iter_work", "new_work_dataset"]
