"""The language stage of the world model's recipe: the LLM learns the world's language from text alone.

The stand-in for Vicuna's pretraining, as stage 1 (`stllm.world.pretrain`) stands in for EVA-CLIP/BLIP-2's. It
runs after stage 2a (the direction question alone, which a fresh LLM learns faster;
`pipeline.training.world_model`): the LLM is trained on the world's transcripts — the training prompt with each
question and a true answer, no visual tokens — with the same loss as stage 2 (labels on the answer + `</s>`).
Without a video the
answer is unknowable, so what it learns is the question: "What colour …" is answered by a colour word,
"What shape …" by a shape, and so on. Why it is needed (measured on the model shipped before it): an LLM
trained from scratch on videos never learned to read the question word — "What colour is the object?" and
"What shape is the object?" gave the same answer distribution to three decimals, held-out colour 0.48 and shape
0.52, and the embeddings of "colour" and "shape" had barely moved from their init: attention never looked at
them, so no gradient taught them.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor
from stllm.training.objective import training_loss
from stllm.training.trainer import TRAIN_PROMPT, apply_freeze
from stllm.world.scenes import CAPTION_PROMPT, COLOURS, DIRECTIONS, QUESTIONS, SHAPES, SIZES, SPEEDS, Scene


class LanguageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    seed: int = 0
    log_every: int = Field(default=50, ge=1)


def world_transcripts() -> list[tuple[str, str]]:
    """Every (question, true answer) of the world: each question type with each of its answers, and the caption
    of every attribute combination (language, not video: the unseen pairs' words are in it too)."""
    pairs = [(QUESTIONS["colour"], c) for c in COLOURS] + [(QUESTIONS["shape"], s) for s in SHAPES]
    pairs += [(QUESTIONS["size"], s) for s in SIZES] + [(QUESTIONS["direction"], d) for d in DIRECTIONS]
    for size, colour, shape, direction, speed in itertools.product(SIZES, COLOURS, SHAPES, DIRECTIONS, SPEEDS):
        scene = Scene(clip_id="", split="train", shape=shape, colour=colour, size=size, direction=direction,
                      speed=speed, center=(0.5, 0.5), background=(0, 0, 0))
        pairs.append((CAPTION_PROMPT, scene.caption()))
    return pairs


def pretrain_language(model: STLLMForConditionalGeneration, processor: STLLMProcessor, config: LanguageConfig,
                      log: Path | None = None) -> dict[str, Any]:
    """Train the LLM (and only it) on `world_transcripts`; each question type is drawn equally often."""
    from transformers import get_cosine_schedule_with_warmup

    apply_freeze(model, ["vision", "qformer", "projection", "global_local", "mvm_decoder", "btadapter"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    pairs = world_transcripts()
    by_question: dict[str, list[tuple[list[int], list[int]]]] = {}
    eos = processor.tokenizer.eos_token_id
    for question, answer in pairs:
        answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        by_question.setdefault(question, []).append((processor.prompt_ids(question, TRAIN_PROMPT), answer_ids))
    questions = sorted(by_question)
    rng = np.random.default_rng([config.seed, 23])
    dim = model.config.text_config.hidden_size
    model.train()
    t0, last = time.perf_counter(), {}
    for step in range(1, config.steps + 1):
        batch = []
        for q in rng.integers(len(questions), size=config.batch_size):
            options = by_question[questions[q]]
            batch.append(options[int(rng.integers(len(options)))])
        no_video = torch.zeros(config.batch_size, 0, dim)
        out = training_loss(model, no_video, [p for p, _ in batch], [a for _, a in batch], mask_ratio=0.0, mvm=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        last = {"step": step, "loss": round(out.loss.item(), 5),
                "samples_per_s": round(step * config.batch_size / (time.perf_counter() - t0), 1)}
        if log is not None and (step % config.log_every == 0 or step == config.steps):
            with open(log, "a") as f:
                f.write(json.dumps(last) + "\n")
    apply_freeze(model, [])
    model.eval()
    return last


@torch.no_grad()
def answer_type_mass(model: STLLMForConditionalGeneration, processor: STLLMProcessor) -> dict[str, float]:
    """Per question type, the probability mass the LLM (no video) puts on that type's answer words as its first
    answer token: ~1 once it reads the question, ~ the type's share of the vocabulary's use before."""
    words = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "direction": DIRECTIONS}
    out = {}
    for qtype, choices in words.items():
        ids = torch.tensor([processor.prompt_ids(QUESTIONS[qtype], TRAIN_PROMPT)])
        probs = model.language_model(input_ids=ids).logits[0, -1].softmax(-1)
        first = {processor.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in choices}
        out[qtype] = round(float(probs[sorted(first)].sum()), 4)
    return out


__all__ = ["LanguageConfig", "answer_type_mass", "pretrain_language", "world_transcripts"]
