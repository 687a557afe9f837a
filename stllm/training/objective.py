"""ST-LLM's fine-tuning objective: dynamic video-token masking + masked video modeling (MVM) + LM loss.

Per batch a mask ratio r ~ Normal(0.5, 0.1), clipped to [0.1, 0.7]; that fraction of the L visual tokens is
DROPPED (the sequence gets shorter). MVM: the unmasked sequence runs through the LLM without gradient; the
last hidden states at the kept visual positions of both runs are compared after the masked run's pass
through `mvm_decoder`: loss = mean(2 − 2·cos). Total = LM loss on the answer + MVM loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stllm.modeling_stllm import STLLMForConditionalGeneration


@dataclass
class TrainingLoss:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    mvm_loss: torch.Tensor | None
    mask_ratio: float
    kept_tokens: int


def sample_mask_ratio(generator: torch.Generator | None = None) -> float:
    r = 0.5 + 0.1 * torch.randn((), generator=generator).item()
    return float(min(max(r, 0.1), 0.7))


def keep_index(num_tokens: int, ratio: float, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K) sorted indices of the visual tokens that survive (K = L − int(L·ratio)), random per sample."""
    keep = num_tokens - int(num_tokens * ratio)
    scores = torch.rand(batch, num_tokens, generator=generator)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def _sequence(model, visual: torch.Tensor, prompt: list[int], answer: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    embed = model.language_model.get_input_embeddings()
    ids = torch.tensor(prompt + answer, device=visual.device)
    seq = torch.cat([visual, embed(ids)], dim=0)
    labels = torch.full((seq.shape[0],), -100, dtype=torch.long, device=visual.device)
    labels[visual.shape[0] + len(prompt) :] = torch.tensor(answer, device=visual.device)
    return seq, labels


def _run(model, visual: torch.Tensor, prompts: list[list[int]], answers: list[list[int]]):
    """Right-padded batch (as the original trains) → (last hidden states after the final norm, labels)."""
    seqs = [_sequence(model, v, p, a) for v, p, a in zip(visual, prompts, answers, strict=True)]
    length = max(s.shape[0] for s, _ in seqs)
    b, d = len(seqs), visual.shape[-1]
    x = visual.new_zeros(b, length, d)
    labels = torch.full((b, length), -100, dtype=torch.long, device=visual.device)
    mask = torch.zeros(b, length, dtype=torch.long, device=visual.device)
    for i, (s, lab) in enumerate(seqs):
        x[i, : s.shape[0]], labels[i, : s.shape[0]], mask[i, : s.shape[0]] = s, lab, 1
    hidden = model.language_model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    return hidden, labels


def training_loss(
    model: STLLMForConditionalGeneration,
    video_tokens: torch.Tensor,
    prompt_ids: list[list[int]],
    answer_ids: list[list[int]],
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
    mvm: bool = True,
) -> TrainingLoss:
    """video_tokens (B, L, D) from `get_video_tokens`; answers should end with the eos id (2). `mvm=False` (or a
    model without `mvm_decoder`) leaves the MVM term out; `mask_ratio=0` keeps every visual token."""
    b, length, d = video_tokens.shape
    ratio = sample_mask_ratio(generator) if mask_ratio is None else mask_ratio
    keep = keep_index(length, ratio, b, generator).to(video_tokens.device)  # (B, K)
    masked = torch.gather(video_tokens, 1, keep[..., None].expand(-1, -1, d))  # (B, K, D)
    hidden, labels = _run(model, masked, prompt_ids, answer_ids)
    logits = model.language_model.lm_head(hidden)
    lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    mvm_loss = None
    if mvm and model.mvm_decoder is not None:
        with torch.no_grad():
            full, _ = _run(model, video_tokens, prompt_ids, answer_ids)
            target = torch.gather(full[:, :length], 1, keep[..., None].expand(-1, -1, d))
        pred = model.mvm_decoder(hidden[:, : keep.shape[1]])
        cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)
        mvm_loss = (2 - 2 * cos).mean()
    total = lm_loss + (mvm_loss if mvm_loss is not None else 0)
    return TrainingLoss(total, lm_loss, mvm_loss, ratio, keep.shape[1])
