"""The training objective: dynamic masking shortens the sequence; MVM + LM losses are finite and trainable."""

from __future__ import annotations

import torch

from stllm.tiny import build_tiny_model
from stllm.training import keep_index, sample_mask_ratio, training_loss
from tests.tiny_fixtures import synthetic_frames


def test_mask_ratio_distribution_is_clipped():
    g = torch.Generator().manual_seed(0)
    ratios = [sample_mask_ratio(g) for _ in range(2000)]
    assert min(ratios) >= 0.1 and max(ratios) <= 0.7
    assert abs(sum(ratios) / len(ratios) - 0.5) < 0.01
    idx = keep_index(128, 0.5, 3, torch.Generator().manual_seed(1))
    assert idx.shape == (3, 64) and bool((idx.diff(dim=1) > 0).all())  # sorted, unique, time order kept


def test_training_step_reduces_loss():
    model, proc, _ = build_tiny_model(seed=2, video_input="residual")
    model.train()
    pv = proc.pixel_values(proc.sample(synthetic_frames(0)))
    pq = proc.process_question("What happens?")
    answer = proc.tokenizer("A man cooks.", add_special_tokens=False)["input_ids"] + [2]
    params = [p for n, p in model.named_parameters() if not n.startswith("vision_model")]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(6):
        tokens = model.embed_video(pv, pq.qformer_input_ids)[None]
        out = training_loss(model, tokens, [pq.input_ids], [answer], mask_ratio=0.5,
                            generator=torch.Generator().manual_seed(step))
        assert out.kept_tokens == tokens.shape[1] - tokens.shape[1] // 2
        assert out.mvm_loss is not None and 0 <= out.mvm_loss.item() <= 4
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert model.mvm_decoder.head.weight.grad is not None
    assert losses[-1] < losses[0]
