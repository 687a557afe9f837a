"""`stllm-index prune INDEX`: what the index no longer needs goes — only when asked, with a dry run first.

- `--job NAME`: the job leaves the registry; its questions (and its caption, if it owned it) leave the view, which
  is rebuilt from the cells (no model work). Its cells stay (history) unless `--superseded` also runs.
- `--superseded`: cells that no registered job asks for — earlier models, dropped questions, old prompts — are
  deleted, except where a view row still shows one (a backfill has not reached that video yet). What the view
  shows never changes.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from pipeline.store.cells import JobSpec
from pipeline.store.location import IndexLocation
from pipeline.store.locks import IndexLock
from pipeline.store.registry import load_registry, unregister

log = logging.getLogger(__name__)
CHUNK = 2000  # view rows rebuilt per commit


def _kept(specs: list[JobSpec]) -> set[str]:
    out: set[str] = set()
    for s in specs:
        out |= s.required()
        if s.segmentation:
            out.add(s.segmentation)
    return out


def superseded_cells(location: IndexLocation, specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Cells no job in `specs` asks for whose content holds what replaces them: a cell of the same kind (and
    prompt, for answers) that a job asks for, in the same scope. The others may still be what a view row shows."""
    table = location.cells().read_all(["cell_id", "content_id", "scope", "kind", "derivation", "prompt",
                                       "model_id"])
    if table is None:
        return []
    kept = _kept(specs)
    cells = table.to_pylist()
    replaced: set[tuple[str, str, str, str | None]] = set()
    for c in cells:
        if c["derivation"] in kept:
            replaced.add((c["content_id"], c["scope"], c["kind"], c["prompt"] if c["kind"] == "answer" else None))
    out = []
    for c in cells:
        if c["derivation"] in kept:
            continue
        if c["kind"] == "plan" or ":" in c["scope"]:
            # an old segmentation's plan or moments: gone once the content has a current plan
            current = any(s.segmentation and (c["content_id"], s.segmentation, "plan", None) in replaced
                          for s in specs)
            if current:
                out.append(c)
            continue
        if (c["content_id"], c["scope"], c["kind"], c["prompt"] if c["kind"] == "answer" else None) in replaced:
            out.append(c)
    return out


def prune(location: IndexLocation, *, job: str | None = None, superseded: bool = False, dry_run: bool = True,
          run_id: str = "prune") -> dict[str, Any]:
    """What goes (and, unless `dry_run`, remove it): {"jobs": [...], "cells": {kind: n}, "models": {model: n},
    "views_rebuilt": n}."""
    registry = load_registry(location.root, location.s3)
    names = [r.spec.job for r in registry]
    if job is not None and job not in names:
        raise ValueError(f"--job: no job '{job}' is registered on this index "
                         f"(registered: {', '.join(names) or 'none'})")
    specs = [r.spec for r in registry if r.spec.job != job]
    gone = superseded_cells(location, specs) if superseded else []
    report: dict[str, Any] = {"jobs": [job] if job else [], "cells": dict(Counter(c["kind"] for c in gone)),
                              "models": dict(Counter(c["model_id"] or "-" for c in gone)),
                              "views_rebuilt": 0, "dry_run": dry_run}
    if dry_run or (job is None and not gone):
        return report
    with IndexLock(location.root, location.s3):
        if job is not None:
            unregister(location.roots, job, location.s3)
        cells = location.cells()
        for start in range(0, len(gone), CHUNK):
            cells.commit(None, deletes=[(c["cell_id"],) for c in gone[start:start + CHUNK]], run_id=run_id)
    if job is not None:
        report["views_rebuilt"] = rebuild_views(location, run_id)
    return report


def rebuild_views(location: IndexLocation, run_id: str) -> int:
    """Every view row built again from the cells under the current registry (no model work)."""
    from pipeline.store.writer import IndexWriter

    view = location.videos().read_all(["video_id", "content_id", "uri", "size", "etag", "copy_of", "indexed_at",
                                       "timings"])
    if view is None:
        return 0
    writer = IndexWriter(location, None, run_id=run_id)
    rows = view.to_pylist()
    for start in range(0, len(rows), CHUNK):
        writer.write([{**r, "kind": "copy", "wait": False} for r in rows[start:start + CHUNK]])
    writer.finish()
    return len(rows)


__all__ = ["prune", "rebuild_views", "superseded_cells"]
