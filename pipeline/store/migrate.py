"""Schema version 2 → 3, in place, on the first run of this release (under the index lock), nothing lost.

Version 2 kept one row per (object, job config) in `videos` (and `segments`). Each old row becomes cells: its
media facts, visual embedding, caption and answers. The rows the running job would make itself (same
`config_hash`) get that job's derivations — nothing is computed again; rows of other configs keep theirs under
legacy derivations (history: their results show in the view until the job's own arrive, marked with their model).
Then each table is replaced by its version-3 form (view: one row per object — the running job's row, else the
newest). The tables are migrated cells first and `videos` last, each all-or-nothing: a crash in between leaves
`videos` at version 2, and the next run migrates again (cells are keyed, so nothing doubles).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.store.cells import SEGMENT_MEDIA, VIDEO_MEDIA, JobSpec, cell_id, cells_table, digest, segment_scope
from pipeline.store.commit import TableStore
from pipeline.store.location import IndexLocation
from pipeline.store.registry import ViewPlan
from pipeline.store.view import group_cells, segment_rows, video_row
from schemas import (
    SCHEMA_VERSION,
    embedding_dims,
    error_schema,
    schema_version,
    segment_schema,
    video_schema,
)

log = logging.getLogger(__name__)
Row = dict[str, Any]


def _version(store: TableStore) -> int | None:
    schema = store.existing_schema()
    return None if schema is None else schema_version(schema)


def migrate(location: IndexLocation, spec: JobSpec, legacy_hash: str | None = None) -> bool:
    """Migrate a version-2 index (call under the index lock); True when something was migrated. `legacy_hash`: the
    running job's version-2 `config_hash`, whose rows become this job's own cells."""
    videos = location.table(location.videos_table, ("video_id",))  # opened as they are, schemas unchecked
    segments = location.table(location.segments_table, ("segment_id",))
    errors = location.table(location.errors_table, ("video_id", "config_hash"))
    if _version(videos) != 2 and _version(segments) != 2 and _version(errors) != 2:
        return False
    run_id = f"migrate-v2-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    now = datetime.now(UTC)
    old_videos = _rows(videos) if _version(videos) == 2 else []
    old_segments = _rows(segments) if _version(segments) == 2 else []
    derive = _deriver(spec, legacy_hash)
    cells = [c for r in old_videos for c in _video_cells(r, derive, spec, run_id)]
    cells += _segment_cells(old_segments, derive, spec, run_id, now)
    cell_store = location.cells()
    if cells:
        cell_store.commit(cells_table(cells), run_id=run_id)
    if _version(errors) == 2:
        ledger = [{**r, "config_hash": spec.spec if r["config_hash"] == legacy_hash else r["config_hash"]}
                  for r in _rows(errors)]
        errors.replace_all(pa.Table.from_pylist(ledger, schema=error_schema()), run_id=run_id)
    plan = ViewPlan.of([spec])
    by_content = group_cells(cells)
    dims = _dims(videos, segments)
    chosen = _one_per_object(old_videos, legacy_hash)
    views = [video_row({**r, "indexed_at": r["indexed_at"]}, by_content.get(r["content_id"], {}), plan, dims,
                       run_id=r["run_id"], now=now) for r in chosen]
    if _version(segments) == 2:
        rows = [s for v in views for s in segment_rows(v, by_content.get(v["content_id"], {}), plan, dims,
                                                        run_id=v["run_id"], now=now)]
        segments.replace_all(pa.Table.from_pylist(rows, schema=segment_schema(*_dim_pair(dims))), run_id=run_id)
    if _version(videos) == 2:
        videos.replace_all(pa.Table.from_pylist(views, schema=video_schema(*_dim_pair(dims))), run_id=run_id)
    log.warning("migrated the index at %s from schema version 2 to %d: %d rows → %d cells, %d objects",
                location.root, SCHEMA_VERSION, len(old_videos), len(cells), len(views))
    return True


def _rows(store: TableStore) -> list[Row]:
    table = store.read_all()
    return [] if table is None else table.to_pylist()


def _dims(*stores: TableStore) -> dict[str, int | None]:
    dims: dict[str, int | None] = {"caption_embedding": None, "visual_embedding": None}
    for store in stores:
        if (schema := store.existing_schema()) is not None:
            dims.update(embedding_dims(schema))
    return dims


def _dim_pair(dims: dict[str, int | None]) -> tuple[int, int]:
    return dims["caption_embedding"] or 384, dims["visual_embedding"] or 4096


def _one_per_object(rows: list[Row], legacy_hash: str | None) -> list[Row]:
    """The running job's row of each object, else its newest."""
    best: dict[str, Row] = {}
    for r in rows:
        cur = best.get(r["video_id"])
        rank = (r["config_hash"] == legacy_hash, r["indexed_at"])
        if cur is None or rank > (cur["config_hash"] == legacy_hash, cur["indexed_at"]):
            best[r["video_id"]] = r
    return sorted(best.values(), key=lambda r: r["video_id"])


