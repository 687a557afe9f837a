"""ST-LLM's uniform frame sampling: split into equal segments, take each segment's middle frame."""

from __future__ import annotations

import numpy as np


def segment_midpoints(n_frames: int, num_samples: int) -> list[int]:
    """Indices of `num_samples` frames out of `n_frames`: int(seg/2 + round(seg·i)), seg = n_frames/num_samples.

    The same rule picks the global-local input's local frames out of the T sampled ones. With
    n_frames == num_samples it returns 0..n-1, so sampling twice is the same as sampling once.
    """
    if n_frames < 1:
        raise ValueError(f"cannot sample from a video with {n_frames} frames")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seg = float(n_frames) / num_samples
    idx = [int(seg / 2 + np.round(seg * i)) for i in range(num_samples)]
    return [min(i, n_frames - 1) for i in idx]
