"""Long recordings split into moments: window/shot planning against hand-computed bounds, a real shot detector
on a generated 10-minute recording with hard cuts at known frames, and the one-pass segment decoder checked
frame for frame against a sequential decode (and against the scene each frame belongs to)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode import DecodeError
from pipeline.decode.segments import (
    DecodeCounts,
    Segment,
    decode_segments,
    detect_cuts,
    fixed_segments,
    plan_segments,
    read_strategy,
    seek_reads,
    shot_segments,
)
from pipeline.demo.clips import SCENE_COLOURS, make_corrupt_video, make_scene_video, scene_starts

FPS = 4
MOTIONS = ("left", "right", "up", "down")


def _scenes(total_s: float = 600.0, seed: int = 0) -> list[tuple[float, str, str]]:
    """Scenes of 20–69 s, each a new colour and motion, cut hard."""
    rng, colours, out, t = np.random.default_rng(seed), list(SCENE_COLOURS), [], 0.0
    while t < total_s:
        d = min(float(rng.integers(20, 70)), total_s - t)
        out.append((d, colours[len(out) % len(colours)], MOTIONS[len(out) % len(MOTIONS)]))
        t += d
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list[tuple[float, str, str]]]:
    scenes = _scenes()
    return make_scene_video(tmp_path_factory.mktemp("long") / "ten_minutes.mp4", scenes, fps=FPS), scenes


def _bounds(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.start_frame, s.end_frame) for s in segments]


def test_fixed_windows_by_hand() -> None:
    # 100 frames at 10 fps, 3 s windows every 2 s: the 2 s tail stays (≥ min 1 s), or joins when min is 2.5 s
    assert _bounds(fixed_segments(100, 10.0, 3.0, 1.0, 1.0)) == [(0, 30), (20, 50), (40, 70), (60, 90), (80, 100)]
    assert _bounds(fixed_segments(100, 10.0, 3.0, 1.0, 2.5)) == [(0, 30), (20, 50), (40, 70), (60, 100)]
    assert _bounds(fixed_segments(95, 10.0, 3.0)) == [(0, 30), (30, 60), (60, 90), (90, 95)]
    assert [s.index for s in fixed_segments(95, 10.0, 3.0)] == [0, 1, 2, 3]
    s = fixed_segments(95, 10.0, 3.0)[1]
    assert (s.start_s, s.end_s) == (3.0, 6.0)
    with pytest.raises(ValueError, match="overlap_s"):
        fixed_segments(100, 10.0, 3.0, 3.0)


def test_shots_merged_and_split_by_hand() -> None:
    # shots [0,10) [10,12) [12,50) [50,100) at 10 fps; min 1 s merges the 2-frame shot, max 3 s splits the rest
    assert _bounds(shot_segments([10, 12, 50], 100, 10.0, 1.0, 3.0)) == [(0, 12), (12, 31), (31, 50), (50, 75),
                                                                         (75, 100)]
    assert _bounds(shot_segments([], 40, 10.0, 1.0, 30.0)) == [(0, 40)]


def test_segment_frames_follow_the_model_rule_inside_the_segment() -> None:
    seg = Segment(1, 100, 124, 4.0)
    assert seg.sampled(8) == [101, 104, 107, 110, 113, 115, 118, 121]  # the original rule's 24 → 8, shifted


def test_shot_detector_finds_every_cut_at_its_frame(recording) -> None:
    path, scenes = recording
    truth = scene_starts(scenes, FPS)[1:]
    cuts = detect_cuts(path)
    assert len(cuts) == len(truth) and all(abs(c - t) <= 1 for c, t in zip(cuts, truth, strict=True)), (cuts, truth)


def test_plans_on_the_recording(recording, tmp_path) -> None:
    path, scenes = recording
    n = round(sum(d for d, _, _ in scenes) * FPS)
    fixed = plan_segments(path, "fixed", length_s=10.0, overlap_s=2.0, min_s=2.0)
    assert _bounds(fixed) == _bounds(fixed_segments(n, FPS, 10.0, 2.0, 2.0)) and fixed[-1].end_frame == n
    shots = plan_segments(path, "shots", min_s=2.0, max_s=30.0)
    starts = scene_starts(scenes, FPS)
    for seg in shots:  # every shot segment lies inside one scene, none longer than max_s
        k = int(np.searchsorted(starts, seg.start_frame, side="right")) - 1
        assert seg.end_frame <= (starts[k + 1] if k + 1 < len(starts) else n) and seg.n_frames <= 30 * FPS
    assert {s.start_frame for s in shots} >= set(starts)
    short = make_scene_video(tmp_path / "short.mp4", [(6.0, "red", "left")], fps=FPS)
    assert len(plan_segments(short, "fixed", length_s=10.0)) == len(plan_segments(short, "shots")) == 1
    assert len(plan_segments(path, "whole")) == 1


def _sequential(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def test_segment_frames_equal_a_sequential_decode_and_show_their_scene(recording) -> None:
    path, scenes = recording
    everything = _sequential(path)
    segments = plan_segments(path, "fixed", length_s=10.0, overlap_s=3.0)
    counts = DecodeCounts()
    decoded = list(decode_segments(path, segments, 8, size=None, counts=counts))
    assert [d.segment for d in decoded] == segments  # every segment, in order
    starts = scene_starts(scenes, FPS)
    for d in decoded:
        assert d.frame_indices == d.segment.sampled(8) and d.thumbnail_jpeg[:2] == b"\xff\xd8"
        for i, frame in zip(d.frame_indices, d.frames, strict=True):
            assert np.array_equal(frame, everything[i])  # the seek landed on the right frame
            colour = SCENE_COLOURS[scenes[int(np.searchsorted(starts, i, side="right")) - 1][1]]
            assert np.abs(frame[1, 1].astype(int) - colour).max() < 12  # its scene's background
    assert counts.frames_used == len({i for d in decoded for i in d.frame_indices})


def test_sparse_windows_seek_instead_of_decoding_everything(tmp_path) -> None:
    path = make_scene_video(tmp_path / "sparse.mp4", _scenes(240.0, seed=1), fps=FPS, gop=FPS)  # keyframe/s
    segments = plan_segments(path, "fixed", length_s=20.0)
    counts = DecodeCounts()
    out = list(decode_segments(path, segments, 2, size=32, counts=counts))
    assert len(out) == 12 and counts.frames_used == 24
    assert counts.frames_decoded < 0.25 * 240 * FPS and counts.seeks >= 12  # a few frames per keyframe


def test_read_strategy_follows_the_keyframes() -> None:
    needed = list(range(13, 1800, 20))  # a wanted frame every 2 s at 10 fps
    every_second = list(range(0, 1800, 10))
    assert seek_reads(needed, every_second) == (4 * 90, 90)  # from the keyframe before each: 4 frames, a seek each
    assert read_strategy(needed, every_second) == "slice"  # short runs after each seek
    x264_default = list(range(0, 1800, 250))  # 250-frame GOP: reading mostly goes on, frame threads pay
    decoded, seeks = seek_reads(needed, x264_default)
    assert seeks == 8 and decoded > 0.8 * (needed[-1] + 1)  # one seek per keyframe: most frames decoded anyway
    assert read_strategy(needed, x264_default) == "frame"


def test_memory_holds_only_the_open_segments(recording) -> None:
    path, _ = recording
    segments = plan_segments(path, "fixed", length_s=10.0)  # 60 segments: 60 × 8 × 224² × 3 = 72 MB in all
    per_segment = 8 * 224 * 224 * 3
    tracemalloc.start()
    try:
        n = sum(1 for _ in decode_segments(path, segments, 8, size=224))  # each segment dropped once handed out
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 60 and peak < 6 * per_segment, peak


def test_a_corrupt_file_is_a_decode_error(tmp_path) -> None:
    bad = make_corrupt_video(tmp_path / "bad.mp4")
    with pytest.raises(DecodeError):
        plan_segments(bad, "fixed")
    with pytest.raises(DecodeError):
        list(decode_segments(bad, [Segment(0, 0, 10, 4.0)], 4))
