"""The index record: `stllm-index.json` at the root of an index (the job's `output.parquet` root and its
`output.lancedb` folder), written when a run starts. It says where the index's run manifests are, so
`stllm-index status INDEX` and the page's runs view find them wherever the job put them (`output.manifest_dir`),
from either root. Every manifest folder a job has used is kept, the latest last."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from pipeline.io.sources import S3Options, is_s3
from pipeline.redact import redact
from pipeline.store.files import filesystem, join_path, write_atomic
from pipeline.store.location import IndexLocation

if TYPE_CHECKING:
    from pipeline.jobs import OutputConfig

RECORD_NAME = "stllm-index.json"


def read_index_record(index: str, s3: S3Options | None = None) -> dict[str, Any]:
    """The record of the index at `index` ({} when it has none, or it cannot be read)."""
    fs, inner = filesystem(join_path(index, RECORD_NAME), s3)
    try:
        with fs.open_input_stream(inner) as f:
            record = json.loads(f.read())
    except (OSError, ValueError):  # missing (an index from before records), or half-written by hand
        return {}
    return record if isinstance(record, dict) else {}


def recorded_manifest_dirs(index: str, s3: S3Options | None = None) -> list[str]:
    """The manifest folders the index's runs used, oldest first ([] when unrecorded)."""
    return _manifest_dirs(read_index_record(index, s3))


def _manifest_dirs(record: dict[str, Any]) -> list[str]:
    dirs = record.get("manifest_dirs")
    return [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []


def _absolute(path: str) -> str:
    return path if is_s3(path) else os.path.abspath(os.path.expanduser(path))


def record_manifest_dir(output: OutputConfig, manifest_dir: str) -> None:
    """Add `manifest_dir` to the records of the job's index roots, with where the index's stores are (local paths
    made absolute: a job's relative paths are relative to where it ran, `status` and `prune` may run elsewhere)."""
    entry = _absolute(manifest_dir)
    stores = {"parquet": output.parquet and _absolute(output.parquet), "lancedb": output.lancedb and _absolute(
        output.lancedb), "table": output.table, "errors_table": output.errors_table,
              "segments_table": output.segments_table}
    for root in filter(None, (output.parquet, output.lancedb)):
        record = read_index_record(root, output.s3)
        dirs = _manifest_dirs(record)
        if dirs and dirs[-1] == entry and record.get("stores") == stores:
            continue  # the usual rerun: nothing to write
        record["manifest_dirs"] = [d for d in dirs if d != entry] + [entry]
        record["stores"] = stores
        fs, inner = filesystem(join_path(root, RECORD_NAME), output.s3)
        write_atomic(fs, inner, redact(json.dumps(record, indent=2)).encode())


def recorded_location(index: str, s3: S3Options | None = None) -> IndexLocation | None:
    """Both stores of the index one of whose roots is `index`, as its runs recorded them (None: unrecorded)."""
    stores = read_index_record(index, s3).get("stores")
    if not isinstance(stores, dict) or not (stores.get("parquet") or stores.get("lancedb")):
        return None
    return IndexLocation(parquet_root=stores.get("parquet"), lancedb=stores.get("lancedb"),
                         videos_table=stores.get("table") or "videos",
                         errors_table=stores.get("errors_table") or "errors",
                         segments_table=stores.get("segments_table") or "segments", s3=s3)


__all__ = ["RECORD_NAME", "read_index_record", "record_manifest_dir", "recorded_location", "recorded_manifest_dirs"]
