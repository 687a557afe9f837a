"""Held-out test videos for the decode benchmarks, made once and cached.

The decoder was tuned on the five real clips (`benchmarks.common.SHARED_VIDEOS`) as they are (320×240 and
640×360 H.264, their own encoders' keyframes). The benchmarks decode NEW encodes of their pictures instead —
other frame sizes (180 and 720 lines) and keyframe intervals (0.5 s, 2 s, and x264's default: 250 frames with
scene-cut keyframes) with x264's default settings (preset medium) — so no figure is measured on what anything
was tuned on. (No other real footage is available offline: the scenes are the same five; the files, their sizes
and GOPs are not.)

Cache: $STLLM_BENCH_CACHE, default ~/.cache/stllm-index/bench (the files' names carry their parameters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from benchmarks.common import SHARED_VIDEOS

CACHE = Path(os.environ.get("STLLM_BENCH_CACHE", Path.home() / ".cache" / "stllm-index" / "bench"))
GOPS = {"0.5s": 0.5, "2s": 2.0, "x264default": None}  # keyframe interval in seconds; None: x264's own
HEIGHTS = (180, 720)


@dataclass(frozen=True)
class Clip:
    path: Path
    source: str
    height: int
    gop: str

    @property
    def name(self) -> str:
        return self.path.stem


def encode(src: Path, dst: Path, height: int, keyint_s: float | None, seconds: float,
           fps: float | None = None) -> Path:
    """`src`'s first `seconds`, scaled to `height` lines (aspect kept, even sizes), H.264 with x264's defaults
    (preset medium), a keyframe every `keyint_s` seconds and no scene-cut keyframes (None: x264's default GOP,
    250 frames with scene cuts); at `fps` (None: the source's), resampled by time."""
    import av

    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    with av.open(str(src)) as c:
        s = c.streams.video[0]
        rate = Fraction(fps).limit_denominator(1001) if fps else (s.average_rate or Fraction(30))
        width = round(s.codec_context.width * height / s.codec_context.height / 2) * 2
        with av.open(str(tmp), mode="w") as out:
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if keyint_s is not None:
                k = str(max(1, round(keyint_s * float(rate))))
                stream.options = {"g": k, "keyint_min": k, "sc_threshold": "0"}
            written, next_t = 0, 0.0
            for frame in c.decode(s):
                if frame.time is None or frame.time < next_t:
                    continue
                if frame.time >= seconds:
                    break
                next_t += 1.0 / float(rate)
                img = frame.reformat(width=width, height=height, format="yuv420p")
                img.pts, img.time_base = written, 1 / rate
                for packet in stream.encode(img):
                    out.mux(packet)
                written += 1
            for packet in stream.encode():
                out.mux(packet)
    tmp.rename(dst)
    return dst


def decode_clips(quick: bool = False) -> list[Clip]:
    """Every source × height × GOP (quick: two sources, 6 s each)."""
    sources = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not sources:
        raise FileNotFoundError(f"no real clips in {SHARED_VIDEOS} to encode the held-out set from")
    if quick:
        sources = [p for p in sources if p.stem in ("BaoguoMa", "TVshow")] or sources[:2]
    seconds = 6.0 if quick else 12.0
    out = []
    for src in sources:
        for h in HEIGHTS:
            for gop, keyint in GOPS.items():
                path = CACHE / "decode" / f"{src.stem}-{h}p-gop{gop}-{seconds:g}s.mp4"
                out.append(Clip(encode(src, path, h, keyint, seconds), src.stem, h, gop))
    return out


def keyframe_count(path: Path) -> tuple[int, int]:
    """(frames, keyframes) of a file, from its packets."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = k = 0
        for p in c.demux(s):
            if p.size:
                n += 1
                k += bool(p.is_keyframe)
    return n, k


def recording(minutes: float, keyint_s: float | None, fps: int = 10, size: tuple[int, int] = (640, 360)) -> Path:
    """A long recording: the real clips back to back, over and over, until `minutes` are filled, resampled to `fps`
    by time, H.264 with x264's defaults (preset medium) and a keyframe every `keyint_s` seconds without scene-cut
    keyframes (None: x264's default GOP, 250 frames with scene cuts: here a keyframe at most clip changes)."""
    import av

    gop = "x264default" if keyint_s is None else f"{keyint_s:g}s"
    dst = CACHE / "segments" / f"recording-{minutes:g}min-{fps}fps-{size[1]}p-gop{gop}.mp4"
    if dst.exists():
        return dst
    clips = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not clips:
        raise FileNotFoundError(f"no real clips in {SHARED_VIDEOS}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".part.mp4")
    total, written = round(minutes * 60 * fps), 0
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if keyint_s is not None:
            k = str(max(1, round(keyint_s * fps)))
            stream.options = {"g": k, "keyint_min": k, "sc_threshold": "0"}
        while written < total:
            for clip in clips:
                with av.open(str(clip)) as c:
                    next_t = 0.0
                    for frame in c.decode(c.streams.video[0]):
                        if frame.time is None or frame.time < next_t:
                            continue
                        next_t += 1.0 / fps
                        img = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                        img.pts, img.time_base = written, Fraction(1, fps)
                        for packet in stream.encode(img):
                            out.mux(packet)
                        written += 1
                        if written >= total:
                            break
                if written >= total:
                    break
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(dst)
    return dst
