"""The error ledger: one record per (object, job spec) that failed, with its history (attempts, first and last
seen). A known-bad object is skipped on rerun while its etag is unchanged (unless retried); its record goes when
it succeeds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.redact import redact
from schemas import error_schema


def ledger_row(r: dict[str, Any], spec_hash: str, run_id: str, now: datetime, stage: str, error_type: str,
               message: str, retryable: bool) -> dict[str, Any]:
    prev, first = r.get("prev_attempts"), r.get("first_seen")
    return {
        "video_id": r["video_id"], "config_hash": spec_hash, "uri": r["uri"], "etag": r.get("etag"),
        "size": None if r.get("size") is None else int(r["size"]), "content_id": r.get("content_id"),
        "stage": stage, "error_type": error_type, "message": redact(message), "retryable": bool(retryable),
        "attempts": int(prev or 0) + 1, "first_seen": first or now, "last_seen": now, "run_id": run_id,
        "part": None,
    }


def failure_row(r: dict[str, Any], spec_hash: str, run_id: str, now: datetime) -> dict[str, Any]:
    """The record of a row that failed in a stage (`error_*` set on it)."""
    return ledger_row(r, spec_hash, run_id, now, r["error_stage"], r.get("error_type") or "Error",
                      r.get("error_message") or "", bool(r.get("error_retryable")))


def ledger_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One record per key, the last given (a merge with two rows for one key is refused)."""
    return pa.Table.from_pylist(list({(r["video_id"], r["config_hash"]): r for r in rows}.values()),
                                schema=error_schema())


__all__ = ["failure_row", "ledger_row", "ledger_table"]
