"""The ORIGINAL released layout, for conversion tests: the inverse of `stllm.convert`'s key mapping and a
tiny checkpoint written the way the released folders are (HF-trainer `pytorch_model-*.bin` shards with
`model.stllm_model.*` keys, the LLaMA-only config.json, a sentencepiece tokenizer.model)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from stllm.convert import P, map_original_key
from stllm.frame_sampling import residual_index
from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.tiny import build_tiny_model
from stllm.tokenizers import write_sentencepiece_tokenizer


def to_original_state_dict(model: STLLMForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The inverse mapping, with the aliases and buffers the released shards carry."""
    sd = model.state_dict()
    inverse: dict[str, str] = {}
    probe = {}
    # Build the inverse by mapping every plausible original name once (keeps one mapping table).
    for name in _original_names(model):
        new = map_original_key(name)
        if new is not None:
            probe[new] = name
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("self_attn.qkv.bias"):
            orig_w = probe[key[: -len("bias")] + "weight"]
            base = orig_w[: -len(".qkv.weight")]
            q, _, v = value.chunk(3)
            out[base + ".q_bias"], out[base + ".v_bias"] = q.clone(), v.clone()
            continue
        if key not in probe:
            raise KeyError(f"no original name for {key}")
        inverse[key] = probe[key]
        out[probe[key]] = value
    out[P + "embed_tokens.weight"] = out["model.embed_tokens.weight"]  # the alias the shards keep
    out[P + "Qformer.bert.embeddings.position_ids"] = torch.arange(
        model.config.qformer_config.max_position_embeddings
    )[None]
    if model.config.video_input == "residual":
        out[P + "residual_index"] = torch.tensor(residual_index(model.config.num_frames, model.config.residual_size))
    return out


def _original_names(model: STLLMForConditionalGeneration) -> Iterable[str]:
    c = model.config
    yield from ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    for i in range(c.text_config.num_hidden_layers):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{n}.weight"
    v = P + "visual_encoder."
    yield from (v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "patch_embed.proj.bias")
    yield from (v + "BTAdapter_cls", v + "BTAdapter_position.weight")
    blocks = [("blocks", c.vision_config.num_hidden_layers), ("BTAdapter_S", c.btadapter_depth),
              ("BTAdapter_T", c.btadapter_depth)]
    for group, n in blocks:
        for i in range(n):
            for s in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2", "temporal_fc"):
                yield from (f"{v}{group}.{i}.{s}.weight", f"{v}{group}.{i}.{s}.bias")
            yield f"{v}{group}.{i}.attn.qkv.weight"
    for s in ("ln_vision", "llama_proj", "down_proj", "up_proj", "mvm_decoder.head", "mvm_decoder.norm"):
        yield from (f"{P}{s}.weight", f"{P}{s}.bias")
    yield P + "query_tokens"
    q = P + "Qformer.bert."
    for s in ("word_embeddings", "position_embeddings"):
        yield f"{q}embeddings.{s}.weight"
    yield from (f"{q}embeddings.LayerNorm.weight", f"{q}embeddings.LayerNorm.bias")
    for i in range(c.qformer_config.num_hidden_layers):
        subs = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
                "intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
        subs += [s.replace("attention.", "crossattention.", 1) for s in subs[:5]]
        for s in subs:
            yield from (f"{q}encoder.layer.{i}.{s}.weight", f"{q}encoder.layer.{i}.{s}.bias")


def build_tiny_original(
    dst: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16, num_shards: int = 2, **kwargs
) -> tuple[Path, STLLMForConditionalGeneration]:
    """Write a tiny model in the released layout; returns the folder and the model it was made from."""
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
