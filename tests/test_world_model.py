"""The synthetic world's model: its parts (tokenizer, position init, vision pretraining), the recipe's stage
wiring, and the shipped model.

The shipped model (stllm/world/demo_model, rebuilt by `make demo-model`) is graded here on clips drawn fresh from
the held-out seed stream, encoded and decoded like any other; the vLLM engine (one engine start) must meet the
same goals and give the hf engine's answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.paths import world_model_dir
from stllm.world.model import build_world_model, sincos_position_embedding, world_corpus
from stllm.world.pretrain import PretrainConfig, VisionPretrainer, frame_batch
from stllm.world.render import chroma_420, render
from stllm.world.scenes import COLOURS, DIRECTIONS, QUESTIONS, SHAPES, SIZES, SPEEDS, sample_scene

GOALS = {"colour": 0.95, "shape": 0.95, "direction": 0.90}  # issue 10, held-out clips from fresh seeds
# Shape sits at its goal: 0.956 over 500 fresh held-out clips (0.98, 0.95, 0.95 on three seeds;
# docs/world-model.md), so on the suite's 100 clips (binomial sd ~0.02) it is held to 0.93; colour and direction
# measured 1.00. Size and
# captions (exact match of the whole sentence, no goal) are held to what the model shows, with a margin.
FLOORS = {**GOALS, "shape": 0.93, "size": 0.90, "caption": 0.50}
FRESH_CLIPS = 100  # per split
FRESH_SEED = 4242  # a seed `make demo-model` never trains or evaluates on


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


def test_language_pretraining_teaches_the_question_and_trains_the_llm_only():
    """The language stage: without video the LLM learns which kind of word answers which question."""
    from stllm.world.language import LanguageConfig, answer_type_mass, pretrain_language, world_transcripts

    pairs = world_transcripts()
    assert (QUESTIONS["colour"], "red") in pairs and (QUESTIONS["colour"], "circle") not in pairs
    assert sum(q == QUESTIONS["shape"] for q, _ in pairs) == len(SHAPES)
    model, processor = build_world_model(seed=2)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    before = answer_type_mass(model, processor)
    report = pretrain_language(model, processor, LanguageConfig(steps=120, batch_size=32, lr=2e-3))
    after = answer_type_mass(model, processor)
    assert all(v < 0.6 for v in before.values()), before
    assert all(v > 0.9 for v in after.values()), after  # "colour" and "shape" differ by one word: both read
    assert report["step"] == 120 and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_rendering_a_subset_of_frames_equals_those_frames():
    scene = sample_scene(0, "train", 3)
    np.testing.assert_array_equal(render(scene, [0, 5, 15]), render(scene)[[0, 5, 15]])


def test_the_recipe_runs_every_stage_and_records_itself(tmp_path):
    """`make demo-model`'s wiring at toy size: synth → stage 1 → 2a → language → 2b → eval → a folder that loads."""
    from pipeline.training.world_model import Stage2Step, WorldRecipe, build_demo_model
    from stllm import load_engine
    from stllm.world.language import LanguageConfig

    with pytest.raises(ValueError, match="names no stage-2 step"):
        WorldRecipe(stage2=[Stage2Step(name="only", config="world.yaml")])
    recipe = WorldRecipe(train_clips=3, eval_clips=2, pretrain=PretrainConfig(steps=2, batch_size=4),
                         language=LanguageConfig(steps=3, batch_size=4),
                         stage2_overrides=["max_steps=2", "batch_size=2", "save_every=100"])
    report = build_demo_model(tmp_path / "work", tmp_path / "model", recipe, progress=False)
    assert report["stage2a"]["steps"] == 2 and report["stage2a"]["samples"] == 3 * 2  # direction rows only
    assert report["stage2b"]["steps"] == 2 and report["stage2b"]["samples"] == 3 * 2 * (5 + 3)  # direction 4×
    assert set(report["eval"]) == {"heldout", "unseen"} and "heldout_frames" in report["stage1"]
    assert report["stage1"]["language"]["step"] == 3 and set(report["stage1"]["language_answer_type_mass"]) == {
        "colour", "shape", "size", "direction"}
    assert (tmp_path / "work" / "language" / "config.json").is_file()
    recorded = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert recorded["stage2a"]["qtypes"] == ["direction"] and not recorded["stage2a"]["masking"]
    assert recorded["stage2b"]["repeat"] == {"direction": 4} and recorded["stage2b"]["masking"]
    assert recorded["stage2b"]["freeze"] == ["vision", "qformer"] and recorded["stage2b"]["max_steps"] == 2
    assert recorded["stage2b"]["model"] == str(tmp_path / "work" / "language")  # 2b starts from the language stage
    assert recorded["recipe"]["pretrain"]["steps"] == 2 and recorded["recipe"]["language"]["steps"] == 3
    engine = load_engine("hf", str(tmp_path / "model"), device="cpu")
    try:
        from stllm.engine import GenerationOptions, VideoRequest

        res = engine.generate([VideoRequest("v", render(sample_scene(0, "heldout", 0)), ["What colour is it?"])],
                              GenerationOptions(max_new_tokens=3))
        assert res[0].ok
    finally:
        engine.close()


