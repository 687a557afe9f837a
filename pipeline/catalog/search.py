"""The one query builder over an index's table: full-text, vector, or hybrid (both, fused by reciprocal rank)
— used by `stllm-index search/similar`, the web page, the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.io.sources import S3Options
from pipeline.store.lance import connect_lance
from pipeline.store.search_indexes import NPROBES, REFINE_FACTOR


def query_table(tbl: Any, text: str | None = None, vector: Sequence[float] | None = None, k: int = 5, *,
                vector_column: str = "caption_embedding", fts_columns: Sequence[str] = ("caption", "answers_text"),
                where: str | None = None, columns: Sequence[str] | None = None,
                metric: str = "cosine", prefilter: bool = True) -> list[dict[str, Any]]:
    """Rows best first, with `_score` (FTS), `_distance` (vector) or `_relevance_score` (hybrid, RRF).
    Filters apply before ranking (`prefilter`): k hits that all match, not the matches among k hits; with
    `prefilter=False` they apply to the k hits found (fewer may remain; no scan of the filter's columns)."""
    from lancedb.query import MultiMatchQuery
    from lancedb.rerankers import RRFReranker

    if text is None and vector is None:
        raise ValueError("search needs text, a vector, or both")
    fts: Any = MultiMatchQuery(text, list(fts_columns)) if text is not None and len(fts_columns) > 1 else text
    score: list[str] = []
    if text is not None and vector is not None:
        # the vector side with the index's own settings: LanceDB's hybrid defaults (no re-ranking on the exact
        # vectors) found 0.59 of the exact top 10 (make bench: hybrid_recall_at_10_*)
        q = (tbl.search(query_type="hybrid", vector_column_name=vector_column).vector(list(vector)).text(fts)
             .distance_type(metric).nprobes(NPROBES).refine_factor(REFINE_FACTOR).rerank(RRFReranker()))
    elif text is not None:
        column = list(fts_columns)[0] if len(fts_columns) == 1 else None
        q = tbl.search(fts, query_type="fts", fts_columns=column)
        score = ["_score"]
    else:
        q = (tbl.search(list(vector), vector_column_name=vector_column).distance_type(metric)
             .nprobes(NPROBES).refine_factor(REFINE_FACTOR))
        score = ["_distance"]
    if where:
        q = q.where(where, prefilter=prefilter)
    if columns:
        q = q.select([*columns, *score])
    return q.limit(k).to_list()


def search(uri: str, table: str, text: str | None = None, vector: Sequence[float] | None = None, k: int = 5,
           *, s3: S3Options | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """`query_table` on the table `table` of the LanceDB database `uri`."""
    return query_table(connect_lance(uri, s3).open_table(table), text, vector, k, **kwargs)
