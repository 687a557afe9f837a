"""Arrow schemas of every table stllm-index writes, versioned.

Bump `SCHEMA_VERSION` on any change a reader could notice (a column added, removed, renamed or retyped);
the version travels in each schema's metadata, so Parquet files and LanceDB tables say which one they hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from schemas.manifest import RunManifest, manifest_json_schema

SCHEMA_VERSION = 3  # 3: results are cells keyed by derivation; `videos`/`segments` are the current view, one
#                      row per object; 2: one row per (object, job config)
VERSION_KEY = b"stllm_index.schema_version"
TABLE_KEY = b"stllm_index.table"

# An answer in the view: the question, the answer, and what produced it (the model, the run).
ANSWER_TYPE = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string()),
                         pa.field("model", pa.string()), pa.field("run", pa.string())])
# Per-stage wall seconds of one video; the runner fills what it measures, the rest stays null.
TIMINGS_TYPE = pa.struct([
    pa.field("fetch_s", pa.float64()),
    pa.field("decode_s", pa.float64()),
    pa.field("model_s", pa.float64()),
    pa.field("embed_s", pa.float64()),
])
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
CELL_KINDS = ("media", "visual", "caption", "answer", "plan", "scores")
# curation signals (docs/curation.md), as the decode stage computes them and the view shows them; null where the
# job computes none
SCORE_FIELDS = [*(pa.field(f"score_{n}", pa.float64()) for n in ("motion", "sharpness", "brightness", "contrast",
                                                                   "static_fraction", "blank_fraction")),
                pa.field("score_cuts", pa.int32()), pa.field("score_text_fraction", pa.float64()),
                pa.field("score_text", pa.string())]


def _metadata(table: str, **extra: Any) -> dict[bytes, bytes]:
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()}
    meta.update({f"stllm_index.{k}".encode(): str(v).encode() for k, v in extra.items()})
    return meta


def _check_dims(text_dim: int, visual_dim: int) -> None:
    if text_dim < 1 or visual_dim < 1:
        raise ValueError(f"embedding dims must be >= 1, got text_dim={text_dim}, visual_dim={visual_dim}")


def _shown_fields(text_dim: int, visual_dim: int) -> list[pa.Field]:
    """The results a view row shows, each with what produced it."""
    return [
        pa.field("caption", pa.string()),
        pa.field("caption_model", pa.string()),
        pa.field("caption_prompt", pa.string()),
        pa.field("caption_run", pa.string()),
        pa.field("answers", pa.list_(ANSWER_TYPE)),
        pa.field("answers_text", pa.string()),
        pa.field("caption_embedding", pa.list_(pa.float32(), text_dim)),
        pa.field("visual_embedding", pa.list_(pa.float32(), visual_dim)),
        pa.field("visual_model", pa.string()),
        pa.field("stale", pa.bool_(), nullable=False),
        *SCORE_FIELDS,
    ]


def video_schema(text_dim: int = 384, visual_dim: int = 4096) -> pa.Schema:
    """The `videos` table: the index's CURRENT VIEW, exactly one row per object.

    `video_id` names the OBJECT (a hash of its uri: every copy of a video has its own row) and is the key;
    `content_id` names its bytes (ETag + size on S3, sha256 + size locally), shared by exact copies; `copy_of` is
    the first object of that content (null for it). The row shows, for the jobs registered on the index, the
    caption and answers with what produced each (`caption_model`, `answers[].model`, the run), built from the
    `cells` table (the history); `stale` is true while some shown result is a previous model's, waiting for the
    current one (a backfill). `jobs_done` lists `<job>:<spec>` for each job whose cells are all there: what a
    rerun of that job skips. `part` is commit bookkeeping (`pipeline.store.commit`). Embeddings are nullable
    fixed-size float32 vectors.
    """
    _check_dims(text_dim, visual_dim)
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("content_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("copy_of", pa.string()),
        *_shown_fields(text_dim, visual_dim),
        pa.field("jobs_done", pa.list_(pa.string())),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("decoder", pa.string()),
        pa.field("n_frames", pa.int64()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("thumbnail", pa.binary()),
        pa.field("timings", TIMINGS_TYPE),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("indexed_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("updated_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("part", pa.string()),
    ]
    return pa.schema(fields, metadata=_metadata("videos", text_dim=text_dim, visual_dim=visual_dim))


def segment_schema(text_dim: int = 384, visual_dim: int = 4096) -> pa.Schema:
    """Moments of long recordings (jobs with `segments.mode` fixed or shots): the current view, one row per
    segment of an object, key `segment_id` = "<video_id>:<segment index, 5 digits>".

    `video_id` is the row of the `videos` view it belongs to; `start_s`/`end_s` its time span and
    `media_fragment` the uri with a W3C media fragment (`<uri>#t=<start>,<end>`) that players open at the moment.
    A video no longer than one segment has one segment row, holding the video's own results.
    """
    _check_dims(text_dim, visual_dim)
    fields = [
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("content_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("media_fragment", pa.string(), nullable=False),
        pa.field("copy_of", pa.string()),
        *_shown_fields(text_dim, visual_dim),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("thumbnail", pa.binary()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("indexed_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("updated_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("part", pa.string()),
    ]
    return pa.schema(fields, metadata=_metadata("segments", text_dim=text_dim, visual_dim=visual_dim))


def cell_schema() -> pa.Schema:
    """The `cells` table: every result ever computed, keyed by what derived it — the index's history.

    `cell_id` = hash(content_id, scope, derivation) is the key: the same content asked the same thing by the
    same model is one cell, whichever object or run asked. `scope` is '' for a whole video, else
    "<segmentation>:<segment index>". `kind`: `media` (what decoding found: `text` holds its JSON, plus the
    thumbnail), `visual` (the visual embedding), `caption` / `answer` (`prompt` = the caption prompt or the
    question, `text` = the output, `text_embedding` by `embedder` for captions), `plan` (a video's segments,
    JSON). `derivation` hashes everything the value depends on (docs/architecture.md lists it per kind);
    `model_id` names the model in words. Vectors are variable-length lists: models of different widths share
    this table."""
    fields = [
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("content_id", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("derivation", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("text", pa.string()),
        pa.field("text_embedding", pa.list_(pa.float32())),
        pa.field("embedder", pa.string()),
        pa.field("visual_embedding", pa.list_(pa.float32())),
        pa.field("thumbnail", pa.binary()),
        pa.field("job", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("part", pa.string()),
    ]
    return pa.schema(fields, metadata=_metadata("cells"))


def media_fragment(uri: str, start_s: float, end_s: float) -> str:
    """`uri#t=start,end` (W3C Media Fragments, seconds), what a browser's video element seeks to."""
    return f"{uri}#t={start_s:.3f},{end_s:.3f}".replace(".000", "")


