"""The index writer alone (no model): `writer_rows_per_s_sustained`.

Rows shaped as the model stage hands them to the writer — a caption, two answers, real-sized embeddings (384-d
text, 1408-d visual: EVA-CLIP ViT-g's width), media facts, a ~6 KB thumbnail, curation scores — go through the
product's own path: `BackgroundWriter` (bounded queue, commits of up to `commit_every` rows or `commit_seconds`)
→ `IndexWriter` (six cells per video, the view row built from the content's cells, the ledger) → Parquet +
LanceDB, folded between commits. The table grows from 0 to N rows in ONE run; the figures: rows/s of the stream
(from the first row handed over to the last one committed; making the rows, in batches of 32 as Ray Data hands
them, is on the same clock and the same 2 cores), rows/s with the search indexes built at the end, commit latency
p50/p95 per tenth of the rows (the last tenth over the first: flat?), files and LanceDB versions at the end.

    python -m benchmarks.writer [--quick]      (the same as python -m benchmarks.run --only writer writer_s3)
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.common import Result, from_reps

FACTS = {"model_id": "bench:residual:64", "checkpoint_id": "bench-weights", "num_frames": 64,
         "frame_sampling": "original"}
TEXT_DIM, VISUAL_DIM, BATCH = 384, 1408, 32
POOL = 4096  # distinct embeddings the rows cycle through: more than the vector index's √N partitions up to 1M rows
WORDS = ("a person walks the dog along a beach at sunset while waves roll in and a child builds a sand castle "
         "near colourful umbrellas under a clear sky").split()


def _rows(spec: Any, start: int, n: int, rng: np.random.Generator, pool: dict[str, np.ndarray]) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        words = rng.choice(WORDS, 24)
        caption = " ".join(words)
        rows.append({
            "kind": "work", "uri": f"s3://archive/videos/{i:08d}.mp4", "video_id": f"{i:016x}",
            "content_id": f"etag-{i:08d}:{1_000_000 + i}", "size": 1_000_000 + i, "etag": f"etag-{i:08d}",
            "copy_of": None, "prev_attempts": 0, "first_seen": None, "indexed_at": None, "wait": False,
            "caption_prompt": spec.caption.prompt, "questions": [a.prompt for a in spec.questions],
            "need_media": True, "need_visual": True, "need_scores": True, "need_segments": False, "reused": 0,
            "duration_s": 30.0, "fps": 30.0, "width": 1280, "height": 720, "codec": "h264", "decoder": "decord",
            "n_frames": 900, "frame_indices": list(range(0, 900, 14))[:64], "thumbnail": pool["thumb"].tobytes(),
            "decode_s": 0.2, "model_s": 1.0, "embed_s": 0.01, "error_stage": None, "error_type": None,
            "error_message": None, "error_retryable": False, "caption": caption,
            "answers": [{"question": a.prompt, "answer": " ".join(words[:6])} for a in spec.questions],
            "caption_embedding": pool["text"][i % len(pool["text"])],
            "visual_embedding": pool["visual"][i % len(pool["visual"])], "model_calls": 1,
            "score_motion": 0.1, "score_sharpness": 250.0, "score_brightness": 0.5, "score_contrast": 0.2,
            "score_static_fraction": 0.0, "score_blank_fraction": 0.0,
        })
    return pa.Table.from_pylist(rows)


def run(rows: int, root: str, s3: Any = None, slices: int = 100_000) -> dict[str, Any]:
    from pipeline.jobs import load_job
    from pipeline.runner import index_location
    from pipeline.store.background import BackgroundWriter, quantile
    from pipeline.store.writer import IndexWriter

    job = load_job(None, [f"output.parquet={root}/parquet", f"output.lancedb={root}/lancedb",
                          f"output.manifest_dir={root}/runs", 'questions=["What happens?", "Is it indoors?"]'])
    if s3 is not None:
        job.output.s3 = s3
    spec = job.spec(FACTS)
    rng = np.random.default_rng(0)
    pool = {"text": [v.tolist() for v in rng.standard_normal((POOL, TEXT_DIM)).astype(np.float32)],
            "visual": [v.tolist() for v in rng.standard_normal((POOL, VISUAL_DIM)).astype(np.float32)],
            "thumb": rng.integers(0, 255, 6000, dtype=np.uint8)}
    writer = IndexWriter(index_location(job), spec, run_id="bench")
    background = BackgroundWriter(writer, max_rows=job.runtime.commit_every, max_seconds=job.runtime.commit_seconds)
    t0 = time.perf_counter()
    for start in range(0, rows, BATCH):
        background.submit(_rows(spec, start, min(BATCH, rows - start), rng, pool))
    background.close()
    stream = time.perf_counter() - t0  # every row committed
    writer.finish()
    wall = time.perf_counter() - t0  # and the search indexes built on them
    per_slice: dict[int, list[float]] = {}
    done = 0
    for n, lat in zip(background.rows, background.latencies, strict=True):
        per_slice.setdefault(done // slices, []).append(lat)
        done += n

    table = {f"{k * slices // 1000}k-{(k + 1) * slices // 1000}k": {
        "p50_s": round(statistics.median(v), 3), "p95_s": round(quantile(v, 0.95), 3), "commits": len(v)}
        for k, v in sorted(per_slice.items())}
    files = {name: len(index_location(job).table(name, ("x",)).parquet_files())
             for name in ("videos", "cells")} if s3 is None else {}
    versions = {}
    for store in (writer.videos, writer.cells):
        if store.lance_table is not None:
            versions[store.name] = len(store.lance_table.list_versions())
    first, last = next(iter(per_slice.values())), per_slice[max(per_slice)]
    return {"rows": rows, "stream_s": round(stream, 1), "rows_per_s": round(rows / stream, 1),
            "indexes_s": round(wall - stream, 1), "rows_per_s_with_indexes": round(rows / wall, 1),
            "p50_last_over_first": round(statistics.median(last) / statistics.median(first), 3),
            "commit_latency": table, "parquet_files": files, "lance_versions": versions,
            "writer": background.stats()}


def bench_writer(quick: bool = False, rows: int | None = None, reps: int = 3) -> list[Result]:
    """`reps` runs of `rows` on local disk: 300k (`--quick`: 30k). A run of 1M rows needs about 60 GB of free
    disk while it runs (both stores, each row's cells and view row, LanceDB's versions until they are cleaned
    up), more than the 2-core development machine has: `bench_writer(rows=1_000_000)` where it fits."""
    rows = rows or (30_000 if quick else 300_000)
    runs = []
    for _ in range(reps):
        root = tempfile.mkdtemp(prefix="bench-writer-", dir="/tmp")
        try:
            runs.append(run(rows, root, slices=max(rows // 10, 1)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    last = runs[-1]
    common = {"rows": rows, "disk": "local"}
    return [
        from_reps("writer_rows_per_s_sustained", [r["rows_per_s"] for r in runs], ">= 1000", "rows/s",
                  detail={**common, "stream_s": [r["stream_s"] for r in runs], "writer": last["writer"],
                          "commit_latency_last_run": last["commit_latency"]}),
        from_reps("writer_rows_per_s_with_indexes", [r["rows_per_s_with_indexes"] for r in runs], "info", "rows/s",
                  detail={**common, "indexes_s": [r["indexes_s"] for r in runs]}),
        from_reps("writer_commit_p50_last_over_first", [r["p50_last_over_first"] for r in runs], "<= 1.5",
                  detail={**common, "slices": f"{rows // 10} rows"}),
        from_reps("writer_parquet_files_videos", [r["parquet_files"]["videos"] for r in runs], "<= 100", "files",
                  detail={**common, "cells_files": [r["parquet_files"]["cells"] for r in runs],
                          "lance_versions": [r["lance_versions"] for r in runs]}),
    ]


def bench_writer_s3(quick: bool = False, rows: int | None = None, reps: int = 3) -> list[Result]:
    """`reps` runs of `rows` (100k; `--quick`: 10k) against SeaweedFS on this machine."""
    from tests.conftest import seaweedfs_for_benchmarks

    rows = rows or (10_000 if quick else 100_000)
    with seaweedfs_for_benchmarks() as server:
        runs = [run(rows, f"s3://{server.bucket(f'bench{k}')}/index", s3=server.options(), slices=max(rows // 10, 1))
                for k in range(reps)]
    return [from_reps("writer_rows_per_s_s3", [r["rows_per_s"] for r in runs], ">= 300", "rows/s",
                      detail={"rows": rows, "store": "SeaweedFS on this machine",
                              "stream_s": [r["stream_s"] for r in runs], "indexes_s": [r["indexes_s"] for r in runs],
                              "commit_latency_last_run": runs[-1]["commit_latency"]})]


if __name__ == "__main__":
    import sys

    from benchmarks.run import main

    sys.exit(main(["--only", "writer", "writer_s3", *sys.argv[1:]]))
