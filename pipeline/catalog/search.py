"""Search an index: full-text, vector or hybrid queries over the LanceDB table a job wrote."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.io.indexes import NPROBES, REFINE_FACTOR
from pipeline.io.sinks import connect_lance
from pipeline.io.sources import S3Options


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
        q = (tbl.search(list(vector), vector_column_name=vector_column).distance_type(metric)
             .nprobes(NPROBES).refine_factor(REFINE_FACTOR))
    if where:
        q = q.where(where)
    if columns:
        q = q.select(list(columns))
    return q.limit(k).to_list()
