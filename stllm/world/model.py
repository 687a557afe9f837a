"""The synthetic world's model, built the way the real one was but at toy scale.

`build_world_model` gives the untrained architecture: the tiny ST-LLM with 64×64 frames in 8×8 patches, a
sentencepiece tokenizer that knows the world's words (so "triangle" is one piece, not eight letters) and a 2-D
sin-cos init of the ViT's position embeddings (with the default std-0.02 init the ViT never learns shape in the
steps we can afford; sin-cos gives every patch its place from step 0). Training then follows the recipe:
`stllm.world.pretrain` (the vision tower on frames — the stand-in for EVA-CLIP/BLIP-2 pretraining), then
`stllm.training` (ST-LLM fine-tuning with vision and Q-Former frozen).
"""

from __future__ import annotations

import itertools
import tempfile

import torch

from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor
from stllm.prompts import DEFAULT_SYSTEM_PROMPT, prompt_format
from stllm.tiny import tiny_config
from stllm.tokenizers import (
    build_qformer_tokenizer,
    load_llama_tokenizer,
    train_sentencepiece,
    write_sentencepiece_tokenizer,
)
from stllm.world.scenes import CAPTION_PROMPT, COLOURS, DIRECTIONS, QUESTIONS, SHAPES, SIZES, SPEEDS

WORLD_IMAGE_SIZE, WORLD_PATCH_SIZE = 64, 8
# 4 LLaMA layers of 2 heads (head_dim 64, which vLLM's CPU kernels serve): with 2 layers the heads that compare
# frames (direction) and those that read the question and the content competed, and neither was learned.
WORLD_LLM_LAYERS = 4


def world_corpus() -> list[str]:
    """The text the world's tokenizer learns from: the prompt format, every question, every caption."""
    fmt = prompt_format("qa")
    lines = [DEFAULT_SYSTEM_PROMPT, fmt.render(CAPTION_PROMPT, "")]
    for size, colour, shape, direction, speed in itertools.product(SIZES, COLOURS, SHAPES, DIRECTIONS, SPEEDS):
        where = f"to the {direction}" if direction in ("left", "right") else direction
        caption = f"a {size} {colour} {shape} moves {speed} {where}"
        lines.append(fmt.render(CAPTION_PROMPT, "") + caption + "###")
    for question, answer in itertools.product(QUESTIONS.values(), [*COLOURS, *SHAPES, *SIZES, *DIRECTIONS]):
        lines.append(fmt.render(question, "") + answer + "###")
    return lines


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """(1 + grid², dim): a zero row for the class token, then 2-D sin-cos (half the channels for y, half x)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], 1)

    table = torch.cat([encode(ys), encode(xs)], 1)  # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def build_world_model(seed: int = 0, video_input: str = "residual", patch_size: int = WORLD_PATCH_SIZE
                      ) -> tuple[STLLMForConditionalGeneration, STLLMProcessor]:
    """The untrained world model (deterministic for `seed`) and its processor."""
    proto = train_sentencepiece(world_corpus(), vocab_size=450)
    with tempfile.TemporaryDirectory() as tmp:
        write_sentencepiece_tokenizer(tmp, proto)
        tokenizer = load_llama_tokenizer(tmp)
    config = tiny_config(len(tokenizer), video_input=video_input, image_size=WORLD_IMAGE_SIZE,
                         patch_size=patch_size)
    config.text_config.num_hidden_layers = WORLD_LLM_LAYERS
    torch.manual_seed(seed)
    model = STLLMForConditionalGeneration(config)
    with torch.no_grad():
        pos = model.vision_model.embeddings.position_embedding
        grid = WORLD_IMAGE_SIZE // patch_size
        pos.copy_(sincos_position_embedding(grid, pos.shape[-1]).reshape(pos.shape))  # unscaled, as MAE
    model.eval()
    return model, STLLMProcessor(config, tokenizer, build_qformer_tokenizer())


__all__ = ["WORLD_IMAGE_SIZE", "WORLD_PATCH_SIZE", "build_world_model",
           "sincos_position_embedding", "world_corpus"]
