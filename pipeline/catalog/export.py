"""`stllm-index export`: a curated subset of an index as a fine-tuning manifest — the format `stllm-index train`
reads (one row per video and instruction: uri, question, answer, plus metadata and segment times) — or as
training shards.

- Selection: the catalog's filters (`pipeline.catalog.query.Filters`), curation scores included
  (`--where "score_motion > 0.02"`).
- Near-duplicates: videos whose visual embeddings have cosine similarity ≥ `dedup_threshold` form a group (and
  exact copies — one `content_id` — always do); one video per group is kept, the first by uri. Exact, in blocks
  of 1024 rows (O(N²) comparisons: meant for curated subsets, not a whole archive).
- Results: the caption and answers the view shows, each with the model that made it; with `model`, that model's
  from the index's history instead (`pipeline.catalog.history`). A video without any is left out.
- Split: by group, so near-copies never straddle train and val; a group goes to val when a hash of its first
  uri (and `seed`) falls under `val_fraction` — stable when the selection changes.
- Left out: `left_out.jsonl` lists every video of the index the export does not hold and why — `filter` (with
  the filters it fails), `duplicate` (with the video kept for its group), `no_results` — by uri.
- Deterministic: the same index and flags give byte-identical files (sorted rows, no timestamps, fixed tar
  headers), written to a temporary folder and moved into place only when complete.
Formats: `parquet` (manifest.parquet), `jsonl` (manifest.jsonl), `webdataset` (`<bucket>-NNNNN.tar` shards per
shape/length bucket and `shards.json`: `pipeline.catalog.shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalog.buckets import Buckets
from pipeline.catalog.query import Catalog, Filters, filter_parts
from pipeline.store.cells import SCORE_COLUMNS

Format = Literal["parquet", "jsonl", "webdataset"]
FORMATS = ("parquet", "jsonl", "webdataset")
DEFAULT_CAPTION_PROMPT = "Describe the video in detail."
MANIFEST_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("content_id", pa.string()),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("duration_s", pa.float64()),
    pa.field("codec", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("model", pa.string()),  # what made the answer (the view shows each result with its model)
])
_COLUMNS = ["video_id", "content_id", "uri", "caption", "caption_prompt", "caption_model", "answers", "duration_s",
            "fps", "codec", "width", "height", "visual_embedding", *SCORE_COLUMNS]
LEFT_OUT = "left_out.jsonl"


@dataclass
class ExportReport:
    videos: int
    kept: int
    groups: int
    train: int
    val: int
    rows: int
    files: list[str]
    left_out: dict[str, int] = field(default_factory=dict)  # reason → videos
    buckets: dict[str, int] = field(default_factory=dict)  # webdataset: bucket → samples


def near_duplicate_groups(embeddings: np.ndarray, content_ids: list[str], threshold: float,
                          block: int = 1024) -> list[int]:
    """A group index per row: connected components of cosine ≥ threshold, exact copies joined."""
    n = len(content_ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, c in enumerate(content_ids):
        if c in first:
            union(first[c], i)
        else:
            first[c] = i
    if n and threshold <= 1.0:
        e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        for start in range(0, n, block):
            sims = e[start:start + block] @ e.T
            rows, cols = np.nonzero(sims >= threshold)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                if start + r < c:
                    union(start + r, c)
    return [find(i) for i in range(n)]


def _split(key: str, seed: int, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _ids(catalog: Catalog, where: str | None) -> list[tuple[str, str]]:
    q = catalog.table.search()
    if where:
        q = q.where(where)
    t = q.select(["video_id", "uri"]).limit(None).to_arrow()
    return list(zip(t.column("video_id").to_pylist(), t.column("uri").to_pylist(), strict=True))


def filtered_out(catalog: Catalog, filters: Filters, selected: set[str]) -> list[dict[str, Any]]:
    """The index's videos the filters leave out, each with the filters it fails (each filter is asked on its own:
    a null score fails the filter on it, as SQL has it)."""
    parts = filter_parts(filters, catalog.columns)
    if not parts:
        return []
    out = [(vid, uri) for vid, uri in _ids(catalog, None) if vid not in selected]
    if not out:
        return []
    passing = [(label, {vid for vid, _ in _ids(catalog, sql)}) for label, sql in parts]
    return [{"video_id": vid, "uri": uri, "reason": "filter",
             "filters": [label for label, ids in passing if vid not in ids]} for vid, uri in out]


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return None if not na or not nb else round(float(a @ b) / (na * nb), 4)


def _shown(r: dict[str, Any], caption_prompt: str | None) -> dict[str, Any]:
    """The view row's caption and answers, each with the model that made it."""
    caption = None if not r.get("caption") else {
        "text": r["caption"], "prompt": caption_prompt or r.get("caption_prompt") or DEFAULT_CAPTION_PROMPT,
        "model": r.get("caption_model")}
    return {"caption": caption, "answers": [{"question": a["question"], "answer": a["answer"], "model": a.get("model")}
                                            for a in r.get("answers") or [] if a.get("answer")]}


