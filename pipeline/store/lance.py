"""LanceDB connections and the SQL bits our filters need."""

from __future__ import annotations

from collections.abc import Iterable
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


__all__ = ["connect_lance", "open_table", "sql_in", "sql_str"]
