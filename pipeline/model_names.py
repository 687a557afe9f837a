"""The model names a job's `model.path` (and `stllm-index ask --model`) accepts besides a checkpoint folder: what
each one is, and the prompt preset it was trained with (a model answers well only in the prompt it learned)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NamedModel:
    name: str
    what: str
    trained_preset: str | None  # the prompt preset of its training; None: no preset is better than another


WORLD = NamedModel("world", "the shipped synthetic-world model: it describes the coloured shapes that move in the "
                   "clips of `stllm-index synth` / `stllm-index demo`, and knows nothing else", "qa")
TINY = NamedModel("tiny", "a tiny RANDOM model for tests: its captions and answers are noise", None)
NAMED_MODELS = {m.name: m for m in (WORLD, TINY)}
DEFAULT_ASK_MODEL = WORLD.name  # `ask` without --model: a model whose answers mean something


def named_model(path: str) -> NamedModel | None:
    """The named model `path` stands for: its name, or (for `world`) its shipped folder given as a path."""
    if path in NAMED_MODELS:
        return NAMED_MODELS[path]
    from pipeline.paths import world_model_dir

    try:
        return WORLD if Path(path).expanduser().resolve() == world_model_dir() else None
    except OSError:
        return None


def trained_preset(path: str) -> str | None:
    """The prompt preset the model at `path` was trained with, when we know it."""
    model = named_model(path)
    return model.trained_preset if model else None


def preset_warning(path: str, preset: str) -> str | None:
    """Why answers will be poor when `preset` is not the one the model at `path` was trained with (else None)."""
    trained = trained_preset(path)
    if trained is None or preset == trained:
        return None
    return (f"model '{path}' was trained with the '{trained}' prompt preset; the '{preset}' preset sends it a "
            f"prompt it never saw, so its answers will be poor (leave the preset unset to get '{trained}')")


__all__ = ["DEFAULT_ASK_MODEL", "NAMED_MODELS", "NamedModel", "TINY", "WORLD", "named_model", "preset_warning",
           "trained_preset"]
