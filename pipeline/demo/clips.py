"""The demo's sample clips (also the tests' fixtures), encoded with PyAV (no files shipped, no network).

A clip shows a coloured background and a white square moving left to right by a known amount per frame,
so a test can tell which frame it got (`square_x`). `PlantedClip` clips carry known curation properties (still
or moving, blurred, dark, washed out, black stretches, burned-in text): the ground truth of the scores.
Encoders present in this PyAV build (checked with `av.codecs_available`): libx264, libx265, libvpx-vp9,
libsvtav1 (AV1; libaom/rav1e are absent).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Codec = Literal["h264", "hevc", "vp9", "av1"]

# codec → (encoder candidates in order of preference, encoder options)
_ENCODERS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "h264": (("libx264",), {"preset": "veryfast"}),
    "hevc": (("libx265",), {"preset": "veryfast", "x265-params": "log-level=error"}),
    "vp9": (("libvpx-vp9",), {"deadline": "realtime", "cpu-used": "8"}),
    "av1": (("libsvtav1", "libaom-av1", "librav1e"), {}),
}
SQUARE = 12  # side of the moving square, pixels


def square_x(index: int, n_frames: int, width: int) -> int:
    """Left edge of the square in frame `index`."""
    return 2 + (index * (width - SQUARE - 4)) // max(n_frames - 1, 1)


def frame_image(index: int, n_frames: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """The RGB uint8 (H, W, 3) image of frame `index`: deterministic for (index, n_frames, size, seed)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    img = np.empty((h, w, 3), dtype=np.uint8)
    ramp = np.linspace(0, 40, w, dtype=np.float32)  # a gradient, so resizing has something to do
    for c in range(3):
        img[:, :, c] = np.clip(base[c] + ramp[None, :] * (c + 1) / 3 + index % 7, 0, 255).astype(np.uint8)
    x, y = square_x(index, n_frames, w), (h - SQUARE) // 2
    img[y:y + SQUARE, x:x + SQUARE] = 255
    cy = 2 + (index * 5 + seed * 11) % max(h - 10, 1)  # a second, coloured shape moving vertically
    img[cy:cy + 6, w - 10:w - 4] = (255 * (seed % 2), 40, 255 * ((seed + 1) % 2))
    return img


def available_encoder(codec: Codec) -> str:
    import av

    candidates, _ = _ENCODERS[codec]
    for name in candidates:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"no {codec} encoder in this PyAV build (tried {', '.join(candidates)})")


def make_test_video(path: str | os.PathLike, codec: Codec, n_frames: int = 24,
                    size: tuple[int, int] = (96, 64), fps: int = 12, seed: int = 0,
                    options: dict[str, str] | None = None, gop: int | None = None) -> Path:
    """Encode a synthetic clip of `n_frames` frames of `size` (width, height) at `fps` (a keyframe every
    `gop` frames when given, else the encoder's default).

    The container follows the file name (.mp4, .mkv, .webm). Width and height must be even (yuv420p).
    """
    frames = (frame_image(i, n_frames, size, seed) for i in range(n_frames))
    return encode_frames(path, codec, frames, size, fps, options=options, gop=gop)


def encode_frames(path: str | os.PathLike, codec: Codec, frames: Iterable[np.ndarray], size: tuple[int, int],
                  fps: int, *, options: dict[str, str] | None = None, gop: int | None = None) -> Path:
    """Encode RGB uint8 (H, W, 3) frames of `size` (width, height, both even) into a real video file."""
    import av

    path = Path(path)
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {codec!r}")
    w, h = size
    if w % 2 or h % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {size}")
    encoder = available_encoder(codec)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner to stderr at info level
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options=(options or {})) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(_ENCODERS[codec][1])
        if gop is not None:
            stream.codec_context.gop_size = gop
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_corrupt_video(path: str | os.PathLike, kind: Literal["random", "truncated"] = "random") -> Path:
    """A file no decoder can read: `random` bytes named like a video, or a real H.264 MP4 cut in half.

    The truncated file has its index (moov) at the front, so its header promises frames the data no
    longer holds — the over-reported frame count that hangs decord on some files (decord #373).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "random":
        path.write_bytes(np.random.default_rng(1234).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        tmp = path.with_name(path.name + ".full.mp4")
        make_test_video(tmp, "h264", n_frames=48, options={"movflags": "+faststart"})
        data = tmp.read_bytes()
        tmp.unlink()
        path.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(f"kind must be 'random' or 'truncated', got {kind!r}")
    return path


# ---------------------------------------------------------------- long recordings with known scenes

SCENE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 200), "yellow": (220, 200, 40),
    "purple": (140, 40, 170), "orange": (230, 120, 20), "grey": (120, 120, 120), "teal": (20, 150, 150),
}


def scene_frame(background: tuple[int, int, int], motion: str, t: float, size: tuple[int, int]) -> np.ndarray:
    """One frame of a scene: a flat background and a white square moving `left`/`right`/`up`/`down`
    (one pass across the frame every 10 s, then back), so a scene is told by its colour and its motion."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = background
    phase = (t / 10.0) % 2.0
    f = phase if phase <= 1.0 else 2.0 - phase  # 0 → 1 → 0
    if motion in ("right", "left"):
        x = int((f if motion == "right" else 1 - f) * (w - SQUARE - 4)) + 2
        y = (h - SQUARE) // 2
    else:
        y = int((f if motion == "down" else 1 - f) * (h - SQUARE - 4)) + 2
        x = (w - SQUARE) // 2
    img[y:y + SQUARE, x:x + SQUARE] = 255
    return img