# ---- the shipped model ---------------------------------------------------------------------------------------

def test_shipped_model_is_small_and_says_how_it_was_made():
    folder = world_model_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["recipe"]["seed"] == 0 and recipe["stage2b"]["freeze"] == ["vision", "qformer"]
    assert recipe["stage2a"]["qtypes"] == ["direction"] and recipe["stage2b"]["masking"]
    assert recipe["recipe"]["language"]["steps"] > 0 and recipe["recipe"]["pretrain"]["steps"] > 0
    recorded = json.loads((folder / "eval.json").read_text())["eval"]["heldout"]["accuracy"]
    assert all(recorded[q] >= g for q, g in FLOORS.items()), recorded


@pytest.fixture(scope="session")
def fresh_world(tmp_path_factory):
    from pipeline.training.world import synth

    out = tmp_path_factory.mktemp("fresh-world")
    synth(out, FRESH_CLIPS, seed=FRESH_SEED, splits=["heldout", "unseen"])
    return out


@pytest.fixture(scope="session")
def hf_report(fresh_world, tmp_path_factory):
    from pipeline.training.world import evaluate

    answers = tmp_path_factory.mktemp("hf-answers") / "answers.jsonl"
    return evaluate(str(world_model_dir()), fresh_world, engine="hf", device="cpu", answers_out=answers), answers


def test_shipped_model_understands_fresh_heldout_clips_hf(hf_report):
    report, answers_file = hf_report
    assert report["clips"] == 2 * FRESH_CLIPS and not report["skipped"]
    acc = report["splits"]["heldout"]["accuracy"]
    for q, floor in FLOORS.items():
        assert acc[q] >= floor, (q, acc)
    # answers differ by question and follow the clip, not a fixed string
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    by_q: dict[str, set[str]] = {}
    per_clip: dict[str, set[str]] = {}
    for a in answers:
        by_q.setdefault(a["qtype"], set()).add(a["answer"])
        per_clip.setdefault(a["uri"], set()).add(a["answer"])
    assert len(by_q["direction"]) == 4 and len(by_q["colour"] & set(COLOURS)) >= 3 and len(by_q["size"]) == 2
    assert all(len(v) >= 4 for v in per_clip.values())  # five questions, at least four different answers
    assert "unseen" in report["splits"]  # reported apart, no goal


def test_shipped_model_meets_the_goals_in_vllm_with_the_hf_answers(fresh_world, hf_report, tmp_path):
    import vllm  # noqa: F401 — a missing vLLM fails the test instead of skipping it

    from pipeline.training.world import evaluate

    report = evaluate(str(world_model_dir()), fresh_world, engine="vllm", device="cpu", dtype="float32",
                      answers_out=tmp_path / "answers.jsonl")
    acc = report["splits"]["heldout"]["accuracy"]
    for q, floor in FLOORS.items():
        assert acc[q] >= floor, (q, acc)
    hf_answers = [json.loads(line)["answer"] for line in hf_report[1].read_text().splitlines()]
    vllm_answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert vllm_answers == hf_answers
