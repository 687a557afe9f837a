"""The current view: one `videos` row per object (and one `segments` row per moment of a long recording), built
from the content's cells by the registry's rule (`pipeline.store.registry.ViewPlan`).

For each thing the view shows it takes the current job's cell; while that cell is missing (a new model's
backfill has not reached this video yet) it shows the latest earlier cell of the same kind and prompt, marked
with the model that made it, and the row is `stale`. So a catalog never shows two rows for one video, and never
loses what it showed before the new result arrives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pipeline.store.cells import SCORE_COLUMNS, segment_scope
from pipeline.store.registry import ViewPlan
from schemas import flatten_answers, media_fragment

Cell = dict[str, Any]
ByScope = dict[str, list[Cell]]


def group_cells(cells: Iterable[Cell]) -> dict[str, ByScope]:
    """{content_id: {scope: [cells]}}."""
    out: dict[str, ByScope] = {}
    for c in cells:
        out.setdefault(c["content_id"], {}).setdefault(c["scope"], []).append(c)
    return out


def _latest(cells: Iterable[Cell]) -> Cell | None:
    return max(cells, key=lambda c: (c["created_at"], c["cell_id"]), default=None)


def pick(cells: list[Cell], kind: str, derivation: str, prompt: str | None = None,
         fits: Any = None) -> tuple[Cell | None, bool]:
    """(the cell to show, whether it is an earlier one): the exact derivation, else the latest of the same kind
    (and prompt, when given) that `fits` (a vector of the view's width)."""
    same = [c for c in cells if c["kind"] == kind]
    for c in same:
        if c["derivation"] == derivation:
            return c, False
    older = [c for c in same if (prompt is None or c.get("prompt") == prompt) and (fits is None or fits(c))]
    return _latest(older), True


def _dim_fits(column: str, dim: int | None):
    return lambda c: c.get(column) is not None and (dim is None or len(c[column]) == dim)


def _have(cells: list[Cell]) -> set[str]:
    return {c["derivation"] for c in cells}


def jobs_done(by_scope: ByScope, plan: ViewPlan) -> list[str]:
    """`<job>:<spec>` of each registered job whose cells for this content are all there."""
    done = []
    for spec in plan.jobs:
        complete = spec.required() <= _have(by_scope.get("", []))
        if complete and spec.segmentation:
            spans = _spans(by_scope, spec.segmentation)
            complete = spans is not None and (len(spans) <= 1 or all(
                spec.required() <= _have(by_scope.get(segment_scope(spec.segmentation, i), []))
                for i in range(len(spans))))
        if complete:
            done.append(f"{spec.job}:{spec.spec}")
    return done


def _spans(by_scope: ByScope, segmentation: str) -> list[list[float]] | None:
    plan_cell = next((c for c in by_scope.get(segmentation, []) if c["kind"] == "plan"), None)
    return None if plan_cell is None else json.loads(plan_cell["text"])


def _shown(cells: list[Cell], plan: ViewPlan, dims: dict[str, int | None]) -> dict[str, Any]:
    """The results one scope shows: caption, answers, embeddings, each with what made it."""
    kinds: dict[str, list[Cell]] = {}
    for c in cells:
        kinds.setdefault(c["kind"], []).append(c)
    stale = False
    out: dict[str, Any] = {"caption": None, "caption_model": None, "caption_prompt": None, "caption_run": None,
                           "caption_embedding": None}
    if plan.caption is not None:
        cap, old = pick(kinds.get("caption", []), "caption", plan.caption.derivation, plan.caption.prompt)
        if cap is None:
            cap, old = pick(kinds.get("caption", []), "caption", plan.caption.derivation)  # an earlier prompt's
        if cap is not None:
            emb = cap.get("text_embedding")
            fits = emb is not None and (dims["caption_embedding"] is None or len(emb) == dims["caption_embedding"])
            out.update(caption=cap["text"], caption_model=cap.get("model_id"), caption_prompt=cap.get("prompt"),
                       caption_run=cap["run_id"], caption_embedding=list(emb) if fits else None)
        stale |= old
    answers = []
    for ask, _job in plan.questions:
        ans, old = pick(kinds.get("answer", []), "answer", ask.derivation, ask.prompt)
        stale |= old
        if ans is not None:
            answers.append({"question": ask.prompt, "answer": ans["text"], "model": ans.get("model_id"),
                            "run": ans["run_id"]})
    vis, old = pick(kinds.get("visual", []), "visual", plan.visual,
                    fits=_dim_fits("visual_embedding", dims["visual_embedding"]))
    stale |= old
    out.update(answers=answers, answers_text=flatten_answers(answers),
               visual_embedding=None if vis is None else list(vis["visual_embedding"]),
               visual_model=None if vis is None else vis.get("model_id"), stale=stale,
               **_scores(kinds.get("scores", []), plan))
    return out


def _scores(cells: list[Cell], plan: ViewPlan) -> dict[str, Any]:
    """The curation signals: the current job's, else the latest computed (they depend on the frames only)."""
    cell, _ = pick(cells, "scores", plan.scores or "")
    values = {} if cell is None else json.loads(cell["text"])
    return {k: values.get(k) for k in SCORE_COLUMNS}


def _media(cells: list[Cell], plan: ViewPlan) -> tuple[dict[str, Any], bytes | None]:
    media, _ = pick(cells, "media", plan.media)
    if media is None:
        return {}, None
    return json.loads(media["text"]), media.get("thumbnail")


def video_row(obj: dict[str, Any], by_scope: ByScope, plan: ViewPlan, dims: dict[str, int | None], *,
              run_id: str, now: datetime) -> dict[str, Any]:
    """The `videos` row of one object (`obj`: its listing fields, `indexed_at` of its previous row, `timings`)."""
    cells = by_scope.get("", [])
    facts, thumbnail = _media(cells, plan)
    return {
        "video_id": obj["video_id"], "content_id": obj["content_id"], "uri": obj["uri"], "size": int(obj["size"]),
        "etag": obj["etag"], "copy_of": obj.get("copy_of"), **_shown(cells, plan, dims),
        "jobs_done": jobs_done(by_scope, plan),
        "duration_s": facts.get("duration_s"), "fps": facts.get("fps"), "width": facts.get("width"),
        "height": facts.get("height"), "codec": facts.get("codec"), "decoder": facts.get("decoder"),
        "n_frames": facts.get("n_frames"), "frame_indices": facts.get("frame_indices"), "thumbnail": thumbnail,
        "timings": obj.get("timings"), "run_id": run_id, "indexed_at": obj.get("indexed_at") or now,
        "updated_at": now, "part": None,
    }


def segment_rows(video: dict[str, Any], by_scope: ByScope, plan: ViewPlan, dims: dict[str, int | None], *,
                 run_id: str, now: datetime) -> list[dict[str, Any]]:
    """The `segments` rows of one object (`video`: its `videos` row); a video no longer than one segment has one
    segment row, holding the video's own results."""
    if plan.segmentation is None:
        return []
    spans = _spans(by_scope, plan.segmentation)
    if spans is None:
        return []
    if len(spans) <= 1:
        end = spans[0][1] if spans else float(video.get("duration_s") or 0.0)
        parts = [(0, 0.0, end, by_scope.get("", []))]
    else:
        parts = [(i, s, e, by_scope.get(segment_scope(plan.segmentation, i), [])) for i, (s, e) in enumerate(spans)]
    rows = []
    for i, start, end, cells in parts:
        facts, thumbnail = _media(cells, plan)
        rows.append({
            "segment_id": f"{video['video_id']}:{i:05d}", "video_id": video["video_id"],
            "content_id": video["content_id"], "segment": i, "start_s": float(start), "end_s": float(end),
            "uri": video["uri"], "media_fragment": media_fragment(video["uri"], float(start), float(end)),
            "copy_of": video.get("copy_of"), **_shown(cells, plan, dims),
            "frame_indices": facts.get("frame_indices", video.get("frame_indices") if len(parts) == 1 else None),
            "thumbnail": thumbnail if thumbnail is not None else (video.get("thumbnail") if len(parts) == 1 else None),
            "run_id": run_id, "indexed_at": video["indexed_at"], "updated_at": now, "part": None,
        })
    return rows


__all__ = ["group_cells", "jobs_done", "pick", "segment_rows", "video_row"]
