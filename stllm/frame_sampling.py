"""Which frames of a video ST-LLM sees: the original's rules, as frame indices (numpy only, cheap to import).

- `original` (default; the original chat and benchmark path, `stllm/test/video_utils.py`: `load_video` →
  `get_seq_frames`): T' = min(n, T) frames, seg = (n − 1) / T', index_i = (round(seg·i) + round(seg·(i+1))) // 2
  (numpy round: half to even). A video shorter than T gives n frames, not T.
- `midpoint`: int(seg/2 + round(seg·i)) with seg = n / T, always T indices (short videos repeat frames). This is
  the original's `get_residual_index`, which picks the LOCAL frames of the global-local input out of the T'
  sampled ones (`residual_index`); as a frame sampler it is only used when a job asks for it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

FrameSampling = Literal["original", "midpoint"]
FRAME_SAMPLINGS: tuple[str, ...] = ("original", "midpoint")


def _check(n_frames: int, num_samples: int) -> None:
    if n_frames < 1:
        raise ValueError(f"cannot sample from a video with {n_frames} frames")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def original_indices(n_frames: int, num_samples: int) -> list[int]:
    """The original's `get_seq_frames(n, min(n, T))`: min(n, T) indices, midpoints of rounded segments."""
    _check(n_frames, num_samples)
    total = min(n_frames, num_samples)
    seg = (n_frames - 1) / total
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(total)]


def midpoint_indices(n_frames: int, num_samples: int) -> list[int]:
    """int(seg/2 + round(seg·i)), seg = n/T: exactly `num_samples` indices (clipped to the last frame)."""
    _check(n_frames, num_samples)
    seg = float(n_frames) / num_samples
    return [min(int(seg / 2 + np.round(seg * i)), n_frames - 1) for i in range(num_samples)]


def residual_index(num_frames: int, residual_size: int) -> list[int]:
    """The global-local input's local frames out of the `num_frames` sampled ones (`get_residual_index`).

    Computed per video from its own frame count, as the original's chat path does (its training model caches
    the first video's indices in a buffer, which a shorter video would index past)."""
    return midpoint_indices(num_frames, residual_size)


def frame_indices(n_frames: int, num_samples: int, rule: FrameSampling = "original") -> list[int]:
    """The indices of the frames to decode out of a video of `n_frames` frames."""
    if rule == "original":
        return original_indices(n_frames, num_samples)
    if rule == "midpoint":
        return midpoint_indices(n_frames, num_samples)
    raise ValueError(f"frame sampling must be one of {FRAME_SAMPLINGS}, got {rule!r}")


def num_sampled(n_frames: int, num_samples: int, rule: FrameSampling = "original") -> int:
    """How many frames `frame_indices` returns (the visual token count of `all` mode depends on it)."""
    return min(n_frames, num_samples) if rule == "original" else num_samples


__all__ = ["FrameSampling", "FRAME_SAMPLINGS", "original_indices", "midpoint_indices", "residual_index",
           "frame_indices", "num_sampled"]
