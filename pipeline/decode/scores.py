"""Curation signals of a video or a segment, from the frames the decode stage has anyway (no second decode).

Input: the model's T sampled frames, uint8 (T, S, S, 3): the centre crops at the model's image size S (224 for
every ST-LLM checkpoint), so every source is measured at one resolution, the one the model sees; what lies
outside the centre crop is not seen (the sides of a 16:9 frame). OCR alone reads a few of the sampled frames at
the source's aspect ratio (`DecodedVideo.native_frames`): text sits in corners and across the width, and a crop
of a large source is too small to read. Definitions, ranges and measured costs: docs/curation.md.

The functions are pure (frames in, numbers out); `Scorer` applies a job's `scores` section to one video or
segment and holds the OCR engine (loaded on first use).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

SCORE_SIZE = 224  # luma side the per-frame scores are measured at (the model's crops are already this size)
FLOW_SIZE = 112  # side of the luma the flow and the frame differences run on: DIS costs ~4 ms per 64 frames here
STATIC_MAD = 1.0  # mean absolute luma difference (0-255) below which a pair of frames counts as unchanged
BLANK_STD = 6.0  # luma standard deviation (0-255) below which a frame is flat (one colour: black, white, a card)
BLACK_LUMA, BLACK_SHARE = 25, 0.98  # or this share of its pixels at most this luma (ffmpeg blackdetect's defaults)
# OCR lines read with less confidence are dropped: on the real clips, what scored below it was a letter read into
# blur or texture (0.59-0.79), what scored above it was real text (0.87-1.0)
TEXT_MIN_SCORE = 0.8

# job toggle → the row columns it writes (off: none of them)
COLUMNS: dict[str, tuple[str, ...]] = {
    "motion": ("score_motion",),
    "sharpness": ("score_sharpness",),
    "brightness": ("score_brightness",),
    "contrast": ("score_contrast",),
    "static": ("score_static_fraction",),
    "blank": ("score_blank_fraction",),
    "cuts": ("score_cuts",),
    "ocr": ("score_text_fraction", "score_text"),
}


# ---------------------------------------------------------------- per-frame luma


def luma(frames: np.ndarray, side: int) -> list[np.ndarray]:
    """BT.601 luma of RGB uint8 (T, H, W, 3) frames, each resized to side×side (area-averaged) when it differs."""
    out = []
    for frame in frames:
        y = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if y.shape != (side, side):
            y = cv2.resize(y, (side, side), interpolation=cv2.INTER_AREA)
        out.append(y)
    return out


def frame_stats(gray: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: (mean luma, luma standard deviation), 0-255."""
    stats = np.array([[v[0][0] for v in cv2.meanStdDev(y)] for y in gray], dtype=np.float64).reshape(-1, 2)
    return stats[:, 0], stats[:, 1]


# ---------------------------------------------------------------- the scores


def brightness(means: np.ndarray) -> float:
    """Mean luma over the frames, 0 (black) … 1 (white)."""
    return float(means.mean() / 255.0)


def contrast(stds: np.ndarray) -> float:
    """Mean over the frames of the luma's standard deviation / 127.5: 0 (flat) … 1 (half black, half white)."""
    return float(stds.mean() / 127.5)


def sharpness(gray: Sequence[np.ndarray]) -> float:
    """Median over the frames of the variance of the luma's Laplacian (3×3, 0-255 levels) at SCORE_SIZE: a fixed
    size, so sources of any resolution compare. The median: a few black or transition frames do not pull it."""
    return float(np.median([cv2.meanStdDev(cv2.Laplacian(y, cv2.CV_32F))[1][0][0] ** 2 for y in gray]))


def blank_mask(gray: Sequence[np.ndarray], stds: np.ndarray) -> np.ndarray:
    """Frames that are flat (luma std < BLANK_STD) or black (≥ BLACK_SHARE of the pixels ≤ BLACK_LUMA)."""
    bright = np.array([cv2.countNonZero(cv2.threshold(y, BLACK_LUMA, 255, cv2.THRESH_BINARY)[1]) / y.size
                       for y in gray])
    return (stds < BLANK_STD) | (bright <= 1 - BLACK_SHARE)


def blank_fraction(gray: Sequence[np.ndarray], stds: np.ndarray) -> float:
    """Share of the frames that are black or flat, 0 … 1."""
    return float(blank_mask(gray, stds).mean())


def _pairs(frame_indices: Sequence[int]) -> list[int]:
    """k for each consecutive pair (k, k+1) of DISTINCT frames (a short video repeats some sampled frames)."""
    return [k for k in range(len(frame_indices) - 1) if frame_indices[k + 1] != frame_indices[k]]


def static_fraction(small: Sequence[np.ndarray], frame_indices: Sequence[int]) -> float | None:
    """Share of the consecutive pairs of sampled frames whose mean absolute luma difference is below STATIC_MAD
    (nothing moved, nothing changed), 0 … 1; None with fewer than two distinct frames."""
    pairs = _pairs(frame_indices)
    if not pairs:
        return None
    return float(np.mean([cv2.mean(cv2.absdiff(small[k], small[k + 1]))[0] < STATIC_MAD for k in pairs]))


