"""Search the index's history: the captions and answers every model made, in the `cells` table (`search --model
NAME`, the page's model choice). The view shows one result per video and question; the history keeps them all,
each with the model, the prompt or question, and the run that made it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.catalog.query import Catalog, Filters, build_filter
from pipeline.store.lance import open_table, sql_in, sql_str

CELL_COLUMNS = ["content_id", "kind", "prompt", "text", "model_id", "run_id", "created_at"]


def models(catalog: Catalog) -> list[str]:
    """The models whose captions or answers the index holds, most cells first."""
    cells = open_table(catalog.db, "cells")
    if cells is None:
        return []
    table = cells.search().where("kind IN ('caption', 'answer')").select(["model_id"]).limit(None).to_arrow()
    counts: dict[str, int] = {}
    for m in table.column("model_id").to_pylist():
        if m:
            counts[m] = counts.get(m, 0) + 1
    return sorted(counts, key=lambda m: -counts[m])


def search_history(catalog: Catalog, text: str, *, model: str | None, k: int = 10,
                   filters: Filters | None = None) -> list[dict[str, Any]]:
    """Full-text search over the captions and answers of `model` (None: every model's), best first; each hit is
    a video of the view (its uri, id) with the matching result and what made it."""
    cells = open_table(catalog.db, "cells")
    if cells is None:
        raise ValueError(f"{catalog.uri} holds no history (no 'cells' table): run a job into it first")
    where = "kind IN ('caption', 'answer') AND scope = ''"
    if model is not None:
        known = models(catalog)
        if model not in known:
            raise ValueError(f"--model: no results of model {model!r} in this index (models: {', '.join(known)})")
        where += f" AND model_id = {sql_str(model)}"
    view_filter = build_filter(filters or Filters(), catalog.columns)
    found = (cells.search(text, query_type="fts", fts_columns="text").where(where, prefilter=True)
             .select([*CELL_COLUMNS, "_score"]).limit(max(k * 4, 20)).to_list())
    videos = _videos_of([c["content_id"] for c in found], catalog, view_filter)
    hits = []
    for c in found:
        for v in videos.get(c["content_id"], []):
            hits.append({**v, "caption": c["text"] if c["kind"] == "caption" else v.get("caption"),
                         "matching_answer": f"{c['prompt']} {c['text']}" if c["kind"] == "answer" else None,
                         "model": c["model_id"], "run": c["run_id"], "created_at": c["created_at"],
                         "kind": c["kind"], "prompt": c["prompt"], "_score": float(c["_score"])})
            break  # one object per content (exact copies hold the same result)
        if len(hits) == k:
            break
    return hits


def _videos_of(contents: Sequence[str], catalog: Catalog, where: str | None) -> dict[str, list[dict[str, Any]]]:
    if not contents:
        return {}
    cond = " AND ".join(filter(None, [sql_in("content_id", sorted(set(contents))), where]))
    rows = (catalog.table.search().where(cond).select(["video_id", "content_id", "uri", "caption", "duration_s",
                                                       "indexed_at", "copy_of"]).limit(None).to_list())
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["copy_of"] is not None, r["uri"])):  # the first object first
        out.setdefault(r["content_id"], []).append(r)
    return out


__all__ = ["models", "search_history"]
