"""The page's home before any search: the latest indexed videos, newest first, a page at a time, with the
catalog's filters (the `videos` view holds one row per video).

LanceDB has no ORDER BY: the order comes from one scan of two small columns (video_id, indexed_at) of the
selected rows (about 40 bytes a row: 40 MB for a million), then the page's rows alone are read whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from pipeline.catalog.query import HIT_COLUMNS, Filters, build_filter
from pipeline.store.lance import sql_str

if TYPE_CHECKING:
    from pipeline.catalog.query import Catalog

PER_PAGE = 20


@dataclass
class LatestPage:
    rows: list[dict[str, Any]] = field(default_factory=list)
    page: int = 1  # 1-based
    per_page: int = PER_PAGE
    total: int = 0  # videos the filters select

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def first(self) -> int:
        """The 1-based position of the page's first video (0 when there is none)."""
        return (self.page - 1) * self.per_page + 1 if self.rows else 0


def latest_videos(catalog: Catalog, filters: Filters | None = None, page: int = 1,
                  per_page: int = PER_PAGE) -> LatestPage:
    """Page `page` of the selected videos, newest first (ties by video_id: pages never overlap or skip)."""
    page, per_page = max(page, 1), max(per_page, 1)
    where = build_filter(filters or Filters(), catalog.columns)
    q = catalog.table.search()
    if where:
        q = q.where(where)
    keys = q.select(["video_id", "indexed_at"]).limit(None).to_arrow()
    if not keys.num_rows:
        return LatestPage(page=page, per_page=per_page)
    order = pc.sort_indices(keys, sort_keys=[("indexed_at", "descending"), ("video_id", "ascending")])
    newest: dict[str, Any] = {}  # video_id → its newest indexed_at, in display order
    for vid, at in zip(*(keys.column(c).take(order).to_pylist() for c in ("video_id", "indexed_at")), strict=True):
        newest.setdefault(vid, at)
    page = min(page, -(-len(newest) // per_page))  # past the last page: the last page
    chosen = list(newest.items())[(page - 1) * per_page: page * per_page]
    rows: list[dict[str, Any]] = []
    if chosen:
        columns = [c for c in HIT_COLUMNS if c in catalog.columns]
        found = catalog.table.search().where(f"video_id IN ({', '.join(sql_str(v) for v, _ in chosen)})") \
            .select(columns).limit(None).to_list()
        by_key = {(r["video_id"], r["indexed_at"]): r for r in found}  # several configs: pick the newest row
        rows = [by_key[key] for key in chosen if key in by_key]
    return LatestPage(rows=rows, page=page, per_page=per_page, total=len(newest))


__all__ = ["LatestPage", "PER_PAGE", "latest_videos"]
