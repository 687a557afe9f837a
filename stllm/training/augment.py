"""Training-time clip augmentation, as the original's datasets do: 'rand' frame sampling (one random frame per
equal interval, `datasets/utils.py`) and one RandomResizedCrop (scale 0.5-1, ratio 3/4-4/3) for all of a clip's
frames, resized to the model's input size. Evaluation uses the exact path (`STLLMProcessor.pixel_values`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def rand_indices(n_frames: int, num_samples: int, rng: np.random.Generator) -> list[int]:
    """One random index in each of `num_samples` equal intervals of [0, n_frames) (short clips repeat frames)."""
    if n_frames < 1 or num_samples < 1:
        raise ValueError(f"cannot sample {num_samples} of {n_frames} frames")
    edges = np.linspace(0, n_frames, num_samples + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        a, b = int(lo), max(int(lo) + 1, int(math.ceil(hi)))
        out.append(min(int(rng.integers(a, b)), n_frames - 1))
    return out


def crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w): 10 tries, then the centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def augment_clip(frames: np.ndarray, num_frames: int, size: int, rng: np.random.Generator,
                 scale: tuple[float, float] | None = (0.5, 1.0), indices: list[int] | None = None) -> torch.Tensor:
    """Decoded uint8 (N, H, W, 3) → 'rand'-sampled (or the given `indices`), cropped, resized uint8
    (T, size, size, 3)."""
    if indices is None:
        indices = rand_indices(len(frames), num_frames, rng)
    picked = torch.from_numpy(np.ascontiguousarray(frames[indices]))
    x = picked.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = x.shape[-2:]
    if scale is not None:
        top, left, ch, cw = crop_box(h, w, scale, rng)
        x = x[..., top:top + ch, left:left + cw]
    else:  # shorter side to size, centre crop
        side = min(h, w)
        x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


__all__ = ["augment_clip", "crop_box", "rand_indices"]
