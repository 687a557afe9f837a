"""Listing memory: what a nightly run holds while it lists the archive and checks it against the index.

`listing_rss_growth_10k_to_1m`: peak RSS of the process that lists (the read task; the driver holds nothing of
the listing at all) over a generated listing of 1M keys vs its first 10k keys, minus 1 — against the same real
LanceDB index of 1M rows that already holds 99% of them (what a nightly rerun meets), so the figure is what the
LISTING's length costs, not the index's size. The listing itself is generated (`iter_pages` replaced:
no million objects are needed); the index, the per-page lookups and the classification are the real code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Result

REPO = Path(__file__).resolve().parents[1]

_BUILD = """
import sys
sys.path.insert(0, {repo!r})
import pyarrow as pa
from pipeline.store.lance import connect_lance
from pipeline.io.sources import object_id, s3_content_id
db = connect_lance({lance!r})
table = None
for start in range(0, {n}, 100_000):
    rows = [i for i in range(start, min({n}, start + 100_000)) if i % 100]  # 1% left new
    uris = [f"s3://bench/v/{{i:08d}}.mp4" for i in rows]
    batch = pa.table({{"video_id": [object_id(u) for u in uris], "config_hash": ["c"] * len(rows),
                      "uri": uris, "etag": [f"e{{i}}" for i in rows],
                      "content_id": [s3_content_id(f"e{{i}}", 1000) for i in rows],
                      "copy_of": pa.nulls(len(rows), pa.string())}})
    table = db.create_table("videos", batch) if table is None else table
    if start:
        table.add(batch)
from lancedb.index import BTree
table.create_index("video_id", config=BTree())
table.create_index("content_id", config=BTree())
"""

_LIST = """
import json, resource, sys, time
N_INDEX = {n_index}
sys.path.insert(0, {repo!r})
from pipeline.io import listing
from pipeline.io.sources import VideoSource

def pages(uri, *, page_size, **_):  # a generated listing
    for start in range(0, {n}, page_size):
        yield [VideoSource(f"s3://bench/v/{{i:08d}}.mp4", 1000, f"e{{i}}", 0.0)
               for i in range(start, min({n}, start + page_size))]

listing.iter_pages = pages
plan = listing.WorkPlan(source_uri="s3://bench/v", extensions=("mp4",), source_s3=None, config_hash="c",
                        index=listing.IndexLocation(None, {lance!r}, "videos", "errors", None), page_size=1000)
t0 = time.perf_counter()
counts = {{"work": 0, "copy": 0, "listed": 0, "skipped": 0}}
for block in listing.iter_work(plan):
    for r in block.to_dict("records"):
        if r["kind"] == "tally":
            counts["listed"] += int(r["listed"]); counts["skipped"] += int(r["skipped"])
        else:
            counts[r["kind"]] += 1
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, **counts}}))
"""


def _measure(n: int, lance: str, n_index: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _LIST.format(repo=str(REPO), lance=lance, n=n, n_index=n_index)],
                         check=True, capture_output=True, text=True, timeout=3600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["listed"] == n and result["work"] == n // 100, result
    return result


def bench_listing(small: int = 10_000, large: int = 1_000_000) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        lance = str(Path(tmp) / "lance")
        subprocess.run([sys.executable, "-c", _BUILD.format(repo=str(REPO), lance=lance, n=large)], check=True,
                       timeout=1800)
        a, b = _measure(small, lance, large), _measure(large, lance, large)
    def tag(n: int) -> str:
        return f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"

    return [Result(f"listing_rss_growth_{tag(small)}_to_{tag(large)}", b["peak_mib"] / a["peak_mib"] - 1,
                   "<= 0.10", detail={
                       f"peak_mib_{small}": round(a["peak_mib"]), f"peak_mib_{large}": round(b["peak_mib"]),
                       f"keys_per_s_{large}": round(large / b["seconds"]), "indexed_share": 0.99,
                       "index_rows": large})]
