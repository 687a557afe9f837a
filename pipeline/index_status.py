"""`stllm-index status INDEX`: what an index holds and how its last runs went — from the run manifests, the
results table and the error ledger (Parquet root or LanceDB folder, local or s3://)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.fs as pafs

from pipeline.io.index_record import recorded_manifest_dirs
from pipeline.io.listing import IndexLocation
from pipeline.io.sinks import filesystem, join_path, list_manifests, mark_interrupted
from pipeline.io.sources import S3Options, is_s3


def _locate(index: str, s3: S3Options | None) -> IndexLocation:
    fs, inner = filesystem(index, s3)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))}
    if not names:
        raise ValueError(f"{index} is not an index: it is missing or empty")
    if "videos.lance" in names or "errors.lance" in names:
        return IndexLocation(parquet_root=None, lancedb=index, videos_table="videos", errors_table="errors", s3=s3)
    if "videos" in names or "errors" in names:
        return IndexLocation(parquet_root=index, lancedb=None, videos_table="videos", errors_table="errors", s3=s3)
    raise ValueError(f"{index} is not an index: no 'videos' Parquet dataset or LanceDB table in it "
                     "(give the job's output.parquet root or output.lancedb folder)")


def index_status(index: str, runs: int = 5, manifest_dir: str | None = None) -> dict[str, Any]:
    s3 = S3Options() if is_s3(index) else None
    loc = _locate(index, s3)
    videos, errors = loc.stores()
    # Where the runs' manifests are: as told, else as the index recorded (the job's output.manifest_dir), else
    # the default of a job that set none.
    folders = [manifest_dir] if manifest_dir else (recorded_manifest_dirs(index, s3)
                                                   or [join_path(index, "_manifests")])
    by_run: dict[str, dict[str, Any]] = {}
    for folder in folders:
        mark_interrupted(folder, s3)
        by_run.update((m.get("run_id") or "", m) for m in list_manifests(folder, s3))
    manifests = sorted(by_run.values(), key=lambda m: m.get("started_at") or "")
    by_type: Counter[str] = Counter()
    retryable = 0
    if errors.count():
        table = errors.lance_table.to_arrow() if errors.lance_table is not None else None
        if table is None:
            import pyarrow.dataset as ds

            table = ds.dataset(errors.root, filesystem=errors.fs, format="parquet").to_table(
                columns=["stage", "error_type", "retryable"])
        for stage, kind, again in zip(*(table.column(c).to_pylist() for c in ("stage", "error_type", "retryable")),
                                      strict=True):
            by_type[f"{stage}: {kind}"] += 1
            retryable += bool(again)
    return {
        "index": index, "manifest_dirs": folders, "videos": videos.count(), "errors": errors.count(),
        "retryable_errors": retryable,
        "errors_by_type": dict(by_type.most_common()),
        "runs": [{k: m.get(k) for k in ("run_id", "job", "status", "started_at", "finished_at", "wall_s",
                                        "counts", "error")} for m in manifests[-runs:]],
    }


def print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    from pipeline.report import console

    out = console()
    out.print(f"[bold]{status['index']}[/bold]: {status['videos']} indexed rows, {status['errors']} known-bad "
              f"objects ({status['retryable_errors']} failed on the store and will be retried)")
    if status["errors_by_type"]:
        t = Table(title="errors by type")
        t.add_column("stage: type")
        t.add_column("objects", justify="right")
        for kind, n in status["errors_by_type"].items():
            t.add_row(kind, str(n))
        out.print(t)
    t = Table(title=f"last {len(status['runs'])} runs (manifests in {', '.join(status['manifest_dirs'])})")
    for col in ("run", "status", "listed", "new", "copies", "skipped", "errors"):
        t.add_column(col, no_wrap=True)
    for r in status["runs"]:
        c = r.get("counts") or {}
        skipped = (c.get("skipped") or 0) + (c.get("known_bad") or 0)
        t.add_row(r["run_id"], r.get("status") or "?",
                  *(str(v) for v in (c.get("listed", ""), c.get("indexed", ""), c.get("copies", ""), skipped,
                                     c.get("errors", ""))))
    out.print(t)