def error_schema() -> pa.Schema:
    """The error ledger: one record per (object, config) that failed, with its history. A known-bad object
    is skipped on rerun while its etag is unchanged (unless retried); the record goes when it succeeds."""
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("content_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        # True when the store or the network failed, not the object: tried again on the next run anyway
        pa.field("retryable", pa.bool_(), nullable=False),
        pa.field("first_seen", TIMESTAMP_TYPE, nullable=False),
        pa.field("last_seen", TIMESTAMP_TYPE, nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("part", pa.string()),
    ]
    return pa.schema(fields, metadata=_metadata("errors"))


def schema_version(schema: pa.Schema) -> int | None:
    """The version stored in a schema's metadata (None for tables written without one)."""
    raw = (schema.metadata or {}).get(VERSION_KEY)
    return int(raw) if raw is not None else None


def embedding_dims(schema: pa.Schema) -> dict[str, int]:
    """{column: dim} of the fixed-size-list columns, e.g. of an existing table."""
    return {f.name: f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)}


def check_schema(actual: pa.Schema, expected: pa.Schema) -> None:
    """Raise ValueError naming the first column whose presence or type differs (order is not checked)."""
    got = {f.name: f for f in actual}
    want = {f.name: f for f in expected}
    missing = [n for n in want if n not in got]
    if missing:
        raise ValueError(f"column '{missing[0]}' is missing (expected {want[missing[0]].type})")
    extra = [n for n in got if n not in want]
    if extra:
        raise ValueError(f"column '{extra[0]}' is not in the schema")
    for name, field in want.items():
        if not got[name].type.equals(field.type):
            raise ValueError(f"column '{name}' has type {got[name].type}, expected {field.type}")


def check_table(table: pa.Table, schema: pa.Schema) -> None:
    """Raise ValueError naming the mismatched column: missing, unexpected, wrong type, or nulls where
    the schema forbids them."""
    check_schema(table.schema, schema)
    for field in schema:
        if not field.nullable:
            nulls = table.column(field.name).null_count
            if nulls:
                raise ValueError(f"column '{field.name}' has {nulls} null value(s) but is not nullable")


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table in the schema's column order (missing keys become null), then check it. A value that
    does not fit its column raises ValueError naming the column."""
    rows = list(rows)
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
        for field in schema:  # find the culprit: pyarrow's message does not name it
            try:
                pa.array([r.get(field.name) for r in rows], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as col_error:
                raise ValueError(f"column '{field.name}': {col_error}") from None
        raise ValueError(str(e)) from None
    check_table(table, schema)
    return table


def flatten_answers(answers: Iterable[Mapping[str, str]] | None) -> str:
    """The answers as one text for full-text search: 'question answer' per line."""
    return "\n".join(f"{a.get('question', '')} {a.get('answer', '')}".strip() for a in (answers or []))


__all__ = [
    "SCHEMA_VERSION",
    "VERSION_KEY",
    "RunManifest",
    "check_schema",
    "check_table",
    "embedding_dims",
    "error_schema",
    "media_fragment",
    "segment_schema",
    "cell_schema",
    "CELL_KINDS",
    "SCORE_FIELDS",
    "ANSWER_TYPE",
    "flatten_answers",
    "manifest_json_schema",
    "rows_to_table",
    "schema_version",
    "video_schema",
]
