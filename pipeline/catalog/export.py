"""`stllm-index export`: a curated subset of an index as a fine-tuning manifest — the format `stllm-index train`
reads (one row per video and instruction: uri, question, answer, plus metadata and segment times).

- Selection: the catalog's filters (`pipeline.catalog.query.Filters`).
- Near-duplicates: videos whose visual embeddings have cosine similarity ≥ `dedup_threshold` form a group (and
  exact copies — one `content_id` — always do); one video per group is kept, the first by uri. Exact, in blocks
  of 1024 rows (O(N²) comparisons: meant for curated subsets, not a whole archive).
- Split: by group, so near-copies never straddle train and val; a group goes to val when a hash of its first
  uri (and `seed`) falls under `val_fraction` — stable when the selection changes.
- Deterministic: the same index and flags give byte-identical files (sorted rows, no timestamps, fixed tar
  headers), written to a temporary folder and moved into place only when complete.
Formats: `parquet` (manifest.parquet), `jsonl` (manifest.jsonl), `webdataset` (shard-NNNNN.tar: per video a
`<key>.json` with its instructions and a `<key>.<ext>` with its bytes, fetched from the source).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalog.query import Catalog, Filters

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
            "codec", "width", "height", "visual_embedding"]


@dataclass
class ExportReport:
    videos: int
    kept: int
    groups: int
    train: int
    val: int
    rows: int
    files: list[str]


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


def export(index: str, to: str | os.PathLike, *, fmt: Format = "parquet", filters: Filters | None = None,
           dedup_threshold: float = 0.98, val_fraction: float = 0.1, seed: int = 0, table: str = "videos",
           caption_prompt: str | None = None, shard_size: int = 1000) -> ExportReport:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    target = Path(to)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--to {target} exists and is not empty: nothing written")
    catalog = Catalog(index, table)
    rows = catalog.rows(filters, columns=[c for c in _COLUMNS if c in catalog.columns]).to_pylist()
    if not rows:
        raise ValueError("the filters select no video: nothing written")
    rows.sort(key=lambda r: r["uri"])
    emb = np.array([r["visual_embedding"] if r.get("visual_embedding") is not None else
                    np.zeros(len(next(x["visual_embedding"] for x in rows if x.get("visual_embedding") is not None)))
                    for r in rows], dtype=np.float32)
    groups = near_duplicate_groups(emb, [r["content_id"] for r in rows], dedup_threshold)
    kept = [r for i, r in enumerate(rows) if groups[i] == i]  # a group's first row (by uri) is its own root
    manifest = []
    for r in kept:
        split = _split(r["uri"], seed, val_fraction)
        group_id = hashlib.sha256(r["uri"].encode()).hexdigest()[:16]
        prompt = caption_prompt or r.get("caption_prompt") or DEFAULT_CAPTION_PROMPT
        pairs = [(prompt, r["caption"], r.get("caption_model"))] + [
            (a["question"], a["answer"], a.get("model")) for a in (r.get("answers") or [])]
        for question, answer, model in pairs:
            if answer:
                manifest.append({"uri": r["uri"], "video_id": r["video_id"], "content_id": r["content_id"],
                                 "question": question, "answer": answer, "split": split, "group_id": group_id,
                                 "duration_s": r.get("duration_s"), "codec": r.get("codec"),
                                 "width": r.get("width"), "height": r.get("height"), "start_s": None,
                                 "end_s": None, "model": model})
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent if target.parent.exists() else None))
    try:
        files = _write(tmp, fmt, manifest, catalog, shard_size)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    splits = [m["split"] for m in manifest]
    return ExportReport(videos=len(rows), kept=len(kept), groups=len(set(groups)),
                        train=len({m["video_id"] for m in manifest if m["split"] == "train"}),
                        val=len({m["video_id"] for m in manifest if m["split"] == "val"}), rows=len(splits),
                        files=[str(target / f) for f in files])


def _write(folder: Path, fmt: Format, manifest: list[dict[str, Any]], catalog: Catalog, shard_size: int) -> list[str]:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), folder / "manifest.parquet")
        return ["manifest.parquet"]
    if fmt == "jsonl":
        with (folder / "manifest.jsonl").open("w") as f:
            for m in manifest:
                f.write(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n")
        return ["manifest.jsonl"]
    return _write_webdataset(folder, manifest, catalog, shard_size)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    """One member with fixed headers (no time, owner or mode of this machine): byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else path.stat().st_size
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    if data is not None:
        tar.addfile(info, io.BytesIO(data))
    else:
        with path.open("rb") as f:  # streamed: a long video is not held in memory
            tar.addfile(info, f)


def _write_webdataset(folder: Path, manifest: list[dict[str, Any]], catalog: Catalog, shard_size: int) -> list[str]:
    from pipeline.io.fetch import fetched

    by_video: dict[str, list[dict[str, Any]]] = {}
    for m in manifest:
        by_video.setdefault(m["video_id"], []).append(m)
    videos = sorted(by_video.values(), key=lambda ms: ms[0]["uri"])
    files = []
    for shard, start in enumerate(range(0, len(videos), shard_size)):
        name = f"shard-{shard:05d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for ms in videos[start:start + shard_size]:
                first = ms[0]
                key = first["video_id"]
                meta = {k: v for k, v in first.items() if k not in ("question", "answer")}
                meta["instructions"] = [{"question": m["question"], "answer": m["answer"]} for m in ms]
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
                ext = Path(first["uri"]).suffix.lstrip(".").lower() or "mp4"
                with fetched(first["uri"], catalog.s3) as path:
                    _tar_add(tar, f"{key}.{ext}", path=Path(path))
        files.append(name)
    return files


__all__ = ["export", "near_duplicate_groups", "ExportReport", "FORMATS", "MANIFEST_SCHEMA"]
