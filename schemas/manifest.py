"""The run manifest: one JSON document per run, written beside the outputs.

The pydantic model is the source of truth; `manifest.schema.json` beside this file is its JSON Schema for
readers in other languages (`python -m schemas.manifest` rewrites it; a test keeps the two in sync).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JSON_SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class RunManifest(BaseModel):
    """What a run did. Unknown keys are kept: the runner may record more than this lists."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = Field(description="the Arrow schemas' SCHEMA_VERSION the run wrote")
    run_id: str = Field(min_length=1)
    job: str = Field(description="the job's name")
    config_hash: str = Field(description="the job's spec hash: what its cells are derived with (model, frames, "
                             "decoding, prompt format, caption prompt, questions, embedder)")
    model_id: str
    status: Literal["running", "succeeded", "failed", "interrupted"] = Field(
        default="succeeded", description="running until the run ends; interrupted: found running with no "
        "heartbeat by a later run (the process died)")
    started_at: datetime
    heartbeat_at: datetime | None = Field(default=None, description="last sign of life of a running run")
    finished_at: datetime | None = None
    error: str | None = Field(default=None, description="why a failed run failed (credentials masked)")
    counts: dict[str, int | dict[str, int]] = Field(
        default_factory=dict, description="objects: listed, skipped, known_bad, indexed (model work ran), copies "
        "(served from cells already computed), errors; work: model_calls, decoded, visual_encodings, "
        "generations {caption, answer}, cells_reused (so far, while running)")
    outputs: dict[str, Any] = Field(default_factory=dict, description="where the run wrote (paths, tables)")
    job_config: dict[str, Any] | None = Field(default=None, description="the validated job, secrets masked")
    versions: dict[str, str] = Field(default_factory=dict, description="package versions")


def manifest_json_schema() -> dict[str, Any]:
    return RunManifest.model_json_schema()


def write_json_schema(path: Path = JSON_SCHEMA_PATH) -> None:
    path.write_text(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")



if __name__ == "__main__":
    write_json_schema()
