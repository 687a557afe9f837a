"""Convert the released ST-LLM checkpoints (original naming) into the project's safetensors folder.

SRC: a folder of `pytorch_model-*.bin` shards (read with `torch.load(weights_only=True)` only) or
`*.safetensors` with keys `model.stllm_model.{visual_encoder,ln_vision,Qformer,query_tokens,llama_proj,
down_proj,up_proj,mvm_decoder}` plus the LLaMA's, the LLaMA-only `config.json` and the LLaMA tokenizer; or a
hub repo id (`farewellthree/ST_LLM_weight/conversation_weight`) downloaded with `huggingface_hub`.
Every vision / Q-Former / adapter size is inferred from tensor shapes and counts; options the tensors can't
show (video-input mode, residual size, frames) come from arguments with the released defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from stllm.configuration_stllm import STLLMConfig
from stllm.modeling_stllm import STLLMForConditionalGeneration

log = logging.getLogger(__name__)

P = "model.stllm_model."
# Derivable or aliased tensors that the released shards may hold; dropped on load (docs/model.md,
# "Numerics and weight names").
_IGNORED = re.compile(
    r"(\.rotary_emb\.inv_freq$|^model\.stllm_model\.embed_tokens\.weight$|^model\.stllm_model\.residual_index$"
    r"|^model\.stllm_model\.Qformer\.bert\.embeddings\.position_ids$)"
)
# EVA block names → InstructBLIP vision layer names (q_bias/v_bias are fused separately).
_EVA_BLOCK = [
    ("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.weight", "self_attn.qkv.weight"),
    ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("temporal_fc.", "temporal_fc."),
]
_STLLM_SIMPLE = {
    "ln_vision.": "vision_model.post_layernorm.",
    "llama_proj.": "language_projection.",
    "down_proj.": "global_down_proj.",
    "up_proj.": "global_up_proj.",
    "mvm_decoder.": "mvm_decoder.",
    "query_tokens": "query_tokens",
}
_VISUAL_SIMPLE = {
    "cls_token": "vision_model.embeddings.class_embedding",
    "pos_embed": "vision_model.embeddings.position_embedding",
    "patch_embed.proj.": "vision_model.embeddings.patch_embedding.",
    "BTAdapter_cls": "btadapter.cls_token",
    "BTAdapter_position.weight": "btadapter.temporal_position.weight",
}


# ---- original → project ------------------------------------------------------------------------------


def _map_block(rest: str, prefix: str) -> str | None:
    for old, new in _EVA_BLOCK:
        if rest.startswith(old):
            return prefix + new + rest[len(old) :]
    return None


def map_original_key(key: str) -> str | None:
    """Project name of one original key; None for keys handled elsewhere (q/v biases) or unknown ones."""
    if key.startswith("model.layers.") or key in ("model.embed_tokens.weight", "model.norm.weight"):
        return "language_model." + key
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if not key.startswith(P):
        return None
    k = key[len(P) :]
    for old, new in _STLLM_SIMPLE.items():
        if k.startswith(old):
            return new + k[len(old) :]
    if k.startswith("Qformer.bert."):
        k = k[len("Qformer.bert.") :]
        k = k.replace("embeddings.LayerNorm.", "embeddings.layernorm.")
        k = k.replace(".attention.self.", ".attention.attention.")
        k = k.replace(".crossattention.self.", ".crossattention.attention.")
        return "qformer." + k
    if k.startswith("visual_encoder."):
        k = k[len("visual_encoder.") :]
        for old, new in _VISUAL_SIMPLE.items():
            if k.startswith(old):
                return new + k[len(old) :]
        m = re.match(r"(blocks|BTAdapter_S|BTAdapter_T)\.(\d+)\.(.*)", k)
        if m:
            group, idx, rest = m.groups()
            prefix = {"blocks": "vision_model.encoder.layers.", "BTAdapter_S": "btadapter.spatial.",
                      "BTAdapter_T": "btadapter.temporal."}[group] + idx + "."
            return _map_block(rest, prefix)
    return None


def convert_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original-layout tensors → project names. Returns (state_dict, unknown original keys)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in original.items():
        if _IGNORED.search(key):
            continue
        m = re.match(r"(.*)\.attn\.(q_bias|v_bias)$", key)
        if m:
            biases.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        new = map_original_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    # EVA keeps q and v biases; the key bias is an implicit zero: one fused qkv bias = (q, 0, v).
    for block, qv in biases.items():
        if set(qv) != {"q_bias", "v_bias"}:
            unknown.extend(f"{block}.attn.{n}" for n in qv)
            continue
        new = map_original_key(block + ".attn.qkv.weight")
        if new is None:
            unknown.extend(f"{block}.attn.{n}" for n in qv)
            continue
        q, v = qv["q_bias"], qv["v_bias"]
        out[new[: -len("weight")] + "bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out, unknown


# ---- reading the released folder ---------------------------------------------------------------------


def resolve_source(src: str) -> tuple[Path, bool]:
    """(folder, downloaded): a local folder, or a hub repo id (optionally `owner/repo/subfolder`) downloaded
    when a network exists."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{src} is not a folder")
        return path, False
    parts = src.split("/")
    if len(parts) < 2:
        raise ValueError(f"{src} is neither a local folder nor a hub repo id (owner/name[/subfolder])")
    from huggingface_hub import snapshot_download

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    pattern = [f"{sub}/*"] if sub else None
    try:
        root = Path(snapshot_download(repo, allow_patterns=pattern))
    except Exception as e:  # offline, unknown repo, no access
        raise ValueError(f"could not download {src} from the hub: {e}") from e
    return (root / sub if sub else root), True


