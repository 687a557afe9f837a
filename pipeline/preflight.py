"""What a run checks before any work — before Ray starts and before anything is written: that its source exists
and holds at least one video it would index.

A missing folder, a missing bucket or a store that cannot be reached is `SourceMissing` (a `ValueError`: the CLI's
"error:", exit status 2). A source with no file of the job's `source.extensions` is `NoVideos`: `stllm-index run`
prints it as a warning and exits with `EXIT_NO_VIDEOS`, so a script can tell "nothing there" from "all done"
(a source whose videos are all indexed already passes this check and exits 0)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError

from pipeline.io.fetch import local_path
from pipeline.io.sources import S3Options, is_s3, iter_videos, split_s3_uri
from pipeline.redact import redact

if TYPE_CHECKING:
    from pipeline.jobs import SourceConfig

EXIT_NO_VIDEOS = 3
OTHER_FILES_SCANNED = 10_000  # how far the "other files found" hint looks (the listing itself is not bounded)


class SourceMissing(ValueError):
    """The source folder, file or bucket does not exist, or its store cannot be reached."""


class NoVideos(ValueError):
    """The source exists but holds no file with one of the job's extensions."""


def check_source(source: SourceConfig) -> None:
    """Raise `SourceMissing` or `NoVideos` (see the module docstring); return when there is a video to index.
    Stops at the first matching video: one listing request on S3, a walk to the first match locally."""
    uri, exts = source.uri, tuple(source.extensions)
    if not is_s3(uri) and not local_path(uri).exists():
        raise SourceMissing(f"source.uri: {uri} does not exist (looked for {local_path(uri)}); give a folder of "
                            "videos, one video file, or s3://bucket/prefix")
    try:
        found = next(iter(iter_videos(uri, extensions=exts, s3=source.s3, page_size=source.page_size)), None)
    except (OSError, ValueError, BotoCoreError) as e:
        raise SourceMissing(redact(f"source.uri: cannot list {uri}: {e}")) from None
    if found is None:
        raise NoVideos(no_videos_message(uri, exts, source.s3))


def no_videos_message(uri: str, extensions: Iterable[str], s3: S3Options | None = None) -> str:
    """Where we looked, for which extensions, and what else is there (a wrong `extensions` shows at once)."""
    searched = ", ".join(f".{e}" for e in extensions)
    try:
        others = _other_extensions(uri, s3)
    except (OSError, ValueError, BotoCoreError):
        others = None  # the hint is a courtesy: the listing itself worked
    text = f"no videos in {uri}: no file ends with {searched} (source.extensions)"
    if others:
        counts = ", ".join(f"{ext or '(no extension)'} ({n})" for ext, n in others.most_common(5))
        text += f"; it holds other files: {counts} — add their extension to source.extensions if they are videos"
    elif others is not None:
        text += "; it holds no files at all"
    return redact(text)


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[1].lower() if "." in base.strip(".") else ""


def _other_extensions(uri: str, s3: S3Options | None) -> Counter[str]:
    """Extensions of the first files under `uri` (hidden ones skipped, as the listing skips them)."""
    counts: Counter[str] = Counter()
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        page = (s3 or S3Options()).client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1000)
        counts.update(_extension(o["Key"]) for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        return counts
    seen = 0
    for _root, dirnames, filenames in os.walk(local_path(uri)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                counts[_extension(name)] += 1
                seen += 1
        if seen >= OTHER_FILES_SCANNED:
            break
    return counts


__all__ = ["EXIT_NO_VIDEOS", "NoVideos", "SourceMissing", "check_source", "no_videos_message"]
