"""`stllm-index serve INDEX`: a small read-only web app over an index (FastAPI + Jinja2, served by uvicorn).

Pages: `/` search box with filters (those of the CLI: uri prefix, answer, where, since, until; and a min/max per
curation score beside that score's histogram over the index, `pipeline.catalog.histograms`); before any search
the latest indexed videos, newest first, a page at a time (the filters apply); results with thumbnails, caption,
the matching answer and the score in a column of its own (with "moments", the segments of long recordings
instead, each opening its video at its start); `/video/<id>` a detail
view with a player (seeking to `?t=` seconds, e.g. a segment's start), every answer, the facts, the video's
moments and the videos that look like it; `/runs` the last runs and the error ledger. Media: local files are
served with range requests (the player seeks); `s3://` objects through a short-lived presigned URL. JSON:
`/api/search` (`segments=true` for moments).
Binds to 127.0.0.1 unless told otherwise; nothing writes to the index.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pipeline.catalog.browse import PER_PAGE, latest_videos
from pipeline.catalog.histograms import NUMERIC_SCORES, Histogram, fmt, score_columns, table_histograms
from pipeline.catalog.history import models, search_history
from pipeline.catalog.query import Catalog, Filters, parse_answer_filter
from pipeline.io.fetch import local_path
from pipeline.io.sources import S3Options, is_s3, split_s3_uri
from pipeline.store.index_record import recorded_manifest_dirs
from pipeline.store.lance import open_table, sql_str

TEMPLATES = Path(__file__).with_name("templates")
PRESIGN_S = 300
MAX_PER_PAGE = 200


def create_app(index: str, table: str = "videos", manifest_dir: str | None = None, embedder: str | None = None,
               segments_table: str = "segments") -> Any:
    catalog = Catalog(index, table)
    try:  # jobs with `segments` write their moments there
        moments: Catalog | None = Catalog(index, segments_table)
    except ValueError:
        moments = None
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals["numeric_scores"] = NUMERIC_SCORES
    app = FastAPI(title="stllm-index", docs_url=None, redoc_url=None)

    @functools.cache
    def text_embedder() -> Any:
        from pipeline.embedder import DEFAULT_EMBEDDER, load_text_embedder

        return load_text_embedder(embedder or DEFAULT_EMBEDDER)

    def run_search(q: str, mode: str, filters: Filters, k: int, in_moments: bool = False,
                   model: str = "") -> list[dict]:
        if model:  # the history: another model's (or every model's) captions and answers, full text
            return search_history(catalog, q, model=None if model == "all" else model, k=k, filters=filters)
        vector = None if mode == "fts" else text_embedder().encode([q], normalize_embeddings=True)[0].tolist()
        target = catalog
        if in_moments:
            if moments is None:
                raise ValueError(f"this index has no moments (table '{segments_table}'): index with `segments:`")
            target = moments
        return target.search(q, filters=filters, k=k, mode=mode, vector=vector)  # type: ignore[arg-type]

    histograms: dict[int, list[Histogram]] = {}  # by table version: one scan of the scores per index change

    def score_panel(params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Each score's histogram over the index with the form's bounds on it."""
        version = catalog.table.version
        if version not in histograms:
            histograms.clear()
            histograms[version] = table_histograms(
                catalog.columns, lambda columns: catalog.table.search().select(columns).limit(None).to_arrow())
        return [{"h": h, "min": params.get(f"{h.name}_min", ""), "max": params.get(f"{h.name}_max", "")}
                for h in histograms[version]]

    known_models: dict[int, list[str]] = {}  # by the history's version: its models read once per change

    def model_choices() -> list[str]:
        cells = open_table(catalog.db, "cells")
        if cells is None:
            return []
        if cells.version not in known_models:
            known_models.clear()
            known_models[cells.version] = models(catalog)
        return known_models[cells.version]

    def one(video_id: str, columns: list[str]) -> dict[str, Any]:
        rows = catalog.table.search().where(f"video_id = {sql_str(video_id)}").select(columns).limit(1).to_list()
        if not rows:
            raise HTTPException(404, f"no video {video_id}")
        return rows[0]

    @app.get("/")
    def page_search(request: Request, q: str = "", mode: str = "hybrid", prefix: str = "", answer: str = "",
                    where: str = "", since: str = "", until: str = "", k: int = 20, segments: bool = False,
                    page: int = 1, n: int = PER_PAGE, model: str = "") -> Any:
        form = {"q": q, "mode": mode, "prefix": prefix, "answer": answer, "where": where, "since": since,
                "until": until, "model": model, **_bounds(request.query_params, catalog.columns)}
        hits, latest, error = [], None, None
        try:
            filters = _filters(prefix, answer, where, since, until, request.query_params, catalog.columns)
            if q.strip():
                hits = run_search(q, mode, filters, k, segments, model)
            else:  # the home: what was indexed last, before anyone searches
                latest = latest_videos(catalog, filters, page=page, per_page=min(max(n, 1), MAX_PER_PAGE))
        except ValueError as e:
            error = str(e)

        def page_link(to: int) -> str:
            return "/?" + urlencode({**{key: v for key, v in form.items() if v and key != "q"}, "page": to,
                                     **({"n": n} if n != PER_PAGE else {})})

        return templates.TemplateResponse(request, "search.html", {
            "index": index, **form, "hits": hits, "latest": latest, "page_link": page_link, "error": error,
            "segments": segments, "has_moments": moments is not None, "scores": score_panel(request.query_params),
            "models": model_choices(),
            "fmt": fmt})

    @app.get("/api/search")
    def api_search(request: Request, q: str, mode: str = "hybrid", prefix: str = "", answer: str = "",
                   where: str = "", since: str = "", until: str = "", k: int = 20, segments: bool = False,
                   model: str = "") -> Any:
        """The page's search as JSON; score bounds as on the page: `motion_min=0.02&blank_fraction_max=0.1`."""
        try:
            filters = _filters(prefix, answer, where, since, until, request.query_params, catalog.columns)
            hits = run_search(q, mode, filters, k, segments, model)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return [{k: (str(v) if k == "indexed_at" else v) for k, v in h.items()} for h in hits]

    @app.get("/video/{video_id}")
    def page_video(request: Request, video_id: str, t: float | None = None) -> Any:
        try:
            row = catalog.row(video_id)
        except ValueError as e:
            raise HTTPException(404, str(e)) from None
        similar = catalog.similar(video_id, k=8) if row.get("visual_embedding") is not None else []
        own = [] if moments is None else sorted(
            moments.table.search().where(f"video_id = {sql_str(video_id)}")
            .select(["segment_id", "segment", "start_s", "end_s", "caption"]).limit(None).to_list(),
            key=lambda m: m["segment"])
        return templates.TemplateResponse(request, "video.html", {"index": index, "row": row, "t": t,
                                                                  "similar": similar, "moments": own, "fmt": fmt})

    @app.get("/thumb/moment/{segment_id}")
    def moment_thumb(segment_id: str) -> Any:
        rows = [] if moments is None else moments.table.search().where(
            f"segment_id = {sql_str(segment_id)}").select(["thumbnail"]).limit(1).to_list()
        if not rows or not rows[0].get("thumbnail"):
            raise HTTPException(404, "no thumbnail")
        return Response(content=rows[0]["thumbnail"], media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/thumb/{video_id}")
    def thumb(video_id: str) -> Any:
        data = one(video_id, ["thumbnail"]).get("thumbnail")
        if not data:
            raise HTTPException(404, "no thumbnail")
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/media/{video_id}")
    def media(video_id: str) -> Any:
        uri = one(video_id, ["uri"])["uri"]
        if is_s3(uri):
            bucket, key = split_s3_uri(uri)
            client = (catalog.s3 or S3Options()).client()
            url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                ExpiresIn=PRESIGN_S)
            return RedirectResponse(url, status_code=307)
        path = local_path(uri)
        if not path.is_file():
            raise HTTPException(404, f"{uri} is gone")
        return FileResponse(path)  # answers Range requests: the player can seek

    @app.get("/runs")
    def page_runs(request: Request) -> Any:
        from pipeline.index_status import index_status

        status = index_status(index, runs=20, manifest_dir=manifest_dir or _guess_manifests(index), summaries=False)
        plots = [p for p in (progress_plot(r) for r in reversed(status["runs"])) if p][:5]
        return templates.TemplateResponse(request, "runs.html", {"index": index, "status": status,
                                                                 "manifest_dir": manifest_dir, "plots": plots})

    app.state.catalog = catalog
    return app


