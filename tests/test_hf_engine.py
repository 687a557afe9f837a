"""The `hf` reference engine: batched generation, determinism, ViT once per video, per-request errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stllm import load_engine
from stllm.engine import GenerationOptions, VideoRequest
from stllm.transforms import resize_crop
from tests.tiny_fixtures import synthetic_frames

QUESTIONS = ["Describe the video in detail.", "What colour is it?", "How many objects move from left to right?"]


def _requests(n=3):
    return [VideoRequest(f"v{i}", synthetic_frames(10 + i, t=8 + 3 * i), QUESTIONS) for i in range(n)]


def test_greedy_is_deterministic_and_batch_equals_single(hf_engine):
    opts = GenerationOptions(max_new_tokens=12)
    hf_engine.max_batch_size = 16
    batched = hf_engine.generate(_requests(), opts)
    again = hf_engine.generate(_requests(), opts)
    assert [[a.token_ids for a in r.answers] for r in batched] == [[a.token_ids for a in r.answers] for r in again]
    # One pair at a time: no padding at all. Must equal the left-padded batch.
    hf_engine.max_batch_size = 1
    single = hf_engine.generate(_requests(), opts)
    hf_engine.max_batch_size = 8
    assert [[a.token_ids for a in r.answers] for r in batched] == [[a.token_ids for a in r.answers] for r in single]
    assert all(len(r.answers) == 3 and r.ok for r in batched)
    assert all(1 <= len(a.token_ids) <= 12 for r in batched for a in r.answers)


def test_one_vit_forward_per_video(hf_engine):
    before = hf_engine.vit_forwards
    hf_engine.generate(_requests(2), GenerationOptions(max_new_tokens=2))
    assert hf_engine.vit_forwards - before == 2  # 2 videos × 3 questions → 2 ViT passes


def test_visual_embedding_is_normalised_and_video_specific(hf_engine):
    res = hf_engine.generate(_requests(2), GenerationOptions(max_new_tokens=1))
    a, b = res[0].visual_embedding, res[1].visual_embedding
    assert a.shape == (hf_engine.model.config.vision_config.hidden_size,) and a.dtype == np.float32
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    assert not np.allclose(a, b)


def test_bad_requests_fail_alone(hf_engine):
    reqs = _requests(2)
    reqs.insert(1, VideoRequest("empty", np.zeros((0, 32, 32, 3), np.uint8), QUESTIONS))
    reqs.append(VideoRequest("float", np.zeros((4, 32, 32, 3), np.float32), QUESTIONS))
    reqs.append(VideoRequest("blank-question", synthetic_frames(1), ["  "]))
    res = hf_engine.generate(reqs, GenerationOptions(max_new_tokens=3))
    assert [r.ok for r in res] == [True, False, True, False, False]
    assert "zero frames" in res[1].error and "uint8" in res[3].error and "empty" in res[4].error
    assert res[1].answers == [] and len(res[2].answers) == 3


def test_prompt_past_max_length_is_an_error(hf_engine):
    limit = hf_engine.model.config.text_config.max_position_embeddings
    res = hf_engine.generate(_requests(1), GenerationOptions(max_new_tokens=limit))
    assert not res[0].ok and "exceeds" in res[0].error


def test_beam_and_sampling(hf_engine):
    reqs = _requests(1)
    beam = hf_engine.generate(reqs, GenerationOptions(max_new_tokens=6, num_beams=3))
    assert all(1 <= len(a.token_ids) <= 6 for a in beam[0].answers)
    s1 = hf_engine.generate(reqs, GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7))
    s2 = hf_engine.generate(reqs, GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7))
    greedy = hf_engine.generate(reqs, GenerationOptions(max_new_tokens=8))
    assert [a.token_ids for a in s1[0].answers] == [a.token_ids for a in s2[0].answers]  # seeded
    assert [a.token_ids for a in s1[0].answers] != [a.token_ids for a in greedy[0].answers]


def test_generation_config_carries_the_options(hf_engine):
    cfg = hf_engine.generation_config(GenerationOptions())
    assert cfg.repetition_penalty == 1.5  # the original's default on this path
    assert cfg.stop_strings == ["###"] and cfg.eos_token_id == 2 and not cfg.do_sample
    assert cfg.min_new_tokens == 1  # the original's min_length=1: EOS cannot come first
    cfg = hf_engine.generation_config(GenerationOptions(repetition_penalty=1.0, do_sample=True, top_p=0.5, top_k=4))
    assert cfg.repetition_penalty == 1.0 and cfg.do_sample and cfg.top_p == 0.5 and cfg.top_k == 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)


def test_load_engine_by_kind(tiny_dir):
    assert load_engine("hf", str(tiny_dir), device="cpu").kind == "hf"
    with pytest.raises(ValueError, match="engine"):
        load_engine("onnx", str(tiny_dir))


def test_processor_transform_and_prompt(hf_engine):
    p = hf_engine.processor
    frames = synthetic_frames(3, t=2, h=90, w=160)
    out = resize_crop(frames, 224)
    # By hand: shorter side 90 → 224, longer 160 → int(224·160/90) = 398, centre crop from left=87.
    img = Image.fromarray(frames[0]).resize((398, 224), Image.BICUBIC)
    np.testing.assert_array_equal(out[0], np.asarray(img)[:, 87:311])
    assert resize_crop(out, 224) is out  # already 224×224: untouched
    white = p.pixel_values(np.full((1, 224, 224, 3), 255, np.uint8))
    expected = (1 - np.array(p.config.image_mean)) / np.array(p.config.image_std)
    np.testing.assert_allclose(white[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    q_ids, q_mask = p.qformer_inputs("Is it raining?")
    assert q_ids[0, 0].item() == 101 and q_ids[0, -1].item() == 102  # [CLS] … [SEP]
    assert p.qformer_tokenizer.decode(q_ids[0, 1:-1]) == "is it raining?"
    long_ids, _ = p.qformer_inputs("word " * 400)
    assert long_ids.shape[1] == p.config.qformer_max_txt_len
    ids = p.tokenizer("A cat sleeps.###Human: next", add_special_tokens=False)["input_ids"]
    assert p.decode_answer(ids) == "A cat sleeps."
