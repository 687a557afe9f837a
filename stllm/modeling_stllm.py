"""ST-LLM: per-frame EVA ViT-g + InstructBLIP Q-Former tokens, fed (all of them, or global-local) to a LLaMA.

Built from `transformers` parts: `InstructBlipVisionModel` (EVA ViT-g + `ln_vision` as `post_layernorm`),
`InstructBlipQFormerModel` (with the question as text input), `LlamaForCausalLM`. The visual encoding is split
so callers can reuse it: frames → ViT features (question-independent, the expensive part), then
ViT features + question → Q-Former → projection → per-frame tokens (T, Q, D) → video-input mode → (L, D).

`STLLMVisualEncoder` holds THE maths of that encoding. Both engines run it: this `transformers` model and the
vLLM model (`stllm/vllm/model.py`), whose vision tower is vLLM's own BLIP layers behind the same attribute
names (`vision_model.embeddings`, `.encoder.layers`, `.post_layernorm`), so a fix lands in both at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.modeling_outputs import ModelOutput

from stllm.btadapter import BTAdapter
from stllm.configuration_stllm import STLLMConfig
from stllm.frame_sampling import residual_index


class MVMDecoder(nn.Module):
    """Masked-video-modeling head: Linear + LayerNorm over the LLM's last hidden states (training only)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(hidden_states))


@dataclass
class STLLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def visual_embedding(vision_features: torch.Tensor) -> torch.Tensor:
    """Question-independent video embedding: mean ViT feature (after ln_vision) over frames and tokens,
    L2-normalised, float32 (C,)."""
    v = vision_features.float().mean(dim=(0, 1))
    return v / v.norm().clamp_min(1e-12)


def build_visual_modules(config: STLLMConfig) -> dict[str, nn.Module | None]:
    """The modules besides the vision tower and the LLM, with the checkpoint's names: BT-Adapter, query tokens,
    Q-Former, `llama_proj`, the global-local MLP."""
    vcfg, qcfg, tcfg = config.vision_config, config.qformer_config, config.text_config
    residual = config.video_input == "residual"
    return {
        "btadapter": BTAdapter(vcfg, config.btadapter_depth, config.btadapter_max_frames)
        if config.btadapter_depth else None,
        "query_tokens": nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size)),
        "qformer": InstructBlipQFormerModel(qcfg),
        "language_projection": nn.Linear(qcfg.hidden_size, tcfg.hidden_size),  # `llama_proj`
        "global_down_proj": nn.Linear(tcfg.hidden_size, config.residual_hidden_size) if residual else None,
        "global_up_proj": nn.Linear(config.residual_hidden_size, tcfg.hidden_size) if residual else None,
    }


