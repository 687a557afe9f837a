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


def _latest(cells: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    return max(cells, key=lambda c: (c["created_at"], c["cell_id"]), default=None)


def model_results(catalog: Catalog, model: str, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{video_id: {"caption": {text, prompt, model} | None, "answers": [{question, answer, model}]}} of `model`
    for each view row (whole videos: scope ''): what `export --model` trains on instead of what the view shows.
    The caption is the one with the row's caption prompt, else the latest; per question the latest answer, in the
    row's question order, then the others by question."""
    cells = open_table(catalog.db, "cells")
    if cells is None:
        raise ValueError(f"{catalog.uri} holds no history (no 'cells' table): run a job into it first")
    known = models(catalog)
    if model not in known:
        raise ValueError(f"--model: no results of model {model!r} in this index (models: {', '.join(known)})")
    where = f"scope = '' AND kind IN ('caption', 'answer') AND model_id = {sql_str(model)} AND text != ''"
    found = cells.search().where(where).select(["cell_id", *CELL_COLUMNS]).limit(None).to_list()
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
