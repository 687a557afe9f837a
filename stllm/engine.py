"""The engine interface shared by the `hf` reference engine and the `vllm` production engine.

A request is one video (frames already decoded, uint8 (T, H, W, 3)) with the questions to ask about it. The
engine samples the checkpoint's frames out of it with the original's rule (skipped when the caller already
did: `sampled=True`, as the pipeline's decode stage does), runs the ViT once per video and answers every
question. The pipeline switches engines with one job field (`model.engine`; `stllm.load_engine`).
What both engines must agree on lives here once: decoding defaults, the repetition penalty's resolution and
the prompt budget.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from stllm.prompts import DEFAULT_PROMPT, PromptFormat

EngineKind = Literal["hf", "vllm"]
# The original's `generate(min_length=1)` with `inputs_embeds`: EOS cannot be the first generated token.
MIN_NEW_TOKENS = 1


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options and the prompt format of one call.

    `repetition_penalty=None` means the prompt format's (1.0 for MVBench), else the checkpoint's default (1.5,
    as the original). The default is greedy decoding, for throughput; `GenerationOptions.original()` is the
    original's scripts' decoding (5 beams, 300 new tokens).
    """

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    prompt: PromptFormat = field(default=DEFAULT_PROMPT)

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

    @classmethod
    def original(cls, **overrides: object) -> GenerationOptions:
        """The original's evaluation decoding: beam search with 5 beams, up to 300 new tokens, greedy within
        the beams, the penalty of the prompt format (1.5 by default) on generated tokens."""
        return replace(cls(max_new_tokens=300, num_beams=5), **overrides)

    def repetition_penalty_for(self, checkpoint_default: float) -> float:
        """The penalty to apply: the explicit option, else the prompt format's, else the checkpoint's."""
        for value in (self.repetition_penalty, self.prompt.repetition_penalty):
            if value is not None:
                return float(value)
        return float(checkpoint_default)


DECODING_PRESETS = ("greedy", "original")


def decoding_preset(name: str, **overrides: object) -> GenerationOptions:
    """`greedy` (the pipeline's default) or `original` (the original's 5-beam decoding), with overrides."""
    if name == "greedy":
        return GenerationOptions(**overrides)
    if name == "original":
        return GenerationOptions.original(**overrides)
    raise ValueError(f"decoding preset must be one of {DECODING_PRESETS}, got {name!r}")


def check_prompt_budget(n_visual: int, n_text: int, max_new_tokens: int, max_positions: int) -> None:
    """Raise ValueError when visual + text tokens + the new tokens do not fit the model's positions."""
    if n_visual + n_text + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt of {n_visual + n_text} tokens ({n_visual} visual) + {max_new_tokens} new tokens exceeds "
            f"the model's {max_positions} positions"
        )


@dataclass
class VideoRequest:
    video_id: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    questions: list[str]
    # True: `frames` already are the model's sampled frames (the decode stage sampled them from the file).
    sampled: bool = False


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

    def submit(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> Future:
        """`generate` without waiting: a future of the results. Batches submitted while others run are worked on
        together where the engine can (vLLM: continuous batching); results come back per batch."""
        ...

    def stats(self) -> dict[str, object]:
        """How busy the engine has been (vllm: vLLM's own metrics, docs/engine.md); {} where not measured."""
        ...

    def close(self) -> None:
        """Stop what the engine started (vLLM's engine-core processes); the engine is unusable afterwards."""
        ...

    def healthy(self) -> bool:
        """False when the engine itself broke (not one request): the caller must start a new one."""
        ...