class STLLMVisualEncoder:
    """Frames → ViT features → per-frame tokens → the LLM's visual tokens. A mixin for `nn.Module`s that hold
    `config`, `vision_model`, `btadapter`, `query_tokens`, `qformer`, `language_projection` and
    `global_down_proj` / `global_up_proj` (see `build_visual_modules`)."""

    config: STLLMConfig
    vision_model: nn.Module
    btadapter: BTAdapter | None
    query_tokens: nn.Parameter
    qformer: nn.Module
    language_projection: nn.Module
    global_down_proj: nn.Module | None
    global_up_proj: nn.Module | None

    def get_vision_features(self, pixel_values: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Frames (n·T, 3, H, W) of n videos of T = `num_frames` frames each (default: one video) → ViT features
        after `ln_vision` (n·T, 1 + P, C), video after video.

        Question-independent: compute once per video and reuse for every question. With a BT-Adapter, its
        branch steps alongside the last blocks (per video) and is averaged in before `ln_vision`.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (T, 3, H, W), got {tuple(pixel_values.shape)}")
        t = pixel_values.shape[0] if num_frames is None else num_frames
        if t == 0 or pixel_values.shape[0] == 0:
            raise ValueError("pixel_values has zero frames")
        if pixel_values.shape[0] % t:
            raise ValueError(f"{pixel_values.shape[0]} frames are not videos of {t} frames each")
        vm, adapter = self.vision_model, self.btadapter
        if adapter is not None and t > self.config.btadapter_max_frames:
            raise ValueError(f"{t} frames exceed the BT-Adapter's {self.config.btadapter_max_frames} positions")
        x = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))  # (T, 1 + P, C)
        layers = vm.encoder.layers
        first = len(layers) - (adapter.depth if adapter is not None else 0)
        branch = None
        for i, layer in enumerate(layers):
            x = layer(x)
            if adapter is not None and i >= first:
                branch = adapter.step(x, branch, i - first, t, vm.embeddings.position_embedding)
        if adapter is not None:
            x = adapter.merge(x, branch, t)
        return vm.post_layernorm(x)

    def get_frame_tokens(
        self,
        vision_features: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ViT features (T, 1 + P, C) + the question's Q-Former tokens (Lq,) or (1, Lq) → per-frame tokens
        (T, Q, D). The question is repeated for every frame, as the original does; (T, Lq) ids give each frame
        its own (padded) text — frames of different clips in one forward, as vision pretraining does."""
        t, p = vision_features.shape[:2]
        device = vision_features.device

        def per_frame(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, torch.long)
            return x if x.ndim == 2 and x.shape[0] == t else x.reshape(1, -1).expand(t, -1)

        ids = per_frame(qformer_input_ids)
        text_mask = torch.ones_like(ids) if qformer_attention_mask is None else per_frame(qformer_attention_mask)
        queries = self.query_tokens.expand(t, -1, -1)
        mask = torch.cat([torch.ones(t, queries.shape[1], dtype=torch.long, device=device), text_mask], 1)
        out = self.qformer(
            input_ids=ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=vision_features.to(self.query_tokens.dtype),
            encoder_attention_mask=torch.ones(t, p, dtype=torch.long, device=device),
        ).last_hidden_state
        return self.language_projection(out[:, : queries.shape[1]])  # (T, Q, D)

    def get_video_tokens(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens (T, Q, D) → the LLM's visual tokens (L, D) for the configured video-input mode:
        all = T·Q in time order, mean = Q, residual = R·Q (local frames + the global MLP of the mean)."""
        t, _, d = frame_tokens.shape
        mode = self.config.video_input
        if mode == "all":
            return frame_tokens.reshape(-1, d)
        if mode == "mean":
            return frame_tokens.mean(0)
        # Global-local: the local frames out of the T sampled ones (per video: T may be shorter than the
        # checkpoint's num_frames) + an MLP of the unweighted mean over all T frames.
        global_tokens = frame_tokens.mean(0, keepdim=True)  # (1, Q, D)
        global_tokens = self.global_up_proj(torch.relu(self.global_down_proj(global_tokens)))
        local = frame_tokens[residual_index(t, self.config.residual_size)]
        return (local + global_tokens).reshape(-1, d)  # (R·Q, D)

    def embed_video(
        self,
        pixel_values: torch.Tensor | None,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frames (T, 3, H, W) + question → visual tokens (L, D). Pass `vision_features` to skip the ViT."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("embed_video needs pixel_values or vision_features")
            vision_features = self.get_vision_features(pixel_values)
        return self.get_video_tokens(self.get_frame_tokens(vision_features, qformer_input_ids, qformer_attention_mask))


class STLLMPreTrainedModel(PreTrainedModel):
    config_class = STLLMConfig
    config: STLLMConfig
    base_model_prefix = "stllm"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["InstructBlipEncoderLayer", "InstructBlipQFormerLayer", "LlamaDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, STLLMForConditionalGeneration):
            module.query_tokens.normal_(0.0, self.config.initializer_range)
            if module.global_up_proj is not None:
                # The original zero-initialises `up_proj`: the global branch starts as a no-op.
                module.global_up_proj.weight.zero_()
                module.global_up_proj.bias.zero_()


class STLLMForConditionalGeneration(STLLMVisualEncoder, STLLMPreTrainedModel):
    def __init__(self, config: STLLMConfig):
        super().__init__(config)
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        # `ln_vision` has eps 1e-5 while the EVA blocks use 1e-6; transformers applies one eps to both.
        self.vision_model.post_layernorm.eps = config.vision_post_layernorm_eps
        for name, module in build_visual_modules(config).items():
            setattr(self, name, module)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.mvm_decoder = MVMDecoder(config.text_config.hidden_size) if config.use_mvm_decoder else None
        self.post_init()

    # ---- LLM inputs ------------------------------------------------------------------------------------

    def build_inputs_embeds(
        self, video_tokens: list[torch.Tensor], input_ids: list[list[int]] | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens first, then the prompt's text tokens; left-padded into a batch.

        Returns inputs_embeds (B, S, D) and attention_mask (B, S) with zeros on the padding.
        """
        if len(video_tokens) != len(input_ids):
            raise ValueError(f"{len(video_tokens)} videos but {len(input_ids)} prompts")
        embed = self.language_model.get_input_embeddings()
        seqs = []
        for vt, ids in zip(video_tokens, input_ids, strict=True):
            ids_t = torch.as_tensor(ids, dtype=torch.long, device=embed.weight.device)
            seqs.append(torch.cat([vt.to(embed.weight.dtype), embed(ids_t)], dim=0))
        length = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        inputs = seqs[0].new_zeros(len(seqs), length, d)
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=inputs.device)
        for i, s in enumerate(seqs):
            inputs[i, length - s.shape[0] :] = s
            mask[i, length - s.shape[0] :] = 1
        return inputs, mask

    def forward(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> STLLMOutput:
        """Logits for one video and one prompt: pixel_values (T, 3, H, W), input_ids (S,) → logits (1, L + S, V)."""
        tokens = self.embed_video(pixel_values, qformer_input_ids, qformer_attention_mask)
        inputs_embeds, attention_mask = self.build_inputs_embeds([tokens], [input_ids])
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return STLLMOutput(logits=out.logits, hidden_states=out.hidden_states)

    @torch.no_grad()
    def generate_from_embeds(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, generation_config: GenerationConfig, **kwargs
    ) -> torch.Tensor:
        """KV-cached generation from left-padded embeddings; returns only the new tokens (B·beams→B, N)."""
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config, **kwargs
        )


__all__ = ["STLLMForConditionalGeneration", "STLLMPreTrainedModel", "STLLMVisualEncoder", "MVMDecoder",
           "build_visual_modules", "visual_embedding"]
