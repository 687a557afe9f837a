"""Frame checks and the resize/crop of the released weights: numpy + PIL only (cheap to import in decode workers)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_crop_image(img: Image.Image, size: int = 224) -> np.ndarray:
    """One PIL frame → uint8 (size, size, 3): shorter side to `size` (bicubic; the other side
    int(size·long/short), as torchvision's Resize(int)), then a centre crop with torchvision's rounding."""
    w, h = img.size
    if (w, h) == (size, size):
        return np.asarray(img)
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def resize_crop(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 (T, H, W, 3) → uint8 (T, size, size, 3), frame by frame on PIL images as the original.

    Idempotent on frames that are already size×size, so the decode stage may do it early (smaller rows).
    """
    check_frames(frames)
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = resize_crop_image(Image.fromarray(frame), size)
    return out


def as_frames(frames: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Accept an array (T, H, W, 3) or a list of (H, W, 3) frames; reject mixed sizes with a clear error."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("the video has zero frames")
        sizes = {tuple(np.shape(f)) for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"frames of mixed sizes: {sorted(sizes)}")
        frames = np.stack(frames)
    check_frames(frames)
    return frames


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy uint8 array (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("the video has zero frames")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames have an empty size {frames.shape[1:3]}")