def read_original_tensors(src: Path) -> dict[str, torch.Tensor]:
    bins = sorted(src.glob("pytorch_model*.bin"))
    sts = sorted(src.glob("*.safetensors"))
    if not bins and not sts:
        raise ValueError(f"{src} holds no pytorch_model-*.bin or *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in bins:
        # weights_only: a checkpoint must not be able to run code.
        tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    if sts:
        from safetensors.torch import load_file

        for f in sts:
            tensors.update(load_file(f))
    return tensors


def infer_config(
    tensors: dict[str, torch.Tensor],
    llama_config: dict,
    *,
    video_input: str | None = None,
    residual_size: int = 16,
    num_frames: int | None = None,
    vision_heads: int = 16,
    qformer_heads: int = 12,
    pad_token_id: int | None = None,
    bos_token_id: int = 2,
) -> STLLMConfig:
    """Every size from shapes and counts; the head counts, which no shape shows, from the arguments (EVA-g's
    16 heads of 88, BERT-base's 12 of 64)."""
    def shape(k: str) -> tuple[int, ...]:
        if k not in tensors:
            raise ValueError(f"the checkpoint lacks {k}")
        return tuple(tensors[k].shape)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in tensors if (m := rx.match(k))})

    v = P + "visual_encoder."
    width = shape(v + "cls_token")[-1]
    patch = shape(v + "patch_embed.proj.weight")[-1]
    n_pos = shape(v + "pos_embed")[1]
    grid = int(round((n_pos - 1) ** 0.5))
    if vision_heads < 1 or width % vision_heads:
        raise ValueError(f"vision width {width} is not divisible by {vision_heads} heads: pass the checkpoint's "
                         "head count with --vision-heads")
    vision = dict(hidden_size=width, intermediate_size=shape(v + "blocks.0.mlp.fc1.weight")[0],
                  num_hidden_layers=count(re.escape(v) + r"blocks\.(\d+)\."),
                  num_attention_heads=vision_heads, image_size=grid * patch, patch_size=patch,
                  layer_norm_eps=1e-6)
    q = P + "Qformer.bert."
    qh = shape(q + "embeddings.word_embeddings.weight")[1]
    if qformer_heads < 1 or qh % qformer_heads:
        raise ValueError(f"Q-Former width {qh} is not divisible by {qformer_heads} heads: pass the checkpoint's "
                         "head count with --qformer-heads")
    n_q = count(re.escape(q) + r"encoder\.layer\.(\d+)\.")
    cross = sorted(int(m.group(1)) for k in tensors
                   if (m := re.match(re.escape(q) + r"encoder\.layer\.(\d+)\.crossattention\.self\.query\.weight", k)))
    freq = next((f for f in range(1, n_q + 1) if cross == [i for i in range(n_q) if i % f == 0]), None)
    if freq is None:
        raise ValueError(f"cross-attention on Q-Former layers {cross} matches no fixed frequency")
    qformer = dict(vocab_size=shape(q + "embeddings.word_embeddings.weight")[0], hidden_size=qh,
                   num_hidden_layers=n_q, num_attention_heads=qformer_heads,
                   intermediate_size=shape(q + "encoder.layer.0.intermediate.dense.weight")[0],
                   max_position_embeddings=shape(q + "embeddings.position_embeddings.weight")[0],
                   cross_attention_frequency=freq,
                   encoder_hidden_size=shape(q + f"encoder.layer.{cross[0]}.crossattention.self.key.weight")[1])
    vocab = shape("model.embed_tokens.weight")[0]
    hidden = shape("model.embed_tokens.weight")[1]
    heads = llama_config.get("num_attention_heads")
    if not heads:
        raise ValueError("config.json lacks num_attention_heads")
    text = dict(vocab_size=vocab, hidden_size=hidden,
                intermediate_size=shape("model.layers.0.mlp.gate_proj.weight")[0],
                num_hidden_layers=count(r"model\.layers\.(\d+)\."), num_attention_heads=heads,
                num_key_value_heads=shape("model.layers.0.self_attn.k_proj.weight")[0] // (hidden // heads),
                max_position_embeddings=llama_config.get("max_position_embeddings", 2048),
                rms_norm_eps=llama_config.get("rms_norm_eps", 1e-6),
                rope_theta=llama_config.get("rope_theta", 10000.0),
                bos_token_id=bos_token_id, eos_token_id=bos_token_id,
                pad_token_id=vocab - 1 if pad_token_id is None else pad_token_id, tie_word_embeddings=False)
    has_residual = P + "down_proj.weight" in tensors
    bt_depth = count(re.escape(v) + r"BTAdapter_T\.(\d+)\.")
    mode = video_input or ("residual" if has_residual else "all")
    if mode == "residual" and not has_residual:
        raise ValueError("video_input 'residual' needs down_proj/up_proj, which this checkpoint lacks")
    frames = num_frames or (64 if mode == "residual" else 16)
    return STLLMConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, image_size=grid * patch,
        num_query_tokens=shape(P + "query_tokens")[1],
        video_input=mode, residual_size=residual_size,
        residual_hidden_size=shape(P + "down_proj.weight")[0] if has_residual else 1024,
        num_frames=frames, btadapter_depth=bt_depth,
        btadapter_max_frames=shape(v + "BTAdapter_position.weight")[0] if bt_depth else 64,
        use_mvm_decoder=P + "mvm_decoder.head.weight" in tensors,
    )


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], unknown: list[str] = ()) -> None:
    """Raise ValueError listing missing and unexpected keys (nothing is silently left random)."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(unknown) | (set(state_dict) - expected))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:50]))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:50]))
        raise ValueError("checkpoint does not match the model: " + "; ".join(lines))


FLOAT16_MAX = 65504.0


def float16_overflows(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: max |value|} of the floating tensors that float16 cannot hold (they would become inf)."""
    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.numel():
            peak = float(v.detach().abs().max().float())
            if not peak <= FLOAT16_MAX:  # NaN counts too
                out[k] = peak
    return out


