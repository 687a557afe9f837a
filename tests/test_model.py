"""The model itself: token counts per video-input mode, global-local by hand, BT-Adapter, padding, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stllm.configuration_stllm import STLLMConfig
from stllm.tiny import build_tiny_model
from tests.tiny_fixtures import synthetic_frames


@pytest.fixture(scope="module")
def models():
    return {mode: build_tiny_model(seed=3, video_input=mode)[:2] for mode in ("all", "mean", "residual")}


def _inputs(processor, frames, question="What happens in the video?"):
    pq = processor.process_question(question)
    return processor.pixel_values(processor.sample(frames)), pq


@pytest.mark.parametrize("mode, expected", [("all", 8 * 32), ("mean", 32), ("residual", 4 * 32)])
def test_token_counts_per_mode(models, mode, expected):
    model, processor = models[mode]
    pv, pq = _inputs(processor, synthetic_frames(1))
    with torch.no_grad():
        tokens = model.embed_video(pv, pq.qformer_input_ids, pq.qformer_attention_mask)
    assert tokens.shape == (expected, model.config.text_config.hidden_size)
    assert model.config.num_visual_tokens() == expected


def test_frame_tokens_shape_and_question_dependence(models):
    model, processor = models["all"]
    pv, pq = _inputs(processor, synthetic_frames(2))
    _, pq2 = _inputs(processor, synthetic_frames(2), "Is there a dog?")
    with torch.no_grad():
        feats = model.get_vision_features(pv)
        a = model.get_frame_tokens(feats, pq.qformer_input_ids, pq.qformer_attention_mask)
        b = model.get_frame_tokens(feats, pq2.qformer_input_ids, pq2.qformer_attention_mask)
    assert feats.shape == (8, 257, model.config.vision_config.hidden_size)
    assert a.shape == (8, 32, model.config.text_config.hidden_size)
    # The Q-Former reads the question, so the visual tokens depend on it; the ViT features do not.
    assert not torch.allclose(a, b)


def test_all_mode_keeps_time_order(models):
    model, processor = models["all"]
    pv, pq = _inputs(processor, synthetic_frames(4))
    with torch.no_grad():
        frame_tokens = model.get_frame_tokens(model.get_vision_features(pv), pq.qformer_input_ids)
        tokens = model.get_video_tokens(frame_tokens)
    torch.testing.assert_close(tokens[32:64], frame_tokens[1], rtol=0, atol=0)


def test_global_local_equals_hand_computation(models):
    model, processor = models["residual"]
    pv, pq = _inputs(processor, synthetic_frames(5))
    with torch.no_grad():
        frame_tokens = model.get_frame_tokens(model.get_vision_features(pv), pq.qformer_input_ids)
        tokens = model.get_video_tokens(frame_tokens)
        t, r = frame_tokens.shape[0], model.config.residual_size
        seg = t / r
        local_index = [int(seg / 2 + np.round(seg * i)) for i in range(r)]  # [1, 3, 5, 7] for T=8, R=4
        assert local_index == [1, 3, 5, 7]
        g = frame_tokens.mean(0)
        w1, b1 = model.global_down_proj.weight, model.global_down_proj.bias
        w2, b2 = model.global_up_proj.weight, model.global_up_proj.bias
        g = torch.relu(g @ w1.T + b1) @ w2.T + b2
        expected = torch.cat([frame_tokens[i] + g for i in local_index])
    torch.testing.assert_close(tokens, expected)
    assert model.global_up_proj.weight.abs().sum() > 0  # the global branch really contributes here


def test_btadapter_mixes_time_and_plain_vit_does_not():
    plain, proc = build_tiny_model(seed=7, video_input="all")[:2]
    bt, _ = build_tiny_model(seed=7, video_input="all", btadapter_depth=1)[:2]
    pv = proc.pixel_values(proc.sample(synthetic_frames(6)))
    shuffled = pv.clone()
    shuffled[1:] = pv[1:].flip(0)  # frame 0 unchanged, the others reordered
    with torch.no_grad():
        p0, p1 = plain.get_vision_features(pv), plain.get_vision_features(shuffled)
        b0, b1 = bt.get_vision_features(pv), bt.get_vision_features(shuffled)
    torch.testing.assert_close(p0[0], p1[0])  # per-frame ViT: frame 0 ignores the others
    assert not torch.allclose(b0[0], b1[0], atol=1e-5)  # temporal branch: frame 0 sees the others
    assert b0.shape == p0.shape


def test_padding_is_masked_in_batches(models):
    model, processor = models["residual"]
    pv, _ = _inputs(processor, synthetic_frames(8))
    questions = ["Hi?", "Describe the video in detail, including every object and colour you see."]
    singles, tokens, ids = [], [], []
    with torch.no_grad():
        feats = model.get_vision_features(pv)
        for q in questions:
            pq = processor.process_question(q)
            vt = model.get_video_tokens(model.get_frame_tokens(feats, pq.qformer_input_ids))
            tokens.append(vt)
            ids.append(pq.input_ids)
            e, m = model.build_inputs_embeds([vt], [pq.input_ids])
            singles.append(model.language_model(inputs_embeds=e, attention_mask=m).logits[0, -1])
        e, m = model.build_inputs_embeds(tokens, ids)
        assert (m[0] == 0).sum() == len(ids[1]) - len(ids[0])  # the short prompt is left-padded
        batched = model.language_model(inputs_embeds=e, attention_mask=m).logits[:, -1]
    for i in range(2):
        torch.testing.assert_close(batched[i], singles[i], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_clear_errors(models):
    model, processor = models["all"]
    with pytest.raises(ValueError, match="zero frames"):
        processor.sample(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        processor.sample(np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        processor.sample(np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="mixed sizes"):
        processor.sample([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        processor.process_question("   ")
    with pytest.raises(ValueError, match="zero frames"):
        model.get_vision_features(torch.zeros(0, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        model.get_vision_features(torch.zeros(3, 224, 224))


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="video_input"):
        STLLMConfig(video_input="pooled")
    with pytest.raises(ValueError, match="residual_size"):
        STLLMConfig(video_input="residual", residual_size=65, num_frames=64)
    with pytest.raises(ValueError, match="BT-Adapter"):
        STLLMConfig(video_input="all", btadapter_depth=3, num_frames=96)
    with pytest.raises(ValueError, match="frame_sampling"):
        STLLMConfig(frame_sampling="uniform")
    with pytest.raises(ValueError, match="image_size=64 but vision_config.image_size=224"):
        STLLMConfig(image_size=64)


def test_save_and_load_round_trip(tmp_path, models):
    from stllm.loading import load_model

    model, processor = models["mean"]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = load_model(tmp_path, dtype="float32", device="cpu")
    assert loaded.config.video_input == "mean"
    assert proc2.prompt_ids("Hi?") == processor.prompt_ids("Hi?")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
