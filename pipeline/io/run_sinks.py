"""Everything one run writes, owned by the driver: results (Parquet + LanceDB), errors, manifest."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.io.sinks import (
    ROW_KEY,
    ErrorSink,
    LanceSink,
    ParquetSink,
    connect_lance,
    join_path,
    open_table,
    read_parquet,
    to_records,
    utc_now,
    write_manifest,
)
from schemas import embedding_dims, flatten_answers, video_schema

if TYPE_CHECKING:
    from pipeline.jobs import JobConfig

class JobSinks:
    """Everything one run writes, owned by the driver: results (Parquet + LanceDB), errors, manifest.

    Layout: Parquet datasets `<output.parquet>/<table>/` and `<output.parquet>/<errors_table>/`; LanceDB
    tables `<table>` and `<errors_table>` in `<output.lancedb>`; the manifest at
    `<output.manifest_dir>/<run_id>.json` (default `<output.parquet or output.lancedb>/_manifests/`).
    Embedding dims come from the first rows written (or the existing table). Rows are committed every
    runtime.commit_every to both stores.
    LanceDB rows are upserted on (video_id, config_hash): a rerun replaces, never duplicates; the Parquet
    dataset is append-only (readers keep the latest `indexed_at` per key).
    """

    def __init__(self, job: JobConfig, *, run_id: str, config_hash: str, model_id: str):
        self.job, self.run_id, self.config_hash, self.model_id = job, run_id, config_hash, model_id
        self.questions_hash = job.questions_hash()
        out = job.output
        self.s3 = out.s3
        # Both stores commit at the same cadence (runtime.commit_every), so a crash cannot leave rows in
        # LanceDB (which skip_existing trusts) that never reached Parquet.
        self.commit_rows = job.runtime.commit_every
        self.dims: dict[str, int | None] = {"caption_embedding": None, "visual_embedding": None}
        self._lance_db = connect_lance(out.lancedb, out.s3) if out.lancedb else None
        if self._lance_db is not None:
            existing = open_table(self._lance_db, out.table)
            if existing is not None:
                self.dims.update(embedding_dims(existing.schema))
        self.videos_parquet: ParquetSink | None = None
        self.videos_lance: LanceSink | None = None
        self._pending: list[dict[str, Any]] = []
        self.errors = ErrorSink(join_path(out.parquet, out.errors_table) if out.parquet else None, out.lancedb,
                                out.errors_table, s3=out.s3, batch_rows=self.commit_rows)
        self.rows_written = 0

    # -- results

    def _open_video_sinks(self) -> None:
        out = self.job.output
        schema = video_schema(self.dims["caption_embedding"], self.dims["visual_embedding"])
        if out.parquet:
            self.videos_parquet = ParquetSink(join_path(out.parquet, out.table), schema, s3=out.s3,
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
            self.errors.write_rows(to_records(bad), self.run_id)
        if ok is None or not len(ok):
            return
        now = utc_now()
        self._pending.extend(self._video_row(r, now) for r in to_records(ok))
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
            tbl = open_table(self._lance_db, out.table)
            if tbl is None:
                return set()
            rows = tbl.search().where(f"config_hash = '{h}'").select(["video_id"]).limit(None).to_arrow()
            return set(rows.column("video_id").to_pylist())
        if out.parquet:
            import pyarrow.dataset as ds

            table = read_parquet(join_path(out.parquet, out.table), s3=self.s3, columns=["video_id"],
                                 filter=ds.field("config_hash") == (config_hash or self.config_hash))
            return set(table.column("video_id").to_pylist()) if table is not None else set()
        return set()

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{len(self._pending)} row(s) not written: all their embeddings are null, so "
                             "the embedding sizes are unknown")
        for sink in (self.videos_parquet, self.videos_lance):
            if sink is not None:
                sink.close()
        self.errors.close()

    def locations(self) -> dict[str, Any]:
        out = self.job.output
        loc: dict[str, Any] = {"table": out.table, "errors_table": out.errors_table}
        if out.parquet:
            loc["parquet"] = join_path(out.parquet, out.table)
            loc["errors_parquet"] = join_path(out.parquet, out.errors_table)
        if out.lancedb:
            loc["lancedb"] = out.lancedb
        loc["manifest"] = self.manifest_path()
        return loc

    def manifest_path(self) -> str:
        out = self.job.output
        base = out.manifest_dir or join_path(out.parquet or out.lancedb or ".", "_manifests")
        return join_path(base, f"{self.run_id}.json")

    def write_manifest(self, manifest: Mapping[str, Any]) -> str:
        data = dict(manifest)
        data.setdefault("job_config", self.job.model_dump(mode="json"))
        return write_manifest(self.manifest_path(), data, s3=self.s3)

