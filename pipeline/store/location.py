"""Where an index lives and its tables: the `videos` and `segments` views, the `cells` history, the `errors`
ledger — each in a Parquet root and/or a LanceDB database (`pipeline.store.commit.TableStore`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.io.sources import S3Options
from pipeline.store.commit import TableStore
from pipeline.store.lance import connect_lance
from schemas import cell_schema, error_schema

CELLS_TABLE = "cells"


@dataclass(frozen=True)
class IndexLocation:
    """Where a job's index lives (picklable: it travels to the listing task)."""

    parquet_root: str | None
    lancedb: str | None
    videos_table: str
    errors_table: str
    s3: S3Options | None
    segments_table: str = "segments"
    cells_table: str = CELLS_TABLE

    def table(self, name: str, key: tuple[str, ...], schema: Any = None, locate_by: str | None = None) -> TableStore:
        """One of the index's tables (`schema`: checked against what is there; None: opened as it is)."""
        db = connect_lance(self.lancedb, self.s3) if self.lancedb else None
        return TableStore(name, key=key, schema=schema, parquet_root=self.parquet_root, lance_db=db, s3=self.s3,
                          lance_uri=self.lancedb or "", locate_by=locate_by)

    def videos(self) -> TableStore:
        """The current view, one row per object (its schema's embedding widths are the index's)."""
        return self.table(self.videos_table, ("video_id",))

    def segments(self) -> TableStore:
        return self.table(self.segments_table, ("segment_id",), locate_by="video_id")

    def cells(self) -> TableStore:
        return self.table(self.cells_table, ("cell_id",), cell_schema(), locate_by="content_id")

    def errors(self) -> TableStore:
        return self.table(self.errors_table, ("video_id", "config_hash"), error_schema())

    @property
    def root(self) -> str:
        """The folder that holds the lock and the job registry."""
        return self.parquet_root or self.lancedb or "."

    @property
    def roots(self) -> list[str]:
        """Every folder of the index (the registry is kept in each: `status` may be given either)."""
        return [r for r in (self.parquet_root, self.lancedb) if r] or ["."]


__all__ = ["IndexLocation", "CELLS_TABLE"]
