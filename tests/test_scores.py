"""Curation scores against planted ground truth: clips with known properties (`PlantedClip`: still or moving,
blurred, dark, washed out, black stretches, burned-in text), encoded as H.264 and run through the decode stage
as a job runs it (the decode worker, then the scores hook). Each score must separate the planted good clips from
the bad ones (ROC AUC >= 0.95); the OCR must read the planted text; a score turned off must leave no column and
cost nothing."""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.decode import scores
from pipeline.demo.clips import PlantedClip, make_planted_clip, make_scene_video
from pipeline.jobs import ScoresConfig

PER_FAMILY = 6
TEXTS = ["SUMMER SALE 42", "BREAKING NEWS", "Open daily 9", "GOAL 3 1", "Live at nine", "CHAPTER TWO"]
ALL_ON = ScoresConfig(ocr=True).model_dump()


def _family(name: str, k: int) -> PlantedClip:
    """The k-th clip of a family: the good clips vary only in content; each bad family changes one property."""
    rng = np.random.default_rng([k, len(name)])
    seed = 1000 * len(name) + k
    good = PlantedClip(seed)
    return {
        "good": good,
        "still": replace(good, moving=False),
        "blurred": replace(good, blur=float(rng.uniform(2.0, 3.0))),
        "dark": replace(good, gain=float(rng.uniform(0.15, 0.35))),
        "flat": replace(good, contrast=float(rng.uniform(0.2, 0.35))),
        "black": replace(good, black=(float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.6, 0.9)))),
        "text": replace(good, text=TEXTS[k % len(TEXTS)]),
    }[name]


FAMILIES = ("good", "still", "blurred", "dark", "flat", "black", "text")
# (column, the bad family, whether the good clips score higher)
SEPARATIONS = [
    ("score_motion", "still", True),
    ("score_static_fraction", "still", False),
    ("score_sharpness", "blurred", True),
    ("score_brightness", "dark", True),
    ("score_contrast", "flat", True),
    ("score_blank_fraction", "black", False),
    ("score_text_fraction", "text", False),
]


def _stage(config: dict[str, Any], **kwargs: Any) -> Any:
    from pipeline.stages.decode import DecodeStage

    return DecodeStage(num_frames=8, image_size=224, timeout_s=60, scores=config, **kwargs)


def _row(stage: Any, path: Path) -> dict[str, Any]:
    row = stage.decode_row({"uri": str(path), "video_id": path.stem, "kind": "work"})
    assert row["error_stage"] is None, row["error_message"]
    return row


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[tuple[PlantedClip, Path]]]:
    root = tmp_path_factory.mktemp("planted")
    return {name: [(c := _family(name, k), make_planted_clip(root / f"{name}-{k}.mp4", c)) for k in range(PER_FAMILY)]
            for name in FAMILIES}


@pytest.fixture(scope="module")
def scored(clips) -> dict[str, list[dict[str, Any]]]:
    stage = _stage(ALL_ON)
    return {name: [_row(stage, path) for _, path in family] for name, family in clips.items()}


@pytest.mark.parametrize(("column", "bad", "good_higher"), SEPARATIONS, ids=[s[0] for s in SEPARATIONS])
def test_each_score_separates_planted_good_and_bad_clips(scored, column: str, bad: str, good_higher: bool) -> None:
    good_values = [r[column] for r in scored["good"]]
    bad_values = [r[column] for r in scored[bad]]
    labels = [1] * len(good_values) + [0] * len(bad_values)
    values = np.array(good_values + bad_values, dtype=float)
    auc = roc_auc_score(labels, values if good_higher else -values)
    assert auc >= 0.95, (column, auc, good_values, bad_values)


def test_scores_of_planted_clips_read_as_defined(scored) -> None:
    # The numbers mean what docs/curation.md says, not just an order.
    for r in scored["still"]:
        assert r["score_static_fraction"] == 1.0 and r["score_motion"] < 0.01
    for r in scored["good"]:
        assert r["score_static_fraction"] == 0.0 and 0.02 < r["score_motion"] < 1.0
        assert r["score_blank_fraction"] == 0.0 and r["score_text_fraction"] == 0.0 and r["score_text"] == ""
        assert 0.0 <= r["score_brightness"] <= 1.0 and 0.0 <= r["score_contrast"] <= 1.0
        assert r["score_cuts"] is None  # no shot detector in a whole-video job
    for r in scored["black"]:
        assert 0.2 <= r["score_blank_fraction"] <= 0.85
    for r in scored["dark"]:
        assert r["score_brightness"] < 0.2


def test_ocr_reads_the_planted_text(clips, scored) -> None:
    for (clip, _), r in zip(clips["text"], scored["text"], strict=True):
        assert r["score_text_fraction"] == 1.0
        read = " ".join(r["score_text"].split("\n"))
        similarity = difflib.SequenceMatcher(None, read.lower(), clip.text.lower()).ratio()
        assert similarity >= 0.8, (clip.text, r["score_text"])


