"""LanceDB connections and the SQL bits our filters need."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from pipeline.io.sources import S3Options, is_s3


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


def sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values: Iterable[Any]) -> str:
    """`column IN ('a', 'b')` (strings quoted; an empty list matches nothing)."""
    vals = [sql_str(v) for v in values]
    return f"{column} IN ({', '.join(vals)})" if vals else "false"


def key_filter(key: Sequence[str], keys: Iterable[Sequence[str]]) -> str:
    """A LanceDB filter matching exactly these keys."""
    if len(key) == 1:
        return sql_in(key[0], [k[0] for k in keys])
    by_rest: dict[tuple[str, ...], list[str]] = {}
    for k in keys:
        by_rest.setdefault(tuple(k[1:]), []).append(k[0])
    parts = []
    for rest, firsts in by_rest.items():
        eq = " AND ".join(f"{c} = {sql_str(v)}" for c, v in zip(key[1:], rest, strict=True))
        parts.append(f"({sql_in(key[0], firsts)} AND {eq})")
    return " OR ".join(parts) or "false"


__all__ = ["connect_lance", "key_filter", "open_table", "sql_in", "sql_str"]
