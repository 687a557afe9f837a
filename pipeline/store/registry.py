"""The jobs that share an index, and the rule by which the view combines their cells.

Each job that runs on an index registers what it asks (`JobSpec`) in `<index root>/_jobs/<job>.json` when its
run starts. The view shows, for every video:
- the caption of the caption's OWNER: the earliest-registered job that asks for a caption;
- for each question, the answer of the earliest-registered job that asks it (each job owns its questions);
- the visual embedding and media facts of the caption owner's model (else the first job's).
A later job that asks a caption (or a question) another job owns still computes its cells — they are history,
queryable with `--model` — but the view keeps the owner's; its run says so once. A job is unregistered with
`stllm-index prune INDEX --job NAME` (its questions leave the view; its cells stay until pruned).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.sources import S3Options
from pipeline.store.cells import Ask, JobSpec
from pipeline.store.files import filesystem, join_path, list_files, read_small, utc_now, write_atomic

log = logging.getLogger(__name__)
JOBS_DIR = "_jobs"


@dataclass(frozen=True)
class Registered:
    spec: JobSpec
    registered_at: str  # ISO time of the job's first run on this index: the tie-breaker of ownership
    updated_at: str
    run_id: str


def _path(root: str, job: str) -> str:
    return join_path(root, JOBS_DIR, f"{job}.json")


def load_registry(root: str, s3: S3Options | None = None) -> list[Registered]:
    """The registered jobs, earliest first."""
    out = []
    for name in list_files(join_path(root, JOBS_DIR), s3, suffix=".json"):
        raw = read_small(join_path(root, JOBS_DIR, name), s3)
        if raw is None:
            continue
        data = json.loads(raw)
        out.append(Registered(JobSpec.from_json(data["spec"]), data["registered_at"], data["updated_at"],
                              data.get("run_id", "")))
    return sorted(out, key=lambda r: (r.registered_at, r.spec.job))


def register(roots: list[str], spec: JobSpec, run_id: str, s3: S3Options | None = None) -> list[Registered]:
    """Record what `spec.job` asks now in each of the index's roots (its Parquet root and LanceDB folder: either
    is what a user may point `status` at); call under the index lock. Returns the registry after it."""
    raw = read_small(_path(roots[0], spec.job), s3)
    now = utc_now().isoformat()
    first = json.loads(raw)["registered_at"] if raw is not None else now
    body = json.dumps({"spec": spec.to_json(), "registered_at": first, "updated_at": now, "run_id": run_id},
                      indent=2, sort_keys=True).encode()
    for root in roots:
        fs, inner = filesystem(_path(root, spec.job), s3)
        write_atomic(fs, inner, body)
    return load_registry(roots[0], s3)


def unregister(roots: list[str], job: str, s3: S3Options | None = None) -> bool:
    found = False
    for root in roots:
        if read_small(_path(root, job), s3) is not None:
            fs, inner = filesystem(_path(root, job), s3)
            fs.delete_file(inner)
            found = True
    return found


@dataclass
class ViewPlan:
    """What the view shows, from the registered jobs (see the module docstring)."""

    jobs: list[JobSpec]
    caption: Ask | None = None
    caption_job: str | None = None
    questions: list[tuple[Ask, str]] = field(default_factory=list)  # (ask, owning job), in registration order
    media: str = ""
    visual: str = ""
    visual_model: str = ""
    segmentation: str | None = None
    scores: str | None = None

    @classmethod
    def of(cls, specs: list[JobSpec]) -> ViewPlan:
        plan = cls(jobs=list(specs))
        owner = next((s for s in specs if s.caption is not None), specs[0] if specs else None)
        if owner is None:
            return plan
        plan.caption = owner.caption
        plan.caption_job = owner.job if owner.caption is not None else None
        plan.media, plan.visual, plan.visual_model = owner.media, owner.visual, owner.model_id
        seen: set[str] = set()
        for s in specs:
            for a in s.questions:
                if a.prompt not in seen:
                    seen.add(a.prompt)
                    plan.questions.append((a, s.job))
        plan.segmentation = next((s.segmentation for s in specs if s.segmentation), None)
        plan.scores = owner.scores or next((s.scores for s in specs if s.scores), None)
        return plan

    def conflicts(self, spec: JobSpec) -> list[str]:
        """What `spec` asks that the view shows from another job's cells (said once when its run starts)."""
        out = []
        if spec.caption is not None and self.caption_job not in (None, spec.job) and (
                self.caption is None or self.caption.derivation != spec.caption.derivation):
            out.append(f"the caption (the view shows job '{self.caption_job}'s)")
        owners = {a.prompt: (a, job) for a, job in self.questions}
        for a in spec.questions:
            owned, job = owners.get(a.prompt, (a, spec.job))
            if job != spec.job and owned.derivation != a.derivation:
                out.append(f"question {a.prompt!r} (the view shows job '{job}'s answer)")
        return out


def plan_of(registry: list[Registered]) -> ViewPlan:
    return ViewPlan.of([r.spec for r in registry])


def describe(registry: list[Registered]) -> list[dict[str, Any]]:
    """The registry for `status`: each job, when it registered, what it asks."""
    return [{"job": r.spec.job, "model": r.spec.model_id, "registered_at": r.registered_at,
             "updated_at": r.updated_at, "caption_prompt": r.spec.caption.prompt if r.spec.caption else None,
             "questions": [a.prompt for a in r.spec.questions], "segments": r.spec.segmentation is not None}
            for r in registry]


__all__ = ["JOBS_DIR", "Registered", "ViewPlan", "describe", "load_registry", "plan_of", "register", "unregister"]
