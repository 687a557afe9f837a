"""Results as cells keyed by what derived them.

A cell is one result about one content: what decoding found (`media`), the visual embedding (`visual`), a
caption, an answer, or a long recording's segments (`plan`). Its `derivation` hashes everything its value depends
on, so a job computes only the cells it asks for that are missing, and two jobs (or two objects with the same
bytes) asking the same thing share one cell:

| kind    | derived from |
|---------|--------------|
| media   | frames and their sampling |
| visual  | checkpoint (content identity), frames, sampling |
| caption | checkpoint, frames, sampling, dtype, decoding, prompt format, caption prompt (+ the text embedder) |
| answer  | the same with the question in place of the caption prompt |
| plan    | the job's segmentation (mode, lengths, threshold) |
| scores  | the job's curation signals (which are on, OCR frames), frames, sampling |

A segment's cells have the same derivations under the scope "<segmentation>:<index>".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa

from schemas import SCORE_FIELDS, cell_schema

AskKind = Literal["caption", "answer"]


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def cell_id(content_id: str, scope: str, derivation: str) -> str:
    return hashlib.sha256(f"{content_id}\x1f{scope}\x1f{derivation}".encode()).hexdigest()[:32]


def segment_scope(segmentation: str, index: int) -> str:
    return f"{segmentation}:{index:05d}"


@dataclass(frozen=True)
class Ask:
    """One generation a job asks for: the caption (its prompt) or the answer to a question."""

    kind: AskKind
    prompt: str
    derivation: str


@dataclass(frozen=True)
class JobSpec:
    """What one job asks of every video, as cell derivations (see the module docstring)."""

    job: str
    model_id: str  # the model in words, shown beside each result
    media: str
    visual: str
    asks: tuple[Ask, ...]  # the caption first when the job asks for one
    embedder: str
    segmentation: str | None = None  # None: whole videos only
    scores: str | None = None  # None: no curation signals
    spec: str = field(default="")  # a hash of all of the above: what a rerun of this job may skip

    def __post_init__(self) -> None:
        if not self.spec:
            object.__setattr__(self, "spec", digest([self.job, self.model_id, self.media, self.visual,
                                                     [asdict(a) for a in self.asks], self.embedder,
                                                     self.segmentation, self.scores]))

    @classmethod
    def build(cls, *, job: str, model_id: str, checkpoint: str, num_frames: int, frame_sampling: str,
              dtype: str | None, generation: dict[str, Any], prompt_format: dict[str, Any],
              caption_prompt: str | None, questions: list[str], embedder: str,
              segments: dict[str, Any] | None = None, scores: dict[str, Any] | None = None) -> JobSpec:
        frames = {"num_frames": num_frames, "frame_sampling": frame_sampling}
        media = digest({"kind": "media", **frames})
        visual = digest({"kind": "visual", "checkpoint": checkpoint, **frames})
        model = {"checkpoint": checkpoint, **frames, "dtype": dtype, "generation": generation,
                 "prompt": prompt_format}
        asks = []
        if caption_prompt is not None:
            asks.append(Ask("caption", caption_prompt, digest({"kind": "caption", **model, "text": caption_prompt,
                                                               "embedder": embedder})))
        asks += [Ask("answer", q, digest({"kind": "answer", **model, "text": q})) for q in questions]
        segmentation = digest({"kind": "plan", **segments, **frames}) if segments else None
        on = {k: v for k, v in (scores or {}).items() if v is not False}
        scored = digest({"kind": "scores", **on, **frames}) if any(v is True for v in on.values()) else None
        return cls(job=job, model_id=model_id, media=media, visual=visual, asks=tuple(asks), embedder=embedder,
                   segmentation=segmentation, scores=scored)

    @property
    def caption(self) -> Ask | None:
        return next((a for a in self.asks if a.kind == "caption"), None)

    @property
    def questions(self) -> list[Ask]:
        return [a for a in self.asks if a.kind == "answer"]

    def required(self) -> set[str]:
        """The derivations a video (or a segment) needs for this job to be done with it."""
        return {self.media, self.visual, *(a.derivation for a in self.asks), *([self.scores] if self.scores else [])}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "asks": [asdict(a) for a in self.asks]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        fields = {k: data.get(k) for k in ("job", "model_id", "media", "visual", "embedder", "segmentation", "scores",
                                           "spec")}
        return cls(**fields, asks=tuple(Ask(**a) for a in data["asks"]))


@dataclass
class Needs:
    """The cells one video (or each of its segments) still needs for a job; empty when all are there."""

    asks: list[Ask] = field(default_factory=list)
    media: bool = False
    visual: bool = False
    scores: bool = False  # the decode stage's curation signals (no model work)

    def __bool__(self) -> bool:
        return bool(self.asks or self.media or self.visual or self.scores)


def needs(spec: JobSpec, have: set[str]) -> Needs:
    """What of `spec` is missing from a scope holding the derivations `have`. A missing visual embedding or
    media record means the model must run on the frames anyway: every ask is redone with it."""
    media, visual = spec.media not in have, spec.visual not in have
    asks = list(spec.asks) if (media or visual) else [a for a in spec.asks if a.derivation not in have]
    return Needs(asks=asks, media=media, visual=visual, scores=spec.scores is not None and spec.scores not in have)


def media_json(r: dict[str, Any], keys: tuple[str, ...]) -> str:
    return json.dumps({k: r.get(k) for k in keys}, sort_keys=True)


# the decode stage's curation signals (pipeline.decode.scores), as the view shows them
SCORE_COLUMNS = tuple(f.name for f in SCORE_FIELDS)
VIDEO_MEDIA = ("duration_s", "fps", "width", "height", "codec", "decoder", "n_frames", "frame_indices")
SEGMENT_MEDIA = ("start_s", "end_s", "frame_indices")


def new_cells(r: dict[str, Any], spec: JobSpec, scope: str, *, run_id: str, now: datetime,
              caption_embedding: Any = None) -> list[dict[str, Any]]:
    """The cells one model result makes: media and visual when they were missing (`need_media`/`need_visual`
    on the row), then the caption and each answer it generated."""
    content = r["content_id"]

    def cell(kind: str, derivation: str, **values: Any) -> dict[str, Any]:
        return {"cell_id": cell_id(content, scope, derivation), "content_id": content, "scope": scope,
                "kind": kind, "derivation": derivation, "job": spec.job, "run_id": run_id, "created_at": now,
                "part": None, **values}

    out = []
    if r.get("need_media"):
        keys = SEGMENT_MEDIA if scope else VIDEO_MEDIA
        out.append(cell("media", spec.media, text=media_json(r, keys), thumbnail=r.get("thumbnail") or None))
    if r.get("need_scores") and spec.scores is not None:
        out.append(cell("scores", spec.scores, text=json.dumps({k: r.get(k) for k in SCORE_COLUMNS},
                                                                sort_keys=True)))
    if r.get("need_visual") and r.get("visual_embedding") is not None:
        out.append(cell("visual", spec.visual, model_id=spec.model_id, visual_embedding=list(r["visual_embedding"])))
    asked = {(a.kind, a.prompt): a for a in spec.asks}
    if r.get("caption") is not None and (a := asked.get(("caption", r.get("caption_prompt")))):
        out.append(cell("caption", a.derivation, model_id=spec.model_id, prompt=a.prompt, text=r["caption"],
                        text_embedding=None if caption_embedding is None else list(caption_embedding),
                        embedder=spec.embedder))
    for qa in r.get("answers") or []:
        if a := asked.get(("answer", qa["question"])):
            out.append(cell("answer", a.derivation, model_id=spec.model_id, prompt=a.prompt, text=qa["answer"]))
    return out


def plan_cell(content_id: str, spec: JobSpec, spans: list[tuple[float, float]], *, run_id: str,
              now: datetime) -> dict[str, Any]:
    """A long recording's segments under the job's segmentation: their (start, end) seconds."""
    assert spec.segmentation is not None
    return {"cell_id": cell_id(content_id, spec.segmentation, spec.segmentation), "content_id": content_id,
            "scope": spec.segmentation, "kind": "plan", "derivation": spec.segmentation, "job": spec.job,
            "text": json.dumps([[round(s, 6), round(e, 6)] for s, e in spans]), "run_id": run_id,
            "created_at": now, "part": None}


def cells_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Cells as a table of the cells schema, one per cell_id (the last given)."""
    unique = list({r["cell_id"]: r for r in rows}.values())
    return pa.Table.from_pylist(unique, schema=cell_schema())


__all__ = ["Ask", "JobSpec", "Needs", "cell_id", "cells_table", "digest", "needs", "new_cells", "plan_cell",
           "segment_scope", "SCORE_COLUMNS", "VIDEO_MEDIA", "SEGMENT_MEDIA"]