def _deriver(spec: JobSpec, legacy_hash: str | None) -> Callable[[str, str, str | None], tuple[str, str | None]]:
    """(config_hash, kind, prompt) → (derivation, prompt): the running job's own for its rows, else legacy."""
    asks = {(a.kind, a.prompt): a.derivation for a in spec.asks}

    def derive(config_hash: str, kind: str, prompt: str | None) -> tuple[str, str | None]:
        if config_hash == legacy_hash:
            if kind == "caption" and spec.caption is not None:
                return spec.caption.derivation, spec.caption.prompt
            own = {"media": spec.media, "visual": spec.visual, "plan": spec.segmentation}.get(kind) or asks.get(
                (kind, prompt))
            if own is not None:
                return own, prompt
        return digest(["v2", config_hash, kind, prompt]), prompt

    return derive


def _cell(content: str, scope: str, kind: str, derivation: str, r: Row, run_id: str, **values: Any) -> Row:
    return {"cell_id": cell_id(content, scope, derivation), "content_id": content, "scope": scope, "kind": kind,
            "derivation": derivation, "job": None, "run_id": r.get("run_id") or run_id,
            "created_at": r.get("indexed_at"), "part": None, **values}


def _results(r: Row, content: str, scope: str, derive: Callable, spec: JobSpec, run_id: str) -> list[Row]:
    cfg, model = r["config_hash"], r.get("model_id")
    out = []
    if r.get("visual_embedding") is not None:
        d, _ = derive(cfg, "visual", None)
        out.append(_cell(content, scope, "visual", d, r, run_id, model_id=model,
                         visual_embedding=list(r["visual_embedding"])))
    if r.get("caption") is not None:
        d, prompt = derive(cfg, "caption", None)
        out.append(_cell(content, scope, "caption", d, r, run_id, model_id=model, prompt=prompt, text=r["caption"],
                         text_embedding=None if r.get("caption_embedding") is None else list(r["caption_embedding"]),
                         embedder=spec.embedder if spec.caption is not None and d == spec.caption.derivation
                         else None))
    for a in r.get("answers") or []:
        d, prompt = derive(cfg, "answer", a["question"])
        out.append(_cell(content, scope, "answer", d, r, run_id, model_id=model, prompt=prompt, text=a["answer"]))
    return out


def _video_cells(r: Row, derive: Callable, spec: JobSpec, run_id: str) -> list[Row]:
    content = r["content_id"]
    d, _ = derive(r["config_hash"], "media", None)
    media = _cell(content, "", "media", d, r, run_id, text=json.dumps({k: r.get(k) for k in VIDEO_MEDIA},
                                                                       sort_keys=True), thumbnail=r.get("thumbnail"))
    return [media, *_results(r, content, "", derive, spec, run_id)]


def _segment_cells(rows: list[Row], derive: Callable, spec: JobSpec, run_id: str, now: datetime) -> list[Row]:
    by_video: dict[tuple[str, str], list[Row]] = {}
    for s in rows:
        by_video.setdefault((s["content_id"], s["config_hash"]), []).append(s)
    out = []
    for (content, cfg), segs in by_video.items():
        segs.sort(key=lambda s: s["segment"])
        seen, unique = set(), []
        for s in segs:  # copies of one content held the same segments under their own ids
            if s["segment"] not in seen:
                seen.add(s["segment"])
                unique.append(s)
        segmentation, _ = derive(cfg, "plan", None)
        spans = [[s["start_s"], s["end_s"]] for s in unique]
        out.append(_cell(content, segmentation, "plan", segmentation, {"indexed_at": now}, run_id,
                         text=json.dumps(spans)))
        if len(unique) <= 1:
            continue  # one segment: the video's own results
        for s in unique:
            scope = segment_scope(segmentation, int(s["segment"]))
            d, _ = derive(cfg, "media", None)
            out.append(_cell(content, scope, "media", d, s, run_id,
                             text=json.dumps({k: s.get(k) for k in SEGMENT_MEDIA}, sort_keys=True),
                             thumbnail=s.get("thumbnail")))
            out += _results({**s, "model_id": None}, content, scope, derive, spec, run_id)
    return out


__all__ = ["migrate"]