def test_cut_count_comes_from_the_shot_detector(tmp_path) -> None:
    scenes = [(3.0, "red", "left"), (3.0, "blue", "up"), (3.0, "green", "right"), (3.0, "yellow", "down")]
    path = make_scene_video(tmp_path / "scenes.mp4", scenes, fps=8)
    segments = {"mode": "shots", "length_s": 10.0, "overlap_s": 0.0, "min_s": 1.0, "max_s": 2.0, "threshold": 27.0}
    rows = list(_stage(ALL_ON | {"ocr": False}, segments=segments).decode(
        {"uri": str(path), "video_id": "scenes", "kind": "work", "need_segments": True}))
    video, parts = rows[-1], rows[:-1]
    assert video["error_stage"] is None and video["score_cuts"] == 3
    # shots are cut at the cuts and split at max_s: no cut lies inside a segment
    assert len(parts) >= 6 and [p["score_cuts"] for p in parts] == [0] * len(parts)
    assert all(p["score_motion"] is not None and p["score_brightness"] is not None for p in parts)
    fixed = dict(segments, mode="fixed", length_s=4.0)
    rows = list(_stage(ALL_ON | {"ocr": False}, segments=fixed).decode(
        {"uri": str(path), "video_id": "scenes", "kind": "work", "need_segments": True}))
    assert [r["score_cuts"] for r in rows] == [None] * len(rows)  # no detector ran: unknown, not 0
    from pipeline.decode.segments import decode_segments, plan_segments

    # a segment's OCR frames: its own sampled frames, at the source's size
    parts = list(decode_segments(path, plan_segments(path, "fixed", length_s=4.0), 8, 224, native=2))
    assert len(parts) == 3 and all(p.native_frames.shape == (2, 48, 64, 3) for p in parts)
    assert scores.cut_count([5, 10, 20], 5, 20) == 1 and scores.cut_count(None) is None


# toggle → the module function that does its work (spied on: off means never called)
WORK = {"motion": "motion", "sharpness": "sharpness", "brightness": "brightness", "contrast": "contrast",
        "static": "static_fraction", "blank": "blank_fraction", "cuts": "cut_count", "ocr": "read_text"}


@pytest.mark.parametrize("toggle", list(WORK))
def test_a_score_turned_off_is_null_and_costs_nothing(clips, monkeypatch, toggle: str) -> None:
    import pipeline.decode as decode

    calls: list[str] = []
    for name in {*WORK.values(), "ocr_engine", "luma"}:
        original = getattr(scores, name)
        monkeypatch.setattr(scores, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    natives: list[int] = []
    decode_video = decode.decode_video
    monkeypatch.setattr(decode, "decode_video", lambda *a, **k: natives.append(k["native"]) or decode_video(*a, **k))
    _, path = clips["text"][0]
    row = _row(_stage(ALL_ON | {toggle: False}), path)
    assert all(row[c] is None for c in scores.COLUMNS[toggle]), toggle  # declared columns: null, not computed
    assert WORK[toggle] not in calls
    others = [c for name, cols in scores.COLUMNS.items() if name != toggle for c in cols]
    assert set(others) <= set(row)
    if toggle == "ocr":
        assert natives == [0] and "ocr_engine" not in calls  # no frames kept for it, no engine loaded
    # everything off: no score column, no luma computed, nothing kept for OCR
    calls.clear()
    row = _row(_stage(dict.fromkeys(WORK, False)), path)
    assert not [c for c in row if c.startswith("score") and row[c] is not None] and calls == []


def test_default_job_scores_everything_but_ocr() -> None:
    from pipeline.jobs import JobError, load_job

    job = load_job(None)
    assert job.scores.ocr is False and all(getattr(job.scores, n) for n in WORK if n != "ocr")
    assert load_job(None, ["scores.ocr=true", "scores.ocr_frames=2"]).scores.ocr_frames == 2
    with pytest.raises(JobError, match="scores.blur"):
        load_job(None, ["scores.blur=true"])
    with pytest.raises(JobError, match="scores.ocr_frames"):
        load_job(None, ["scores.ocr_frames=0"])


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_ocr_frames_are_sampled_frames_at_the_source_aspect(tmp_path, decoder: str) -> None:
    from pipeline.decode import decode_video
    from pipeline.decode.frames import NATIVE_MAX_SIDE, spread_positions
    from pipeline.demo.clips import make_test_video

    small = make_test_video(tmp_path / "small.mp4", "h264", n_frames=24, size=(96, 64))
    native = decode_video(small, 8, size=None, decoder=decoder).frames
    v = decode_video(small, 8, 224, decoder=decoder, native=3)
    assert v.frames.shape == (8, 224, 224, 3) and spread_positions(8, 3) == [1, 4, 6]
    np.testing.assert_array_equal(v.native_frames, native[[1, 4, 6]])  # the very frames, not re-decoded ones
    assert decode_video(small, 8, 224, decoder=decoder).native_frames is None
    big = make_test_video(tmp_path / "big.mp4", "h264", n_frames=6, size=(1280, 720))
    v = decode_video(big, 4, 224, decoder=decoder, native=8)  # more asked than sampled: each sampled frame once
    assert v.native_frames.shape == (len(set(v.frame_indices)), 360, NATIVE_MAX_SIDE, 3)


def test_too_few_frames_give_null_not_a_number() -> None:
    frames = np.full((3, 224, 224, 3), 128, np.uint8)
    small = scores.luma(frames, scores.FLOW_SIZE)
    assert scores.motion(small[:1], [0], 25.0) is None and scores.static_fraction(small[:1], [0]) is None
    assert scores.motion(small, [4, 4, 4], 25.0) is None  # one frame sampled thrice: no pair of distinct frames
    assert scores.motion(small, [0, 1, 2], 0.0) is None  # no frame rate: no seconds
    assert scores.static_fraction(small, [0, 0, 1]) == 1.0
    gray = scores.luma(frames, scores.SCORE_SIZE)
    _, stds = scores.frame_stats(gray)
    assert scores.blank_fraction(gray, stds) == 1.0 and scores.sharpness(gray) == 0.0
