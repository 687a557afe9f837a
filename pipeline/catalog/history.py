"""Search the index's history: the captions and answers every model made, in the `cells` table (`search --model
NAME`, the page's model choice), and take one model's results for a training export (`export --model NAME`). The
view shows one result per video and question; the history keeps them all, each with the model, the prompt or
question, and the run that made it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.catalog.query import Catalog, Filters, build_filter
from pipeline.store.lance import open_table, sql_in, sql_str

CELL_COLUMNS = ["content_id", "kind", "prompt", "text", "model_id", "run_id", "created_at"]


def _cells(catalog: Catalog) -> Any:
    cells = open_table(catalog.db, "cells")
    if cells is None:
        raise ValueError(f"{catalog.uri} holds no history (no 'cells' table): run a job into it first")
    return cells


def _unknown(catalog: Catalog, model: str) -> ValueError | None:
    """The error for a model the index has no results of (asked only when a query found nothing: it reads every
    caption and answer cell's model)."""
    known = models(catalog)
    if model in known:
        return None
    return ValueError(f"--model: no results of model {model!r} in this index (models: {', '.join(known)})")


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
    cells = _cells(catalog)
    where = "kind IN ('caption', 'answer') AND scope = ''"
    if model is not None:
        where += f" AND model_id = {sql_str(model)}"
    view_filter = build_filter(filters or Filters(), catalog.columns)
    found = (cells.search(text, query_type="fts", fts_columns="text").where(where, prefilter=True)
             .select([*CELL_COLUMNS, "_score"]).limit(max(k * 4, 20)).to_list())
    if not found and model is not None and (error := _unknown(catalog, model)):
        raise error
    videos = _first_videos([c["content_id"] for c in found], catalog, view_filter)
    hits = []
    for c in found:
        v = videos.get(c["content_id"])  # one object per content (exact copies hold the same result)
        if v is None:
            continue
        hits.append({**v, "caption": c["text"] if c["kind"] == "caption" else v.get("caption"),
                     "matching_answer": f"{c['prompt']} {c['text']}" if c["kind"] == "answer" else None,
                     "model": c["model_id"], "run": c["run_id"], "created_at": c["created_at"],
                     "kind": c["kind"], "prompt": c["prompt"], "_score": float(c["_score"])})
        if len(hits) == k:
            break
    return hits


def _first_videos(contents: Sequence[str], catalog: Catalog, where: str | None) -> dict[str, dict[str, Any]]:
    """{content_id: the view row of the object that first brought it (not a copy; else the first by uri)}."""
    if not contents:
        return {}
    cond = " AND ".join(filter(None, [sql_in("content_id", sorted(set(contents))), where]))
    rows = (catalog.table.search().where(cond).select(["video_id", "content_id", "uri", "caption", "duration_s",
                                                       "indexed_at", "copy_of"]).limit(None).to_list())
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["copy_of"] is not None, r["uri"])):
        out.setdefault(r["content_id"], r)
    return out


def _latest(cells: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    return max(cells, key=lambda c: (c["created_at"], c["cell_id"]), default=None)


def model_results(catalog: Catalog, model: str, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{video_id: {"caption": {text, prompt, model} | None, "answers": [{question, answer, model}]}} of `model`
    for each view row (whole videos: scope ''): what `export --model` trains on instead of what the view shows.
    The caption is the one with the row's caption prompt, else the latest; per question the latest answer, in the
    row's question order, then the others by question."""
    cells = _cells(catalog)
    contents = sorted({r["content_id"] for r in rows})
    where = (f"scope = '' AND kind IN ('caption', 'answer') AND model_id = {sql_str(model)} AND text != ''"
             f" AND {sql_in('content_id', contents)}")
    found = cells.search().where(where).select(["cell_id", *CELL_COLUMNS]).limit(None).to_list() if contents else []
    if not found and (error := _unknown(catalog, model)):
        raise error
    by_content: dict[str, list[dict[str, Any]]] = {}
    for c in found:
        by_content.setdefault(c["content_id"], []).append(c)
    out = {}
    for r in rows:
        mine = by_content.get(r["content_id"], [])
        captions = [c for c in mine if c["kind"] == "caption"]
        caption = _latest([c for c in captions if c["prompt"] == r.get("caption_prompt")]) or _latest(captions)
        answers: dict[str, dict[str, Any]] = {}
        for c in mine:
            if c["kind"] == "answer" and (c["prompt"] not in answers or _latest([answers[c["prompt"]], c]) is c):
                answers[c["prompt"]] = c
        asked = [a["question"] for a in r.get("answers") or []]
        order = [q for q in asked if q in answers] + sorted(q for q in answers if q not in asked)
        out[r["video_id"]] = {
            "caption": None if caption is None else {"text": caption["text"], "prompt": caption["prompt"],
                                                     "model": caption["model_id"]},
            "answers": [{"question": q, "answer": answers[q]["text"], "model": answers[q]["model_id"]}
                        for q in order],
        }
    return out


__all__ = ["model_results", "models", "search_history"]
