"""The synthetic world: scenes and their truth, rendering, real encoded clips, scoring, `eval`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from stllm.world.render import render
from stllm.world.scenes import COLOURS, OPPOSITE, SPLITS, UNSEEN_COMBOS, sample_scene
from stllm.world.scoring import answer_is_right, grade


def _centroid(frame: np.ndarray, background: tuple[int, int, int]) -> tuple[float, float, np.ndarray]:
    mask = np.abs(frame.astype(int) - np.array(background)).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), frame[mask].mean(0)


def test_scenes_are_deterministic_and_splits_keep_their_combinations() -> None:
    assert sample_scene(3, "train", 7) == sample_scene(3, "train", 7)
    assert sample_scene(3, "train", 7) != sample_scene(3, "heldout", 7)  # another random stream
    for split in SPLITS:
        pairs = {(s.shape, s.colour) for s in (sample_scene(0, split, i) for i in range(300))}
        if split == "unseen":
            assert pairs == set(UNSEEN_COMBOS)
        else:
            assert not pairs & UNSEEN_COMBOS and len(pairs) == 12 - len(UNSEEN_COMBOS)


def test_a_clip_played_backwards_is_the_opposite_clip() -> None:
    """Direction needs temporal order: the reversed frames ARE a scene of the world moving the other way."""
    for i in range(50):
        scene = sample_scene(1, "train", i)
        frames = render(scene)
        back = scene.reversed()
        assert back.direction == OPPOSITE[scene.direction]
        np.testing.assert_array_equal(render(back), frames[::-1])
        # the object stays whole inside the frame: never touches the border
        moving = np.abs(frames.astype(int) - np.array(scene.background)).sum(-1) > 60
        assert moving.any(axis=(1, 2)).all()
        assert not (moving[:, 0].any() or moving[:, -1].any() or moving[:, :, 0].any() or moving[:, :, -1].any())


def test_synth_writes_real_clips_whose_pixels_match_the_truth(tmp_path) -> None:
    from pipeline.decode import decode_video
    from pipeline.training.world import read_manifest, synth

    report = synth(tmp_path / "w", 3, seed=5)
    assert report["clips"] == {"train": 3, "heldout": 3, "unseen": 3} and report["rows"] == 9 * 5
    rows = read_manifest(tmp_path / "w")
    assert rows == read_manifest(tmp_path / "w" / "manifest.jsonl")
    assert pq.read_schema(tmp_path / "w" / "manifest.parquet").names[:5] == ["uri", "video_id", "content_id",
                                                                             "question", "answer"]
    scenes = [json.loads(line) for line in (tmp_path / "w" / "scenes.jsonl").read_text().splitlines()]
    assert {s["codec"] for s in scenes} == {"h264", "vp9", "hevc"}
    for s in scenes:
        video = decode_video(s["uri"], num_frames=8, size=None)
        assert video.frames.shape == (8, 64, 64, 3) and video.codec == s["codec"]
        (x0, y0, rgb), (x1, y1, _) = (_centroid(video.frames[k], s["background"]) for k in (0, -1))
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[s["direction"]]
        assert moved > 8, (s["clip_id"], s["direction"], (x0, y0), (x1, y1))
        nearest = min(COLOURS, key=lambda c: np.abs(rgb - np.array(COLOURS[c])).sum())
        assert nearest == s["colour"], (rgb, s["colour"])  # the truth's colour, through the codec
        mine = [r for r in rows if r["uri"] == s["uri"]]
        truth = {r["qtype"]: r["answer"] for r in mine}
        assert truth == {"caption": s["caption"], "colour": s["colour"], "shape": s["shape"],
                         "direction": s["direction"], "size": s["size"]}
        assert s["colour"] in s["caption"] and s["shape"] in s["caption"] and s["direction"] in s["caption"]


def test_synth_rejects_bad_arguments(tmp_path) -> None:
    from pipeline.training.world import synth

    with pytest.raises(ValueError, match="split must be one of"):
        synth(tmp_path, 1, splits=["test"])
    with pytest.raises(ValueError, match="n must be"):
        synth(tmp_path, 0)


def test_scoring() -> None:
    assert answer_is_right("direction", "Left.", "left")
    assert answer_is_right("colour", "red, bright", "red")
    assert not answer_is_right("direction", "it moves left", "left")  # no credit for burying the word
    assert not answer_is_right("direction", "", "left")
    assert answer_is_right("caption", "A small red circle moves slowly up.", "a small red circle moves slowly up")
    assert not answer_is_right("caption", "a small red circle moves up", "a small red circle moves slowly up")
    report = grade([{"qtype": "shape", "answer": "circle", "truth": "circle"},
                    {"qtype": "shape", "answer": "square", "truth": "circle"},
                    {"qtype": "caption", "answer": "x", "truth": "y"}])
    assert report.accuracy() == {"caption": 0.0, "shape": 0.5}


def test_eval_grades_a_real_model_on_every_question(tmp_path, tiny_dir) -> None:
    """The tiny RANDOM model through the real decode + hf engine: every question asked and graded as the
    scoring rules say (its answers are noise; the trained world model is what should score)."""
    from pipeline.cli import main
    from pipeline.training.world import synth

    synth(tmp_path / "w", 2, seed=2, splits=["heldout", "unseen"])
    answers = tmp_path / "answers.jsonl"
    assert main(["eval", str(tiny_dir), str(tmp_path / "w"), "--answers", str(answers),
                 "--max-new-tokens", "8"]) == 0
    graded = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(graded) == 4 * 5
    assert {(g["split"], g["qtype"]) for g in graded} == {
        (s, q) for s in ("heldout", "unseen") for q in ("caption", "colour", "shape", "direction", "size")}
    for g in graded:
        assert g["right"] == answer_is_right(g["qtype"], g["answer"], g["truth"])


def test_multi_word_truths_are_graded_by_their_words() -> None:
    assert answer_is_right("answer", "A red car, parked.", "a red car")
    assert not answer_is_right("answer", "a red", "a red car")


def test_reversed_pairs_hold_each_training_scene_both_ways(tmp_path) -> None:
    from pipeline.decode import decode_video
    from pipeline.training.world import synth

    report = synth(tmp_path / "w", 3, seed=5, splits=["train", "heldout"], reversed_pairs=True)
    assert report["clips"] == {"train": 6, "heldout": 3}  # pairs only where the model learns
    scenes = [json.loads(line) for line in (tmp_path / "w" / "scenes.jsonl").read_text().splitlines()]
    train = [s for s in scenes if s["split"] == "train"]
    for a, b in zip(train[::2], train[1::2], strict=True):
        assert b["clip_id"] == a["clip_id"] + "-reversed" and b["direction"] == OPPOSITE[a["direction"]]
        assert (a["shape"], a["colour"], a["center"]) == (b["shape"], b["colour"], b["center"])
        fa = decode_video(a["uri"], num_frames=16, size=None).frames.astype(int)
        fb = decode_video(b["uri"], num_frames=16, size=None).frames.astype(int)
        assert np.abs(fa[::-1] - fb).mean() < 3  # the same frames in opposite order (through two codecs)
