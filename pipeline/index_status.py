"""`stllm-index status INDEX`: what an index holds and how its last runs went — from the run manifests, the
view (and each curation score's histogram over it), the cells (coverage of each job's caption and questions) and
the error ledger (Parquet root or LanceDB folder, local or s3://)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.catalog.histograms import fmt, table_histograms, text_bars
from pipeline.io.sources import S3Options, is_s3
from pipeline.store.files import filesystem, join_path
from pipeline.store.index_record import recorded_location, recorded_manifest_dirs
from pipeline.store.location import IndexLocation
from pipeline.store.manifest import list_manifests, mark_interrupted
from pipeline.store.registry import describe, load_registry


def locate(index: str, s3: S3Options | None) -> IndexLocation:
    """The index one of whose roots (its Parquet root or LanceDB folder) is `index`: both stores as its runs
    recorded them, else the one store found there."""
    if (recorded := recorded_location(index, s3)) is not None:
        return recorded
    fs, inner = filesystem(index, s3)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))}
    if not names:
        raise ValueError(f"{index} is not an index: it is missing or empty")
    if "videos.lance" in names or "errors.lance" in names:
        return IndexLocation(parquet_root=None, lancedb=index, videos_table="videos", errors_table="errors", s3=s3)
    if "videos" in names or "errors" in names:
        return IndexLocation(parquet_root=index, lancedb=None, videos_table="videos", errors_table="errors", s3=s3)
    raise ValueError(f"{index} is not an index: no 'videos' Parquet dataset or LanceDB table in it "
                     "(give the job's output.parquet root or output.lancedb folder)")


def coverage(loc: IndexLocation, videos: int) -> list[dict[str, Any]]:
    """Per registered job: how many videos hold each of its cells (caption, each question)."""
    registry = load_registry(loc.root, loc.s3)
    if not registry:
        return []
    table = loc.cells().read_all(["content_id", "derivation"], where="scope = ''")
    counts: Counter[str] = Counter()
    if table is not None and table.num_rows:
        for d, n in zip(*pc.value_counts(table.column("derivation")).flatten(), strict=True):
            counts[d.as_py()] = n.as_py()
    view = loc.videos().read_all(["content_id"])
    copies = 0 if view is None else view.num_rows - len(pc.unique(view.column("content_id")))
    out = []
    for r in registry:
        rows = [{"what": ("caption: " if a.kind == "caption" else "") + a.prompt,
                 "contents": counts.get(a.derivation, 0)} for a in r.spec.asks]
        out.append({"job": r.spec.job, "model": r.spec.model_id, "videos": videos, "copies": copies,
                    "cells": rows})
    return out


def histograms(videos: Any) -> list[dict[str, Any]]:
    """Each curation score's histogram over the view (`pipeline.catalog.histograms`): bin edges, counts, nulls."""
    schema = videos.existing_schema()
    return [] if schema is None else [h.to_json() for h in table_histograms(schema.names, videos.read_all)]


