"""The synthetic world's model: its parts (tokenizer, position init, vision pretraining) and the recipe's
stage wiring. (No trained world model ships yet: the recipe does not reach issue 10's goals — see the README.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stllm.world.model import build_world_model, sincos_position_embedding, world_corpus
from stllm.world.pretrain import PretrainConfig, VisionPretrainer, frame_batch
from stllm.world.render import chroma_420, render
from stllm.world.scenes import COLOURS, DIRECTIONS, QUESTIONS, SHAPES, SIZES, SPEEDS, sample_scene


@pytest.fixture(scope="module")
def world():
    return build_world_model(seed=0)


def test_world_tokenizer_keeps_every_world_word_whole(world):
    _, processor = world
    words = {*COLOURS, *SHAPES, *SIZES, *DIRECTIONS, *SPEEDS, "moves", "object"}
    for w in sorted(words):
        assert processor.tokenizer.tokenize(w) == [f"▁{w}"], w
    for q in QUESTIONS.values():  # a question is a handful of pieces, not letters
        assert len(processor.tokenizer.tokenize(q)) <= 8, q
    assert len(world_corpus()) > len(QUESTIONS) * 10


def test_sincos_positions_are_distinct_and_the_class_row_is_zero():
    table = sincos_position_embedding(8, 176)
    assert table.shape == (65, 176) and torch.count_nonzero(table[0]) == 0
    d = torch.cdist(table[1:], table[1:])
    assert float(d[~torch.eye(64, dtype=torch.bool)].min()) > 0.1  # every patch has its own place
    assert float(d[0, 1]) < float(d[0, 7])  # neighbours are closer than far patches


def test_each_frame_may_read_its_own_question(world):
    """(T, Lq) Q-Former ids in one forward == one call per frame (pretraining batches frames of many clips)."""
    model, processor = world
    torch.manual_seed(0)
    pv = torch.randn(3, 3, 64, 64)
    feats = model.get_vision_features(pv, num_frames=1)
    texts = ["What colour is the object?", "Describe the video in detail.", "Is the object small or large?"]
    tok = processor.qformer_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model.get_frame_tokens(feats, tok["input_ids"], tok["attention_mask"])
        for i, text in enumerate(texts):
            ids, mask = processor.qformer_inputs(text)
            one = model.get_frame_tokens(feats[i:i + 1], ids, mask)
            torch.testing.assert_close(batched[i], one[0], atol=2e-5, rtol=1e-4)


def test_frame_batch_labels_are_the_rendered_truth():
    frames, labels = frame_batch(np.random.default_rng(0), 24, 64, 8)
    assert frames.shape == (24, 64, 64, 3) and labels["patches"].shape == (24, 64)
    for i in range(24):
        shape = int(labels["shape"][i])
        marked = labels["patches"][i]
        assert set(marked.unique().tolist()) <= {0, 1 + shape} and (marked > 0).any()
        # the marked patches hold the object's colour (the chroma round trip keeps flat areas)
        x, y = labels["position"][i].tolist()
        px = frames[i, int(y * 64), int(x * 64)].astype(int)
        want = np.array(list(COLOURS.values())[int(labels["colour"][i])])
        assert np.abs(px - want).max() <= 12, (px, want)
    flat = np.full((1, 8, 8, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(chroma_420(flat), flat)


def test_frame_batch_never_draws_unseen_combinations():
    from stllm.world.scenes import UNSEEN_COMBOS

    _, labels = frame_batch(np.random.default_rng(1), 300, 64, 8)
    pairs = {(SHAPES[int(s)], list(COLOURS)[int(c)]) for s, c in zip(labels["shape"], labels["colour"], strict=True)}
    assert not pairs & UNSEEN_COMBOS and len(pairs) == 9


def test_vision_pretraining_trains_the_vision_tower_only_and_learns():
    model, processor = build_world_model(seed=1)
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vit_before = model.vision_model.embeddings.patch_embedding.weight.clone()
    pre = VisionPretrainer(model, processor, PretrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=2))
    before = pre.evaluate(n=128)
    pre.train(progress=False)
    after = pre.evaluate(n=128)
    assert after["colour"] >= before["colour"] + 0.2, (before, after)  # colour comes first
    assert after["position_error"] < before["position_error"]
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    assert not torch.equal(model.vision_model.embeddings.patch_embedding.weight, vit_before)


def test_rendering_a_subset_of_frames_equals_those_frames():
    scene = sample_scene(0, "train", 3)
    np.testing.assert_array_equal(render(scene, [0, 5, 15]), render(scene)[[0, 5, 15]])


def test_the_recipe_runs_every_stage_and_records_itself(tmp_path):
    """`make demo-model`'s wiring at toy size: synth → stage 1 → stage 2 → eval → a folder that loads."""
    from pipeline.world_model import WorldRecipe, build_demo_model
    from stllm.engines import load_engine

    recipe = WorldRecipe(train_clips=3, eval_clips=2, pretrain=PretrainConfig(steps=2, batch_size=4),
                         stage2_overrides=["max_steps=2", "batch_size=2", "save_every=100"])
    report = build_demo_model(tmp_path / "work", tmp_path / "model", recipe, progress=False)
    assert report["stage2"]["steps"] == 2 and report["stage2"]["samples"] == 3 * 2 * (4 + 4)  # pairs × 4 + direction ×4
    assert set(report["eval"]) == {"heldout", "unseen"} and "heldout_frames" in report["stage1"]
    recorded = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert recorded["stage2"]["repeat"] == {"direction": 4} and recorded["stage2"]["freeze"] == ["vision", "qformer"]
    assert recorded["recipe"]["pretrain"]["steps"] == 2
    engine = load_engine("hf", str(tmp_path / "model"), device="cpu")
    try:
        from stllm.engine import GenerationOptions, VideoRequest

        res = engine.generate([VideoRequest("v", render(sample_scene(0, "heldout", 0)), ["What colour is it?"])],
                              GenerationOptions(max_new_tokens=3))
        assert res[0].ok
    finally:
        engine.close()