def progress_plot(run: Mapping[str, Any], width: int = 560, height: int = 110) -> dict[str, Any] | None:
    """A run's objects done over time (the manifest's `progress`), as SVG polyline points (y down) and figures."""
    series = [p for p in run.get("progress") or [] if len(p) >= 2]
    if len(series) < 2:
        return None
    wall = max(p[0] for p in series) or 1.0
    done = max(p[1] for p in series) or 1
    points = " ".join(f"{p[0] / wall * width:.1f},{height - p[1] / done * height:.1f}" for p in series)
    return {"run_id": run["run_id"], "points": points, "width": width, "height": height, "wall_s": wall,
            "done": done, "rate": round(done / wall, 2)}


def _bounds(params: Mapping[str, str], columns: Sequence[str]) -> dict[str, str]:
    """The form's score bounds that are set: `<score>_min` / `<score>_max` (`motion_min` bounds score_motion)."""
    names = [f"{c.removeprefix('score_')}_{end}" for c in score_columns(columns) for end in ("min", "max")]
    return {n: params[n].strip() for n in names if params.get(n, "").strip()}


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not a number")
    return value


def _filters(prefix: str, answer: str, where: str, since: str, until: str, params: Mapping[str, str] | None = None,
             columns: Sequence[str] = ()) -> Filters:
    """The form's filters (empty fields: no filter), as the CLI's flags; a score's min/max as `--where "score_x >=
    min AND score_x <= max"`."""
    bounds = _bounds(params or {}, columns)
    ranges = []
    for column in score_columns(columns):
        lo, hi = (bounds.get(f"{column.removeprefix('score_')}_{end}") for end in ("min", "max"))
        if lo is not None or hi is not None:
            ranges.append((column, None if lo is None else _number(lo, f"{column} min"),
                           None if hi is None else _number(hi, f"{column} max")))
    return Filters(where=where or None, answers=[parse_answer_filter(answer)] if answer else [],
                   prefix=prefix or None, since=since or None, until=until or None, ranges=ranges)


def _guess_manifests(index: str) -> str | None:
    """Where the runs view reads manifests when --manifest-dir is not given: None when the index records where its
    runs put them (`index_status` reads the record), else a folder next to the LanceDB folder."""
    if recorded_manifest_dirs(index, S3Options() if is_s3(index) else None):
        return None
    root = index.rstrip("/")
    for candidate in (f"{root}/_manifests", f"{os.path.dirname(root)}/runs", f"{os.path.dirname(root)}/_manifests"):
        if is_s3(candidate) or os.path.isdir(candidate):
            return candidate
    return f"{root}/_manifests"


def serve(index: str, host: str = "127.0.0.1", port: int = 8765, table: str = "videos",
          manifest_dir: str | None = None) -> None:
    import uvicorn

    from pipeline.report import terminal

    app = create_app(index, table, manifest_dir)
    print(f"serving {index} on http://{host}:{port}/ (read-only; Ctrl-C stops)", file=terminal(), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["create_app", "serve"]