def _sample(r: dict[str, Any], results: dict[str, Any], split: str, group_id: str) -> dict[str, Any]:
    """A training sample: what the video is, its caption and answers with their models, its scores."""
    caption, answers = results["caption"], results["answers"]
    instructions = ([{"question": caption["prompt"], "answer": caption["text"], "model": caption["model"]}]
                    if caption else []) + [{"question": a["question"], "answer": a["answer"], "model": a["model"]}
                                           for a in answers]
    return {"video_id": r["video_id"], "uri": r["uri"], "content_id": r["content_id"], "split": split,
            "group_id": group_id, **{k: r.get(k) for k in ("duration_s", "fps", "codec", "width", "height")},
            "caption": caption, "answers": answers, "instructions": instructions,
            "scores": {c.removeprefix("score_"): r.get(c) for c in SCORE_COLUMNS if c in r}}


def export(index: str, to: str | os.PathLike, *, fmt: Format = "parquet", filters: Filters | None = None,
           dedup_threshold: float = 0.98, val_fraction: float = 0.1, seed: int = 0, table: str = "videos",
           caption_prompt: str | None = None, shard_size: int = 1000, buckets: Buckets | str | None = None,
           model: str | None = None) -> ExportReport:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not isinstance(buckets, Buckets):
        buckets = Buckets.parse(buckets)
    target = Path(to)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--to {target} exists and is not empty: nothing written")
    catalog = Catalog(index, table)
    filters = filters or Filters()
    rows = catalog.rows(filters, columns=[c for c in _COLUMNS if c in catalog.columns]).to_pylist()
    if not rows:
        raise ValueError("the filters select no video: nothing written")
    left_out = filtered_out(catalog, filters, {r["video_id"] for r in rows})
    rows.sort(key=lambda r: r["uri"])
    width = len(next((x["visual_embedding"] for x in rows if x.get("visual_embedding") is not None), [0.0]))
    emb = np.array([r["visual_embedding"] if r.get("visual_embedding") is not None else np.zeros(width)
                    for r in rows], dtype=np.float32)
    groups = near_duplicate_groups(emb, [r["content_id"] for r in rows], dedup_threshold)
    kept = []
    for i, r in enumerate(rows):
        if groups[i] == i:  # a group's first row (by uri) is its own root
            kept.append(r)
            continue
        first = rows[groups[i]]
        left_out.append({"video_id": r["video_id"], "uri": r["uri"], "reason": "duplicate",
                         "kept": first["uri"], "kept_video_id": first["video_id"],
                         "exact_copy": r["content_id"] == first["content_id"],
                         "similarity": _cosine(emb[i], emb[groups[i]])})
    if model is not None:
        from pipeline.catalog.history import model_results

        results = model_results(catalog, model, kept)
    else:
        results = {r["video_id"]: _shown(r, caption_prompt) for r in kept}
    samples = []
    for r in kept:
        chosen = results[r["video_id"]]
        if chosen["caption"] is None and not chosen["answers"]:
            left_out.append({"video_id": r["video_id"], "uri": r["uri"], "reason": "no_results",
                             "model": model or r.get("caption_model")})
            continue
        samples.append(_sample(r, chosen, _split(r["uri"], seed, val_fraction),
                               hashlib.sha256(r["uri"].encode()).hexdigest()[:16]))
    if not samples:
        raise ValueError(f"no selected video has a caption or answers{f' of model {model!r}' if model else ''}: "
                         "nothing written")
    left_out.sort(key=lambda x: (x["uri"], x["reason"]))
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent if target.parent.exists() else None))
    try:
        files = _write(tmp, fmt, samples, catalog, shard_size, buckets)
        with (tmp / LEFT_OUT).open("w") as f:
            f.writelines(json.dumps(x, sort_keys=True, ensure_ascii=False) + "\n" for x in left_out)
        files.append(LEFT_OUT)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reasons: dict[str, int] = {}
    for x in left_out:
        reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
    by_bucket: dict[str, int] = {}
    if fmt == "webdataset":  # samples per bucket, in the order of the shards
        for b in sorted(buckets.of(s["width"], s["height"], s["duration_s"]) for s in samples):
            by_bucket[b.name] = by_bucket.get(b.name, 0) + 1
    return ExportReport(videos=len(rows), kept=len(kept), groups=len(set(groups)),
                        train=sum(s["split"] == "train" for s in samples),
                        val=sum(s["split"] == "val" for s in samples),
                        rows=sum(len(s["instructions"]) for s in samples), files=[str(target / f) for f in files],
                        left_out=reasons, buckets=by_bucket)


def manifest_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One manifest row per sample and instruction (the caption first)."""
    return [{"uri": s["uri"], "video_id": s["video_id"], "content_id": s["content_id"], "question": i["question"],
             "answer": i["answer"], "split": s["split"], "group_id": s["group_id"], "duration_s": s["duration_s"],
             "codec": s["codec"], "width": s["width"], "height": s["height"], "start_s": None, "end_s": None,
             "model": i["model"]} for s in samples for i in s["instructions"]]


def _write(folder: Path, fmt: Format, samples: list[dict[str, Any]], catalog: Catalog, shard_size: int,
           buckets: Buckets) -> list[str]:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(manifest_rows(samples), schema=MANIFEST_SCHEMA),
                       folder / "manifest.parquet")
        return ["manifest.parquet"]
    if fmt == "jsonl":
        with (folder / "manifest.jsonl").open("w") as f:
            for m in manifest_rows(samples):
                f.write(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n")
        return ["manifest.jsonl"]
    from pipeline.catalog.shards import write_shards

    return write_shards(folder, samples, buckets, shard_size, catalog.s3)


__all__ = ["export", "filtered_out", "manifest_rows", "near_duplicate_groups", "ExportReport", "FORMATS",
           "LEFT_OUT", "MANIFEST_SCHEMA"]