def make_scene_video(path: str | os.PathLike, scenes: list[tuple[float, str, str]], fps: int = 4,
                     size: tuple[int, int] = (64, 48), gop: int | None = None, codec: Codec = "h264") -> Path:
    """A long recording of hard-cut scenes: `scenes` = [(duration_s, colour name, motion)], in order. Scene k
    starts at frame round(fps · sum of the earlier durations). `gop`: frames between keyframes (default 2 s),
    so that seeking has keyframes to land on."""
    import av

    path = Path(path)
    w, h = size
    encoder = available_encoder(codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = scene_starts(scenes, fps)
    total = starts[-1] + round(scenes[-1][0] * fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        keyint = str(gop or 2 * fps)
        stream.options = {**_ENCODERS[codec][1], "g": keyint, "keyint_min": keyint, "sc_threshold": "0"}
        k = 0
        for i in range(total):
            while k + 1 < len(starts) and i >= starts[k + 1]:
                k += 1
            _, colour, motion = scenes[k]
            image = scene_frame(SCENE_COLOURS[colour], motion, (i - starts[k]) / fps, size)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def scene_starts(scenes: list[tuple[float, str, str]], fps: int) -> list[int]:
    """The first frame of each scene of `make_scene_video`."""
    out, t = [], 0.0
    for duration, _, _ in scenes:
        out.append(round(t * fps))
        t += duration
    return out


# ---------------------------------------------------------------- clips with planted curation properties


@dataclass(frozen=True)
class PlantedClip:
    """A clip whose curation properties are known (the ground truth of `pipeline.decode.scores`): a textured
    background with textured sprites over it, drawn from `seed`, and one property changed at a time."""

    seed: int
    moving: bool = True  # the sprites move (speeds drawn per sprite) or everything stands still
    blur: float = 0.0  # Gaussian sigma in pixels (0: sharp)
    gain: float = 1.0  # brightness: every pixel times this (dark clips: ~0.25)
    contrast: float = 1.0  # deviation from the frame's mean grey times this (washed-out clips: ~0.25)
    black: tuple[float, float] | None = None  # this share [start, end) of the clip is black frames
    text: str | None = None  # a line of text burned into every frame
    n_frames: int = 24
    fps: int = 12
    size: tuple[int, int] = (320, 240)


SPRITES = 3


def _texture(rng: np.random.Generator, w: int, h: int, shapes: int) -> Image.Image:
    """Random rectangles, ellipses and lines in random colours over a random grey: edges everywhere."""
    from PIL import ImageDraw

    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 3))), y0 + int(rng.integers(4, max(5, h // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
    return img


def planted_frames(clip: PlantedClip) -> Iterable[np.ndarray]:
    """The clip's RGB uint8 (H, W, 3) frames, deterministic for the clip."""
    import cv2
    from PIL import ImageDraw, ImageFont

    w, h = clip.size
    rng = np.random.default_rng([clip.seed, 25])
    background = _texture(rng, w, h, 60)
    side = min(w, h)
    sprites = []
    for _ in range(SPRITES):
        r = int(side * rng.uniform(0.12, 0.2))
        sprite = _texture(rng, 2 * r, 2 * r, 12)
        mask = Image.new("L", (2 * r, 2 * r), 0)
        ImageDraw.Draw(mask).ellipse((0, 0, 2 * r - 1, 2 * r - 1), fill=255)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.3, 0.7) * side  # pixels per second
        sprites.append((sprite, mask, r, rng.uniform(0, w - 2 * r), rng.uniform(0, h - 2 * r),
                        speed * np.cos(angle), speed * np.sin(angle)))
    font = ImageFont.load_default(size=max(12, side // 9))
    text_at = (int(rng.integers(4, max(5, w // 4))), int(rng.integers(h // 2, h - side // 9 - 8)))
    black = range(round(clip.black[0] * clip.n_frames), round(clip.black[1] * clip.n_frames)) if clip.black else ()

    def bounce(p: float, span: float) -> float:  # a path reflected at the frame's edges
        p %= 2 * span
        return p if p <= span else 2 * span - p

    for i in range(clip.n_frames):
        if i in black:
            yield np.zeros((h, w, 3), np.uint8)
            continue
        t = i / clip.fps if clip.moving else 0.0
        img = background.copy()
        for sprite, mask, r, x, y, vx, vy in sprites:
            img.paste(sprite, (round(bounce(x + vx * t, w - 2 * r)), round(bounce(y + vy * t, h - 2 * r))), mask)
        if clip.text:
            ImageDraw.Draw(img).text(text_at, clip.text, font=font, fill=(255, 255, 255), stroke_width=2,
                                     stroke_fill=(0, 0, 0))
        frame = np.asarray(img, dtype=np.float32)
        if clip.blur:
            frame = cv2.GaussianBlur(frame, (0, 0), clip.blur)
        if clip.contrast != 1.0:
            frame = frame.mean() + (frame - frame.mean()) * clip.contrast
        yield np.clip(frame * clip.gain, 0, 255).round().astype(np.uint8)


def make_planted_clip(path: str | os.PathLike, clip: PlantedClip, codec: Codec = "h264") -> Path:
    """Encode `planted_frames(clip)` into a real video file."""
    return encode_frames(path, codec, planted_frames(clip), clip.size, clip.fps)