def motion(small: Sequence[np.ndarray], frame_indices: Sequence[int], fps: float) -> float | None:
    """Mean optical-flow magnitude between consecutive sampled frames (DIS, OpenCV's ultrafast preset), in frame
    sides per second: pixels / the flow image's side (the shorter side of the source: the crop keeps it) / the
    seconds between the two frames, averaged over the pixels and then the pairs. 0 = still; 0.5 = everything
    crosses half the frame each second. None with fewer than two distinct frames or no frame rate."""
    pairs = _pairs(frame_indices)
    if not pairs or not fps or fps <= 0:
        return None
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    speeds = []
    for k in pairs:
        flow = dis.calc(small[k], small[k + 1], None)
        magnitude = cv2.magnitude(flow[..., 0], flow[..., 1])
        dt = (frame_indices[k + 1] - frame_indices[k]) / fps
        speeds.append(cv2.mean(magnitude)[0] / small[k].shape[0] / abs(dt))
    return float(np.mean(speeds))


def cut_count(cuts: Sequence[int] | None, start: int = 0, end: int | None = None) -> int | None:
    """Shot cuts (frames where the shot detector found a new shot) inside frames (start, end); None where the
    detector did not run."""
    if cuts is None:
        return None
    return sum(1 for c in cuts if c > start and (end is None or c < end))


def read_text(frames: np.ndarray, engine: Any, min_score: float = TEXT_MIN_SCORE) -> tuple[float, str]:
    """OCR each frame: (the share of frames with text, the lines read, each once, in order of first sight). A
    line counts when the engine's confidence in it is at least `min_score`."""
    lines: dict[str, None] = {}
    with_text = 0
    for frame in frames:
        result = engine(frame)
        found = [" ".join(t.split()) for t, p in zip(result.txts or (), result.scores or (), strict=True)
                 if p >= min_score]
        found = [t for t in found if t]
        with_text += bool(found)
        lines.update(dict.fromkeys(found))
    return with_text / max(len(frames), 1), "\n".join(lines)


def ocr_engine() -> Any:
    """RapidOCR (PP-OCR det + rec on onnxruntime; the models ship in the wheel, nothing is downloaded). Detection at
    the frame's own size up to NATIVE_MAX_SIDE (its default upscales a 320×240 frame to 981×736: 6× the cost, and
    more false text on textures), no angle classifier (video text is upright), one thread (decoding yields cores
    to the model actors)."""
    from rapidocr import RapidOCR

    from pipeline.decode.frames import NATIVE_MAX_SIDE

    return RapidOCR(params={"Global.log_level": "error", "Global.use_cls": False, "Det.limit_type": "max",
                            "Det.limit_side_len": NATIVE_MAX_SIDE,
                            "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                            "EngineConfig.onnxruntime.inter_op_num_threads": 1})


# ---------------------------------------------------------------- a job's scores


class Scorer:
    """A job's `scores` section (`pipeline.jobs.ScoresConfig` as a dict) applied to one video or segment: a dict of
    the enabled scores' columns (`COLUMNS`) and `scores_s`, the seconds they took. A score that fails is logged
    and left null: a curation signal never costs a video its index row."""

    def __init__(self, config: Mapping[str, Any]):
        self.on = {name for name in COLUMNS if config.get(name)}
        self.ocr_frames = int(config.get("ocr_frames", 4))
        self._engine: Any = None

    @property
    def native(self) -> int:
        """Frames the decoder should keep at the source's aspect ratio (for OCR; 0: none)."""
        return self.ocr_frames if "ocr" in self.on else 0

    @property
    def columns(self) -> list[str]:
        return [c for name in COLUMNS if name in self.on for c in COLUMNS[name]] + (["scores_s"] if self.on else [])

    def empty(self) -> dict[str, Any]:
        """The columns, null: rows that were not scored (errors, copies) have the same columns."""
        return dict.fromkeys(self.columns)

    def __call__(self, frames: np.ndarray, frame_indices: Sequence[int], fps: float | None,
                 native_frames: np.ndarray | None = None, cuts: Sequence[int] | None = None,
                 span: tuple[int, int | None] = (0, None), name: str = "") -> dict[str, Any]:
        """`cuts`: the shot detector's cuts of the whole video (None: it did not run); `span`: the frames
        [start, end) of the segment scored (the whole video by default); `name`: for the log."""
        t0 = time.perf_counter()
        out = self.empty()
        if not self.on:
            return out
        on = self.on
        gray = luma(frames, SCORE_SIZE) if on & {"sharpness", "brightness", "contrast", "blank"} else []
        small = luma(frames, FLOW_SIZE) if on & {"motion", "static"} else []
        means, stds = frame_stats(gray) if gray else (np.zeros(0), np.zeros(0))
        work = {
            "motion": lambda: {"score_motion": motion(small, frame_indices, fps or 0.0)},
            "sharpness": lambda: {"score_sharpness": sharpness(gray)},
            "brightness": lambda: {"score_brightness": brightness(means)},
            "contrast": lambda: {"score_contrast": contrast(stds)},
            "static": lambda: {"score_static_fraction": static_fraction(small, frame_indices)},
            "blank": lambda: {"score_blank_fraction": blank_fraction(gray, stds)},
            "cuts": lambda: {"score_cuts": cut_count(cuts, *span)},
            "ocr": lambda: self._text(native_frames),
        }
        for score in COLUMNS:
            if score in on:
                try:
                    out.update(work[score]())
                except Exception:  # noqa: BLE001 — see the class doc
                    log.warning("score %s failed on %s", score, name or "a video", exc_info=True)
        out["scores_s"] = time.perf_counter() - t0
        return out

    def _text(self, native_frames: np.ndarray | None) -> dict[str, Any]:
        if native_frames is None or not len(native_frames):
            return {}
        if self._engine is None:
            self._engine = ocr_engine()
        fraction, text = read_text(native_frames, self._engine)
        return {"score_text_fraction": fraction, "score_text": text}


__all__ = ["COLUMNS", "Scorer", "blank_fraction", "brightness", "contrast", "cut_count", "motion", "read_text",
           "sharpness", "static_fraction"]
