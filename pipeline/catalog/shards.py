"""WebDataset shards of a training export, one series per bucket (`pipeline.catalog.buckets`):
`<bucket>-NNNNN.tar`, each holding per video `<video_id>.json` (the sample: caption, answers, scores, facts) and
`<video_id>.<ext>` (its bytes, fetched from the source), plus `shards.json`, the list a trainer reads to pick its
buckets. Byte-identical for the same samples: members in uri order, fixed tar headers, sorted JSON keys."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from pipeline.catalog.buckets import Bucket, Buckets
from pipeline.io.sources import S3Options

SHARD_LIST = "shards.json"


def tar_add(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    """One member with fixed headers (no time, owner or mode of this machine): byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else path.stat().st_size
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    if data is not None:
        tar.addfile(info, io.BytesIO(data))
    else:
        with path.open("rb") as f:  # streamed: a long video is not held in memory
            tar.addfile(info, f)


def sample_json(sample: dict[str, Any]) -> bytes:
    return json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()


def write_shards(folder: Path, samples: list[dict[str, Any]], buckets: Buckets, shard_size: int,
                 s3: S3Options | None = None) -> list[str]:
    """Write the samples (each with `video_id`, `uri`, `width`, `height`, `duration_s`) into `folder`, the
    bucket's name set in each (`bucket`); returns the file names, the shard list last."""
    from pipeline.io.fetch import fetched

    by_bucket: dict[str, tuple[Bucket, list[dict[str, Any]]]] = {}
    for s in samples:
        bucket = buckets.of(s.get("width"), s.get("height"), s.get("duration_s"))
        s["bucket"] = bucket.name
        by_bucket.setdefault(bucket.name, (bucket, []))[1].append(s)
    files, listing = [], []
    for bucket, items in sorted(by_bucket.values(), key=lambda b: b[0]):
        items.sort(key=lambda s: s["uri"])
        for n, start in enumerate(range(0, len(items), shard_size)):
            name = f"{bucket.name}-{n:05d}.tar"
            chunk = items[start:start + shard_size]
            with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for s in chunk:
                    tar_add(tar, f"{s['video_id']}.json", sample_json(s))
                    ext = Path(s["uri"]).suffix.lstrip(".").lower() or "mp4"
                    with fetched(s["uri"], s3) as path:
                        tar_add(tar, f"{s['video_id']}.{ext}", path=Path(path))
            files.append(name)
            listing.append({"file": name, "samples": len(chunk), **bucket.to_json()})
    body = {"buckets": buckets.to_json(), "shards": listing}
    (folder / SHARD_LIST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return [*files, SHARD_LIST]


__all__ = ["SHARD_LIST", "sample_json", "tar_add", "write_shards"]
