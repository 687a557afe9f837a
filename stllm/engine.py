"""The engine interface shared by the `hf` reference engine and the `vllm` production engine.

A request is one video (frames already decoded, uint8 (T, H, W, 3)) with the questions to ask about it;
the engine samples `num_frames` frames (a no-op when T already equals it), runs the ViT once per video and
answers every question. The pipeline switches engines with one job field (`model.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

EngineKind = Literal["hf", "vllm"]


@dataclass
class GenerationOptions:
    """Decoding options; `repetition_penalty=None` means the checkpoint's default (1.5, as the original)."""

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class VideoRequest:
    video_id: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    questions: list[str]


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]


@dataclass
class VideoResult:
    video_id: str
    answers: list[Answer] = field(default_factory=list)
    # Question-independent embedding: mean of the video's ViT features after ln_vision, L2-normalised.
    visual_embedding: np.ndarray | None = None
    error: str | None = None  # set when this request failed; the other requests still ran

    @property
    def ok(self) -> bool:
        return self.error is None


class Engine(Protocol):
    kind: EngineKind
    num_frames: int

    def generate(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> list[VideoResult]:
        """One result per request, in order. A bad request yields a result with `error` set."""
        ...


def load_engine(kind: EngineKind, model_dir: str, **kwargs) -> Engine:
    """Build an engine over a converted checkpoint folder (see `stllm-index convert`)."""
    if kind == "hf":
        from stllm.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_dir, **kwargs)
    if kind == "vllm":
        from stllm.vllm.engine import VLLMEngine

        return VLLMEngine.from_pretrained(model_dir, **kwargs)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {kind!r}")
