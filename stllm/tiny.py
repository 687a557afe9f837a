"""A deterministic tiny RANDOM ST-LLM (`model.path: tiny`) for tests and smoke runs, in the project's format.

`build_tiny(dst)` writes what `stllm-index convert` writes (safetensors + config + both tokenizers + the
weights hash). Sizes keep LLaMA head_dim 64, which vLLM's CPU kernels serve (16 is refused).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from stllm.configuration_stllm import STLLMConfig
from stllm.loading import save_model_folder
from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor
from stllm.prompts import DEFAULT_SYSTEM_PROMPT
from stllm.tokenizers import (
    build_qformer_tokenizer,
    load_llama_tokenizer,
    train_sentencepiece,
    write_sentencepiece_tokenizer,
)

# Bump when the builder's output changes, so cached demo models are rebuilt.
TINY_VERSION = 3

# Text the tiny sentencepiece model is trained on: the prompt format plus everyday video words.
_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    "###Human: Describe the video in detail. ###Assistant: A man is cooking food in a kitchen.###",
    "###Human: What is happening in the video? ###Assistant: Two people are talking on a stage.###",
    "###Human: How many people are there? ###Assistant: There are 3 people walking in the park.###",
    "a car drives down a road at night, a dog runs after a ball, a monkey climbs a tree",
    "the quick brown fox jumps over the lazy dog while the camera pans left and right",
    "Is there any text on screen? What colour is the sky? Where does the video take place?",
    "red green blue yellow white black indoor outdoor city street water sports music game",
]


def train_tiny_sentencepiece(vocab_size: int = 400) -> bytes:
    return train_sentencepiece(_CORPUS * 3, vocab_size)


def tiny_config(vocab_size: int, video_input: str = "residual", btadapter_depth: int = 0, image_size: int = 224,
                patch_size: int = 14, **overrides) -> STLLMConfig:
    """The tiny architecture; `image_size`/`patch_size` set the ViT's input and the processor's together (small
    frames, e.g. 64×64 patch 8, for a model trained on the synthetic world)."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    vision = dict(hidden_size=176, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-6, initializer_range=0.02)
    qformer = dict(vocab_size=30523, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=256, cross_attention_frequency=2, max_position_embeddings=512)
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=2, eos_token_id=2, pad_token_id=vocab_size - 1, tie_word_embeddings=False)
    kwargs = dict(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                  video_input=video_input, residual_size=4, residual_hidden_size=32, num_frames=8,
                  btadapter_depth=btadapter_depth, btadapter_max_frames=64, image_size=image_size)
    kwargs.update(overrides)
    return STLLMConfig(**kwargs)


def build_tiny_model(
    seed: int = 0, video_input: str = "residual", btadapter_depth: int = 0, **overrides
) -> tuple[STLLMForConditionalGeneration, STLLMProcessor, bytes]:
    """Deterministic tiny random model + processor (+ the sentencepiece proto its tokenizer came from)."""
    proto = train_tiny_sentencepiece()
    with tempfile.TemporaryDirectory() as tmp:
        write_sentencepiece_tokenizer(tmp, proto)
        tokenizer = load_llama_tokenizer(tmp)
    config = tiny_config(len(tokenizer), video_input=video_input, btadapter_depth=btadapter_depth, **overrides)
    torch.manual_seed(seed)
    model = STLLMForConditionalGeneration(config)
    # Random (not zero) global MLP and BT-Adapter outputs, so tests exercise every path.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "global_up_proj" in name or "temporal_fc" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
        # Readable noise for the demo: byte-fallback pieces never win (zero logits) while word pieces get
        # large ones; otherwise random weights mostly emit invalid UTF-8 bytes.
        head = model.language_model.lm_head.weight
        for tid, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if piece.startswith("<0x") or piece in ("<unk>", "<s>", "[PAD]"):
                head[tid] = 0
            elif tid != tokenizer.eos_token_id:
                head[tid] *= 4
    model.eval()
    processor = STLLMProcessor(config, tokenizer, build_qformer_tokenizer())
    return model, processor, proto


def build_tiny(dst: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Write a tiny model in the project's format (safetensors + config + both tokenizers)."""
    model, processor, _ = build_tiny_model(seed=seed, **kwargs)
    return save_model_folder(model, processor, dst)
