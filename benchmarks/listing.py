"""Listing memory: what a nightly run holds while it lists the archive and checks it against the index.

`listing_rss_growth_10k_to_1m`: peak RSS of the process that lists (the read task; the driver holds nothing of the
listing) over a generated listing of 1M S3 keys vs its first 10k keys, minus 1 — against the same real index
(LanceDB, the store's `videos` view, `cells` and `errors` tables, with their scalar indexes) of 1M objects, 99% of
them already done by this job (what a nightly rerun meets), so the figure is what the LISTING's length costs, not
the index's size. The listing itself is generated (`iter_pages` replaced: no million objects are needed); the
per-page lookups (`pipeline.io.listing.iter_work`: view, ledger, cells, first objects) and the classification are
the product's code. Each size is listed 3 times, each in a fresh process; the figure is the median of the three
ratios (repetition k of the large size over repetition k of the small one).
`--quick`: 100k objects, 1k vs 100k keys.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, from_reps

REPO = Path(__file__).resolve().parents[1]

_SPEC = """
from pipeline.jobs import load_job
from pipeline.runner import model_facts
job = load_job(None, ["source.uri=s3://bench/v", "output.lancedb={lance}"])
spec = job.spec(model_facts(job))
"""

_BUILD = """
import sys
sys.path.insert(0, {repo!r})
import pyarrow as pa
from datetime import datetime, timezone
from lancedb.index import BTree
from pipeline.io.sources import object_id, s3_content_id
from pipeline.store.lance import connect_lance
from schemas import cell_schema, error_schema
""" + _SPEC + """
db = connect_lance({lance!r})
done = [f"{{spec.job}}:{{spec.spec}}"]
now = datetime(2026, 12, 1, tzinfo=timezone.utc)
table = None
for start in range(0, {n}, 100_000):
    rows = [i for i in range(start, min({n}, start + 100_000)) if i % 100]  # 1% left new
    uris = [f"s3://bench/v/{{i:08d}}.mp4" for i in rows]
    batch = pa.table({{"video_id": [object_id(u) for u in uris], "uri": uris, "etag": [f"e{{i}}" for i in rows],
                      "content_id": [s3_content_id(f"e{{i}}", 1000) for i in rows],
                      "copy_of": pa.nulls(len(rows), pa.string()), "jobs_done": [done] * len(rows),
                      "indexed_at": pa.array([now] * len(rows), pa.timestamp("us", tz="UTC"))}})
    table = db.create_table("videos", batch) if table is None else table
    if start:
        table.add(batch)
table.create_index("video_id", config=BTree())
table.create_index("content_id", config=BTree())
cells = db.create_table("cells", schema=cell_schema())
db.create_table("errors", schema=error_schema())
"""

_LIST = """
import json, pickle, sys, time
sys.path.insert(0, {repo!r})
from pipeline.io import listing
from pipeline.io.sources import VideoSource

def pages(uri, *, page_size, **_):  # a generated listing
    for start in range(0, {n}, page_size):
        yield [VideoSource(f"s3://bench/v/{{i:08d}}.mp4", 1000, f"e{{i}}", 0.0)
               for i in range(start, min({n}, start + page_size))]

listing.iter_pages = pages
with open({plan!r}, "rb") as f:
    plan = pickle.load(f)  # as the read task gets it: the plan travels, the job and the model do not
t0 = time.perf_counter()
counts = {{"work": 0, "copy": 0, "listed": 0, "skipped": 0}}

def tally(page):  # each page's counts, as the run's RunStats actor gets them
    counts["listed"] += int(page["listed"]); counts["skipped"] += int(page["skipped"])

for block in listing.iter_work(plan, on_tally=tally):
    for kind in block.column("kind").to_pylist():
        counts[kind] += 1
# VmHWM, this process's own high-water mark: ru_maxrss carries the parent's RSS over fork + exec (it read the
# benchmark process's 660 MiB at both sizes)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"peak_mib": hwm / 1024,
                  "seconds": time.perf_counter() - t0, **counts}}))
"""


def _plan(lance: str, folder: Path) -> Path:
    """The job's WorkPlan, pickled for the listing processes (what `new_work_dataset` ships to its read task)."""
    import pickle

    from pipeline.jobs import load_job
    from pipeline.runner import model_facts, work_plan

    job = load_job(None, ["source.uri=s3://bench/v", f"output.lancedb={lance}"])
    path = folder / "plan.pickle"
    path.write_bytes(pickle.dumps(work_plan(job, job.spec(model_facts(job)))))
    return path


def _measure(n: int, plan: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _LIST.format(repo=str(REPO), plan=str(plan), n=n)],
                         check=True, capture_output=True, text=True, timeout=3600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["listed"] == n and result["work"] == n // 100, result
    return result


def _tag(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"


def bench_listing(quick: bool = False, reps: int = 3) -> list[Result]:
    index = 100_000 if quick else 1_000_000
    small, large = index // 100, index
    with tempfile.TemporaryDirectory() as tmp:
        lance = str(Path(tmp) / "lance")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _BUILD.format(repo=str(REPO), lance=lance, n=index)], check=True,
                       timeout=3600)
        build_s = time.perf_counter() - t0
        plan = _plan(lance, Path(tmp))
        runs = [(_measure(small, plan), _measure(large, plan)) for _ in range(reps)]
    ratios = [b["peak_mib"] / a["peak_mib"] - 1 for a, b in runs]
    return [from_reps(f"listing_rss_growth_{_tag(small)}_to_{_tag(large)}", ratios, "<= 0.10", baseline={
        "what": f"the same listing process over {small} keys",
        "peak_mib": round(statistics.median(a["peak_mib"] for a, _ in runs))}, detail={
        f"peak_mib_{small}": [round(a["peak_mib"]) for a, _ in runs],
        f"peak_mib_{large}": [round(b["peak_mib"]) for _, b in runs],
        f"keys_per_s_{large}": round(statistics.median(large / b["seconds"] for _, b in runs)),
        "indexed_share": 0.99, "index_rows": index, "index_build_s": round(build_s, 1),
        "index": "LanceDB view + cells + errors"})]
