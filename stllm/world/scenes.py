"""Scenes of the synthetic world and what is true of them.

A scene is one object (shape, colour, size) moving in a straight line (direction, speed) over a plain
background. Its start position is drawn so that the clip played backwards is a valid clip of the opposite
direction: the path's middle is uniform over the positions where the whole path fits, and the path runs
symmetrically around it (`Scene.reversed` is such a clip — frame for frame the reverse, see `render`). So the
direction question needs temporal ORDER: a model that pools frames (mean over time) cannot answer it.

Splits: `train` and `heldout` draw from disjoint seed streams with the same attribute combinations;
`unseen` uses only the (shape, colour) pairs kept out of both (`UNSEEN_COMBOS`), reported apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (235, 215, 40),
}
SIZES = {"small": 0.16, "large": 0.26}  # object diameter as a share of the frame's shorter side
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
SPEEDS = {"slowly": 0.3, "quickly": 0.55}  # distance travelled over the clip, as a share of the frame side
# (shape, colour) pairs that never occur in train/heldout: a split of their own, to see what generalises.
UNSEEN_COMBOS = frozenset({("circle", "blue"), ("square", "yellow"), ("triangle", "red")})
Split = Literal["train", "heldout", "unseen"]
SPLITS: tuple[Split, ...] = ("train", "heldout", "unseen")
_SPLIT_STREAM = {"train": 0, "heldout": 1, "unseen": 2}

CAPTION_PROMPT = "Describe the video in detail."
QUESTIONS = {  # question type → question text (the same for every clip: the answer is in the video)
    "colour": "What colour is the object?",
    "shape": "What shape is the object?",
    "direction": "Which way does the object move?",
    "size": "Is the object small or large?",
}


@dataclass(frozen=True)
class Scene:
    clip_id: str
    split: str
    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    center: tuple[float, float]  # the middle of the path, in frame units (0..1, x right, y down)
    background: tuple[int, int, int]
    n_frames: int = 16
    fps: int = 8
    width: int = 64
    height: int = 64

    def position(self, frame: int) -> tuple[float, float]:
        """Object centre in frame `frame` (frame units): the path runs symmetrically around `center`."""
        t = frame / max(self.n_frames - 1, 1) - 0.5  # -0.5 … 0.5
        dx, dy = DIRECTIONS[self.direction]
        d = SPEEDS[self.speed]
        return self.center[0] + dx * d * t, self.center[1] + dy * d * t

    def reversed(self) -> Scene:
        """The clip played backwards, as a scene of the world: the same path the other way."""
        return replace(self, clip_id=self.clip_id + "-reversed", direction=OPPOSITE[self.direction])

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moves {self.speed} to the {self.direction}" \
            if self.direction in ("left", "right") else \
            f"a {self.size} {self.colour} {self.shape} moves {self.speed} {self.direction}"

    def answers(self) -> dict[str, str]:
        """Question type → the true answer (one word)."""
        return {"colour": self.colour, "shape": self.shape, "direction": self.direction, "size": self.size}

    def truth(self) -> dict[str, object]:
        return asdict(self)


def _combos(split: Split) -> list[tuple[str, str]]:
    all_combos = [(s, c) for s in SHAPES for c in COLOURS]
    return [p for p in all_combos if (p in UNSEEN_COMBOS) == (split == "unseen")]


def sample_scene(seed: int, split: Split, index: int, n_frames: int = 16, fps: int = 8,
                 size: tuple[int, int] = (64, 64)) -> Scene:
    """The `index`-th scene of `split` for `seed`: deterministic, and no two splits share a random stream."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    combos = _combos(split)
    shape, colour = combos[int(rng.integers(len(combos)))]
    obj_size = list(SIZES)[int(rng.integers(len(SIZES)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    speed = list(SPEEDS)[int(rng.integers(len(SPEEDS)))]
    # The whole path (and the object around it) stays inside the frame, whichever way it runs.
    w, h = size
    radius = SIZES[obj_size] * min(w, h) / 2
    margin_x, margin_y = 1.25 * radius / w + 0.02, 1.25 * radius / h + 0.02  # a triangle reaches 1.2 r
    half = SPEEDS[speed] / 2
    dx, dy = DIRECTIONS[direction]
    lo_x, hi_x = margin_x + half * abs(dx), 1 - margin_x - half * abs(dx)
    lo_y, hi_y = margin_y + half * abs(dy), 1 - margin_y - half * abs(dy)
    center = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
    grey = int(rng.integers(30, 120))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return Scene(clip_id=f"{split}-{seed}-{index:05d}", split=split, shape=shape, colour=colour, size=obj_size,
                 direction=direction, speed=speed, center=center, background=background,  # type: ignore[arg-type]
                 n_frames=n_frames, fps=fps, width=w, height=h)


__all__ = ["CAPTION_PROMPT", "COLOURS", "DIRECTIONS", "OPPOSITE", "QUESTIONS", "SHAPES", "SIZES", "SPEEDS",
           "SPLITS", "UNSEEN_COMBOS", "Scene", "Split", "sample_scene"]
