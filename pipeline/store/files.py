"""Files on a local disk or S3 through one interface (pyarrow's file systems): paths, atomic writes, Parquet."""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.io.sources import S3Options, is_s3, split_s3_uri

log = logging.getLogger(__name__)


def filesystem(path: str, s3: S3Options | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// uri."""
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        return (s3 or S3Options()).pyarrow_fs(), posixpath.join(bucket, key).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join_path(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if is_s3(base) else os.path.join(base, *parts)


def utc_now() -> datetime:
    return datetime.now(UTC)


def write_atomic(fs: pafs.FileSystem, inner: str, data: bytes, attempts: int = 3) -> None:
    """Write a small file so that readers see the old content or the new, never a part: a temp file renamed
    into place locally; on S3 an upload (atomic already), tried again as a whole when it fails.

    Why the retry: pyarrow uploads in parts, and a server that stalls (paused, overloaded) may apply a
    CompleteMultipartUpload whose answer the client no longer waits for; the client's own retry then gets
    NoSuchUpload although the object is in place. What the store holds decides, not the error."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(inner), recursive=True)
        tmp = f"{inner}.tmp-{uuid.uuid4().hex[:6]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, inner)
        return
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    for attempt in range(attempts):
        try:
            with fs.open_output_stream(inner) as f:
                f.write(data)
            return
        except OSError:
            if _holds(fs, inner, data):
                return
            if attempt == attempts - 1:
                raise
            log.warning("upload of %s failed; trying again (%d/%d)", inner, attempt + 2, attempts)
            time.sleep(2.0 * (attempt + 1))


def _holds(fs: pafs.FileSystem, inner: str, data: bytes) -> bool:
    try:
        with fs.open_input_stream(inner) as f:
            return f.read() == data
    except OSError:
        return False


def write_parquet(fs: pafs.FileSystem, inner: str, table: pa.Table) -> None:
    """A whole Parquet file through `write_atomic` (built in memory: parts are a commit's rows or a compaction's).
    No dictionary encoding (ids, texts and vectors are mostly distinct: trying it cost 5x the write) and statistics
    on flat columns only (min/max of a vector's floats helps no reader and costs 3x)."""
    import pyarrow.parquet as pq

    flat = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False, write_statistics=flat)
    write_atomic(fs, inner, sink.getvalue().to_pybytes())


def read_parquet(path: str, *, s3: S3Options | None = None, columns: list[str] | None = None,
                 filter: Any = None) -> pa.Table | None:
    """The dataset under `path` (None when nothing was written yet)."""
    import pyarrow.dataset as ds

    fs, root = filesystem(path, s3)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    return ds.dataset(root, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)


def read_small(path: str, s3: S3Options | None = None) -> bytes | None:
    """A small file's bytes (a registry entry, a manifest); None when it does not exist."""
    fs, inner = filesystem(path, s3)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # pyarrow's S3 file system says "not found" as a plain OSError
        if "NoSuchKey" in str(e) or "not found" in str(e).lower():
            return None
        raise


def list_files(folder: str, s3: S3Options | None = None, suffix: str = "") -> list[str]:
    """Base names of the files directly in `folder` (none when it does not exist), sorted."""
    fs, inner = filesystem(folder, s3)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def is_dir(path: str, s3: S3Options | None = None) -> bool:
    fs, inner = filesystem(path, s3)
    return fs.get_file_info(inner).type == pafs.FileType.Directory
