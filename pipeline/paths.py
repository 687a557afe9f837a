"""Where stllm-index keeps its own files, and how a job's `model.path` becomes a checkpoint folder and a
content identity (shared by the CLI, the stages and the demo; imports nothing of theirs)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def index_home() -> Path:
    """stllm-index's own files (tiny model, demo): $STLLM_INDEX_HOME or ~/.cache/stllm-index."""
    return Path(os.environ.get("STLLM_INDEX_HOME", Path.home() / ".cache" / "stllm-index"))


def default_model_dir() -> Path:
    """Where the tiny random test model (`tiny`) is built on first use (no download, no network)."""
    from stllm.tiny import TINY_VERSION

    return index_home() / f"tiny-model-v{TINY_VERSION}"


def ensure_tiny_model(path: Path | None = None) -> Path:
    """Build the tiny model once. Built aside and renamed into place: two runs starting together on a fresh
    machine would otherwise read each other's half-written files."""
    path = path or default_model_dir()
    if (path / "config.json").exists():
        return path
    import shutil
    import uuid

    from stllm.tiny import build_tiny

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, path)  # atomic; fails when another process got there first (same deterministic model)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def world_model_dir() -> Path:
    """The synthetic world's trained model that ships with the package (`make demo-model` rebuilds it)."""
    import stllm.world

    return Path(stllm.world.__file__).resolve().parent / "demo_model"


def resolve_model_path(path: str) -> str:
    """`tiny` means the deterministic tiny random test model, built on first use on each node; `world` the
    shipped synthetic-world model."""
    if path == "world":
        return str(world_model_dir())
    return str(ensure_tiny_model()) if path == "tiny" else path


def checkpoint_id(path: str | os.PathLike) -> str:
    """The content identity of a converted folder: its weights' hash and its config. Weights re-converted into
    the same folder get a new identity; the same weights copied elsewhere keep theirs."""
    from stllm.loading import weights_hash

    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)  # written by whoever saved it, not part of the model
    payload = json.dumps({"weights": weights_hash(folder), "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
