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


def render(scene: Scene, frames: list[int] | None = None) -> np.ndarray:
    """The scene's frames (all, or those listed) as uint8 (T, H, W, 3)."""
    frames = list(range(scene.n_frames)) if frames is None else frames
    h, w = scene.height, scene.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    r = SIZES[scene.size] * min(w, h) / 2
    colour = np.array(COLOURS[scene.colour], dtype=np.uint8)
    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    out[:] = np.array(scene.background, dtype=np.uint8)
    for k, i in enumerate(frames):
        px, py = scene.position(i)
        out[k][_mask(scene.shape, xx, yy, px * w, py * h, r)] = colour
    return out


def chroma_420(frames: np.ndarray) -> np.ndarray:
    """What a yuv420p encode does to colour edges (BT.601: chroma averaged over 2×2 pixels), for frames rendered
    straight to a model; uint8 (..., H, W, 3) with even H and W."""
    x = frames.astype(np.float32)
    y = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    cb, cr = (x[..., 2] - y) * 0.564, (x[..., 0] - y) * 0.713
    def pool(c: np.ndarray) -> np.ndarray:
        h, w = c.shape[-2:]
        m = c.reshape(*c.shape[:-2], h // 2, 2, w // 2, 2).mean((-3, -1))
        return m.repeat(2, -2).repeat(2, -1)
    cb, cr = pool(cb), pool(cr)
    r, b = y + cr / 0.713, y + cb / 0.564
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.clip(np.stack([r, g, b], -1).round(), 0, 255).astype(np.uint8)


__all__ = ["chroma_420", "render"]