def index_status(index: str, runs: int = 5, manifest_dir: str | None = None, summaries: bool = True) -> dict[str, Any]:
    """The index's runs, errors and sizes; with `summaries`, also each job's coverage and each score's histogram
    (both read a whole table: the page's runs view, which shows neither, asks without)."""
    s3 = S3Options() if is_s3(index) else None
    loc = locate(index, s3)
    videos, errors = loc.videos(), loc.errors()
    # Where the runs' manifests are: as told, else as the index recorded (the job's output.manifest_dir), else
    # the default of a job that set none.
    folders = [manifest_dir] if manifest_dir else (recorded_manifest_dirs(index, s3)
                                                   or [join_path(index, "_manifests")])
    by_run: dict[str, dict[str, Any]] = {}
    for folder in folders:
        mark_interrupted(folder, s3)
        by_run.update((m.get("run_id") or "", m) for m in list_manifests(folder, s3))
    manifests = sorted(by_run.values(), key=lambda m: m.get("started_at") or "")
    by_type: Counter[str] = Counter()
    table = errors.read_all(["video_id", "stage", "error_type", "retryable", "last_seen"])
    # the ledger keeps a record per object and job spec: an object counts once, by its latest failure
    latest: dict[str, dict[str, Any]] = {}
    for r in ([] if table is None else table.to_pylist()):
        if r["video_id"] not in latest or r["last_seen"] > latest[r["video_id"]]["last_seen"]:
            latest[r["video_id"]] = r
    for r in latest.values():
        by_type[f"{r['stage']}: {r['error_type']}"] += 1
    retryable = sum(bool(r["retryable"]) for r in latest.values())
    n_videos = videos.count()
    return {
        "index": index, "manifest_dirs": folders, "videos": n_videos,
        "stale": videos.count("stale = true") if videos.lance_table is not None else _count_stale(videos),
        "errors": len(latest), "retryable_errors": retryable,
        "errors_by_type": dict(by_type.most_common()),
        "jobs": describe(load_registry(loc.root, s3)),
        **({"coverage": coverage(loc, n_videos), "histograms": histograms(videos)} if summaries else {}),
        "runs": [{k: m.get(k) for k in ("run_id", "job", "status", "started_at", "finished_at", "wall_s",
                                        "counts", "error", "progress")} for m in manifests[-runs:]],
    }


def _count_stale(videos: Any) -> int:
    table = videos.read_all(["stale"])
    return 0 if table is None else int(pc.sum(table.column("stale")).as_py() or 0)


def print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    from pipeline.report import console

    out = console()
    out.print(f"[bold]{status['index']}[/bold]: {status['videos']} videos ({status['stale']} still showing an "
              f"earlier model's results), {status['errors']} known-bad objects ({status['retryable_errors']} "
              "failed on the store and will be retried)")
    for job in status["coverage"]:
        t = Table(title=f"job {job['job']} ({job['model']}): cells computed, per distinct content")
        t.add_column("cell")
        t.add_column("contents", justify="right")
        for c in job["cells"]:
            t.add_row(c["what"], f"{c['contents']:,} of {job['videos'] - job['copies']:,}")
        out.print(t)
    if any(h["values"] for h in status.get("histograms", [])):
        t = Table(title="curation scores over the videos (docs/curation.md): one bar per bin, from the lower edge to "
                  "the upper")
        for col, kw in (("score", {}), ("from", {"justify": "right"}), ("histogram", {}), ("to", {}),
                        ("videos", {"justify": "right"}), ("null", {"justify": "right"}), ("min", {"justify": "right"}),
                        ("max", {"justify": "right"})):
            t.add_column(col, no_wrap=True, **kw)
        for h in status["histograms"]:
            edges = h["edges"] or [None]
            t.add_row(h["column"], fmt(edges[0]), f"[cyan]{text_bars(h['counts'])}[/cyan]", fmt(edges[-1]),
                      str(h["values"]), str(h["nulls"]), fmt(h["min"]), fmt(h["max"]))
        out.print(t)
    if status["errors_by_type"]:
        t = Table(title="errors by type")
        t.add_column("stage: type")
        t.add_column("objects", justify="right")
        for kind, n in status["errors_by_type"].items():
            t.add_row(kind, str(n))
        out.print(t)
    t = Table(title=f"last {len(status['runs'])} runs (manifests in {', '.join(status['manifest_dirs'])})")
    for col in ("run", "job", "status", "listed", "new", "from cells", "skipped", "errors", "captions", "answers"):
        t.add_column(col, no_wrap=True)
    for r in status["runs"]:
        c = r.get("counts") or {}
        gen = c.get("generations") or {}
        skipped = (c.get("skipped") or 0) + (c.get("known_bad") or 0)
        t.add_row(r["run_id"], r.get("job") or "", r.get("status") or "?",
                  *(str(v) for v in (c.get("listed", ""), c.get("indexed", ""), c.get("copies", ""), skipped,
                                     c.get("errors", ""), gen.get("caption", ""), gen.get("answer", ""))))
    out.print(t)
