"""Draw a scene's frames: RGB uint8 (T, H, W, 3), pixel-exact and deterministic (numpy only)."""

from __future__ import annotations

import numpy as np

from stllm.world.scenes import COLOURS, SIZES, Scene


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels (centres) inside the object of radius r (pixels) centred at (cx, cy)."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.886  # the same area as the circle
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # pointing up, base at the bottom
        t = r * 1.2
        inside_base = dy <= t * 0.5
        return inside_base & (dy >= -t + 1.5 * np.abs(dx))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    h, w = scene.height, scene.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    r = SIZES[scene.size] * min(w, h) / 2
    colour = np.array(COLOURS[scene.colour], dtype=np.uint8)
    out = np.empty((scene.n_frames, h, w, 3), dtype=np.uint8)
    out[:] = np.array(scene.background, dtype=np.uint8)
    for i in range(scene.n_frames):
        px, py = scene.position(i)
        out[i][_mask(scene.shape, xx, yy, px * w, py * h, r)] = colour
    return out


__all__ = ["render"]
