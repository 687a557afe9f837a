"""Where the project follows the original ST-LLM (commit ae45258), each checked against values computed by
hand from the original's own rules: frame sampling, the BT-Adapter's LayerNorm eps, the prompt presets of its
scripts, its decoding, and a short video's token count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stllm.engine import GenerationOptions, VideoRequest, decoding_preset
from stllm.frame_sampling import frame_indices, midpoint_indices, original_indices, residual_index
from stllm.prompts import DEFAULT_SYSTEM_PROMPT, MVBENCH_SYSTEM_PROMPT, PRESETS, prompt_format
from stllm.tiny import build_tiny_model
from tests.tiny_fixtures import synthetic_frames

# ---- frame sampling ------------------------------------------------------------------------------------


def test_original_sampling_by_hand():
    # get_seq_frames: seg = (n-1)/T', index = (round(seg·i) + round(seg·(i+1))) // 2, numpy round half to even.
    # n=24, T=8: seg 2.875 → ends 0, 3, 6, 9, 12 (11.5 → 12), 14, 17, 20, 23
    assert original_indices(24, 8) == [1, 4, 7, 10, 13, 15, 18, 21]
    # n=10, T=4: seg 2.25 → ends 0, 2, 4 (4.5 → 4), 7, 9
    assert original_indices(10, 4) == [1, 3, 5, 8]
    # shorter than T: min(n, T) = 3 frames, seg 2/3 → ends 0, 1, 1, 2 → [0, 1, 1] (not 0, 1, 2)
    assert original_indices(3, 8) == [0, 1, 1]
    assert original_indices(1, 64) == [0]
    for bad in [(0, 4), (5, 0)]:
        with pytest.raises(ValueError):
            original_indices(*bad)


def test_midpoint_rule_is_the_residual_index_by_hand():
    # get_residual_index: int(seg/2 + round(seg·i)), seg = T/R
    assert midpoint_indices(10, 4) == [1, 3, 6, 9]  # seg 2.5: 1.25 + 0, 2 (2.5 → 2), 5, 8 (7.5 → 8)
    assert residual_index(64, 16) == list(range(2, 64, 4))  # the released conversation weights' residual_index
    assert residual_index(5, 4) == [0, 1, 2, 4]  # seg 1.25: 0.625 + 0, 1, 2 (2.5 → 2), 4 (3.75 → 4)
    assert midpoint_indices(3, 8) == [0, 0, 1, 1, 2, 2, 2, 2]  # always T; the last one clipped
    assert frame_indices(24, 8, "midpoint") == [1, 4, 7, 10, 13, 16, 19, 22]


def test_the_two_rules_differ_where_the_issue_says():
    ours, original = midpoint_indices(300, 64), original_indices(300, 64)
    assert sum(a != b for a, b in zip(ours, original, strict=True)) == 31  # 31 of 64 indices differ


@pytest.fixture(scope="module")
def residual_model():
    return build_tiny_model(seed=3, video_input="residual")[:2]


def test_a_short_video_gives_fewer_frames_and_an_unweighted_mean(residual_model):
    model, processor = residual_model
    clip = synthetic_frames(5, t=5)  # 5 frames, fewer than the checkpoint's 8
    sampled = processor.sample(clip)
    assert sampled.shape[0] == 5  # original rule: min(5, 8) = 5 frames, no padding to 8
    np.testing.assert_array_equal(sampled, clip[original_indices(5, 8)])
    q = processor.process_question("What happens?")
    with torch.no_grad():
        frame_tokens = model.get_frame_tokens(model.get_vision_features(processor.pixel_values(sampled)),
                                              q.qformer_input_ids)
        tokens = model.get_video_tokens(frame_tokens)
        g = frame_tokens.mean(0)  # the unweighted mean over the 5 frames (no repeated frames to weigh)
        g = model.global_up_proj(torch.relu(model.global_down_proj(g)))
        expected = torch.cat([frame_tokens[i] + g for i in [0, 1, 2, 4]])  # residual_index(5, 4) by hand
    torch.testing.assert_close(tokens, expected)
    assert model.config.num_visual_tokens(5) == 4 * 32


def test_all_mode_token_count_follows_the_frame_count():
    model, processor = build_tiny_model(seed=2, video_input="all")[:2]
    q = processor.process_question("What happens?")
    with torch.no_grad():
        tokens = model.embed_video(processor.pixel_values(processor.sample(synthetic_frames(1, t=3))),
                                   q.qformer_input_ids)
    assert tokens.shape[0] == 3 * 32 == model.config.num_visual_tokens(3)  # 3 frames → 96 tokens, not 8·32


def test_engine_samples_raw_clips_and_keeps_sampled_ones(hf_engine):
    raw = synthetic_frames(9, t=3)
    opts = GenerationOptions(max_new_tokens=4)
    a, b, c = hf_engine.generate([
        VideoRequest("raw", raw, ["What moves?"]),  # the engine samples: frames [0, 1, 1]
        VideoRequest("pre", raw[[0, 1, 1]], ["What moves?"], sampled=True),  # the decode stage's output
        VideoRequest("as-is", raw, ["What moves?"], sampled=True),  # frames [0, 1, 2], taken as given
    ], opts)
    assert a.answers[0].token_ids == b.answers[0].token_ids
    np.testing.assert_array_equal(a.visual_embedding, b.visual_embedding)
    assert not np.allclose(a.visual_embedding, c.visual_embedding)


# ---- BT-Adapter LayerNorm eps --------------------------------------------------------------------------


def test_btadapter_layer_norm_eps_is_the_originals():
    model = build_tiny_model(seed=4, video_input="all", btadapter_depth=1)[0].double()
    spatial, temporal = model.btadapter.spatial[0], model.btadapter.temporal[0]
    assert spatial.layer_norm1.eps == spatial.layer_norm2.eps == 1e-5  # Block(norm_layer=nn.LayerNorm)
    assert temporal.layer_norm1.eps == 1e-6  # partial(nn.LayerNorm, eps=1e-6)
    assert model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6  # EVA blocks
    assert model.vision_model.post_layernorm.eps == 1e-5  # ln_vision
    # By hand, in float64, on features with a variance near eps (where the eps decides the output):
    x = torch.randn(2, 7, spatial.layer_norm1.normalized_shape[0], dtype=torch.float64) * 3e-3
    w, b = spatial.layer_norm1.weight, spatial.layer_norm1.bias

    def by_hand(eps: float) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * w + b

    with torch.no_grad():
        out = spatial.layer_norm1(x)
        torch.testing.assert_close(out, by_hand(1e-5), rtol=0, atol=1e-12)
        assert (out - by_hand(1e-6)).abs().max() > 0.05  # the old eps would have been visibly wrong


# ---- prompt presets and decoding -------------------------------------------------------------------------


def test_prompt_presets_render_as_the_original_scripts(hf_engine):
    p, q = hf_engine.processor, "Is it raining?"
    # Chat.answer / ActivityNet / VCGBench: system + "###Human: q ###Assistant: "
    assert p.prompt_text(q) == DEFAULT_SYSTEM_PROMPT + "###Human: Is it raining? ###Assistant: "
    # MSVD/MSRVTT-QA: system=False
    assert p.prompt_text(q, PRESETS["qa"]) == "###Human: Is it raining? ###Assistant: "
    # MVBench (infer_mvbench, ask_simple): system inside the human turn, suffix, answer prefix
    assert p.prompt_text(q, PRESETS["mvbench"]) == (
        "###Human: " + MVBENCH_SYSTEM_PROMPT + "Is it raining?\nOnly give the best option.\n"
        "###Assistant: Best option:(")
    for fmt in PRESETS.values():
        ids = p.prompt_ids(q, fmt)
        assert ids[0] == 2 and p.tokenizer.decode(ids[1:]) == p.prompt_text(q, fmt)
    custom = prompt_format("qa", system="Watch closely.\n", answer_prefix="Answer:")
    assert p.prompt_text(q, custom) == "Watch closely.\n###Human: Is it raining? ###Assistant: Answer:"
    # MVBench keeps the first line and puts back the "(" that the prefix ended with
    ids = p.tokenizer("A) a dog\nBecause it barks.###", add_special_tokens=False)["input_ids"]
    assert p.decode_answer(ids, PRESETS["mvbench"]) == "(A) a dog"
    with pytest.raises(ValueError, match="preset"):
        prompt_format("vqa")
    with pytest.raises(ValueError, match="question"):
        type(PRESETS["qa"])(template="no placeholder")


def test_repetition_penalty_and_decoding_presets():
    assert GenerationOptions().repetition_penalty_for(1.5) == 1.5  # the checkpoint's default
    assert GenerationOptions(prompt=PRESETS["mvbench"]).repetition_penalty_for(1.5) == 1.0  # MVBench's
    assert GenerationOptions(prompt=PRESETS["mvbench"], repetition_penalty=1.2).repetition_penalty_for(1.5) == 1.2
    original = decoding_preset("original")
    assert (original.num_beams, original.max_new_tokens, original.do_sample) == (5, 300, False)
    assert decoding_preset("original", max_new_tokens=20).max_new_tokens == 20
    assert decoding_preset("greedy").num_beams == 1


def test_engine_sends_the_preset_prompt(hf_engine):
    """The engine's answer equals generation from embeddings built by hand with the QA preset's prompt."""
    model, p = hf_engine.model, hf_engine.processor
    frames = synthetic_frames(11, t=8)
    opts = GenerationOptions(max_new_tokens=6, prompt=PRESETS["qa"])
    [res] = hf_engine.generate([VideoRequest("v", frames, ["What moves?"], sampled=True)], opts)
    pq = p.process_question("What moves?", PRESETS["qa"])
    with torch.no_grad():
        tokens = model.embed_video(p.pixel_values(frames), pq.qformer_input_ids, pq.qformer_attention_mask)
        embeds, mask = model.build_inputs_embeds([tokens], [pq.input_ids])
        out = model.generate_from_embeds(embeds, mask, hf_engine.generation_config(opts), tokenizer=p.tokenizer)
    assert res.answers[0].token_ids == [t for t in out[0].tolist() if t != model.config.text_config.pad_token_id]
    [conv] = hf_engine.generate([VideoRequest("v", frames, ["What moves?"], sampled=True)],
                                GenerationOptions(max_new_tokens=6))
    assert pq.input_ids != p.prompt_ids("What moves?")


def test_eos_is_never_the_first_token():
    """min_length=1 as the original: a model that wants EOS at once still says something first."""
    from stllm.hf_engine import HFEngine

    model, processor, _ = build_tiny_model(seed=5, video_input="mean")
    engine = HFEngine(model, processor)
    req, opts = VideoRequest("v", synthetic_frames(1), ["Why?"]), GenerationOptions(max_new_tokens=5)
    first = engine.generate([req], opts)[0].answers[0].token_ids[0]
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():  # EOS now outscores the token the model picks first
        model.language_model.lm_head.weight[eos] = model.language_model.lm_head.weight[first] * 1.01
    ids = engine.generate([req], opts)[0].answers[0].token_ids
    assert ids[0] == first != eos
    # Control: without the minimum, generation would have stopped at once.
    cfg = engine.generation_config(opts)
    cfg.min_new_tokens = 0
    pq = processor.process_question("Why?")
    with torch.no_grad():
        tokens = model.embed_video(processor.pixel_values(processor.sample(req.frames)), pq.qformer_input_ids)
        embeds, mask = model.build_inputs_embeds([tokens], [pq.input_ids])
        out = model.generate_from_embeds(embeds, mask, cfg, tokenizer=processor.tokenizer)
    assert out[0, 0].item() == eos