def convert_checkpoint(
    src: str,
    dst: str | os.PathLike,
    *,
    video_input: str | None = None,
    residual_size: int = 16,
    num_frames: int | None = None,
    dtype: str | None = None,
    vision_heads: int = 16,
    qformer_heads: int = 12,
    qformer_tokenizer: str | os.PathLike | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """SRC (released layout) → DST (project safetensors folder + config + both tokenizers + weights hash)."""
    from stllm.loading import save_model_folder
    from stllm.processing_stllm import STLLMProcessor
    from stllm.tokenizers import build_qformer_tokenizer, load_llama_tokenizer

    src_path, from_hub = resolve_source(src)
    cfg_file = src_path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{src_path} has no config.json (the released LLaMA config)")
    llama_config = json.loads(cfg_file.read_text())
    tokenizer = load_llama_tokenizer(src_path)
    tensors = read_original_tensors(src_path)
    config = infer_config(tensors, llama_config, video_input=video_input, residual_size=residual_size,
                          num_frames=num_frames, vision_heads=vision_heads, qformer_heads=qformer_heads,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if len(tokenizer) != config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but embed_tokens has {config.text_config.vocab_size}")
    state_dict, unknown = convert_state_dict(tensors)
    with torch.device("meta"):
        model = STLLMForConditionalGeneration(config)
    check_keys(model, state_dict, unknown)
    for k, t in model.state_dict().items():
        if tuple(state_dict[k].shape) != tuple(t.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(state_dict[k].shape)} != model {tuple(t.shape)}")
    if dtype == "float16" and (over := float16_overflows(state_dict)):
        worst = ", ".join(f"{k} (max |x| {v:.4g})" for k, v in sorted(over.items(), key=lambda kv: -kv[1])[:10])
        raise ValueError(f"{len(over)} tensor(s) exceed float16's range (±{FLOAT16_MAX:g}) and would become "
                         f"inf: {worst}; keep bfloat16")
    if dtype:
        target = getattr(torch, dtype)
        state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    qtok = build_qformer_tokenizer(qformer_tokenizer, online=from_hub)
    if len(qtok) != config.qformer_config.vocab_size:
        raise ValueError(f"Q-Former tokenizer has {len(qtok)} tokens but the Q-Former's word embeddings have "
                         f"{config.qformer_config.vocab_size}")
    dst = save_model_folder(model, STLLMProcessor(config, tokenizer, qtok), dst, max_shard_size=max_shard_size)
    log.info("converted %s → %s (%d tensors)", src_path, dst, len(state_dict))
    return dst
