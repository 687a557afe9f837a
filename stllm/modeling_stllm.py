"""ST-LLM: per-frame EVA ViT-g + InstructBLIP Q-Former tokens, fed (all of them, or global-local) to a LLaMA.

Built from `transformers` parts: `InstructBlipVisionModel` (EVA ViT-g + `ln_vision` as `post_layernorm`),
`InstructBlipQFormerModel` (with the question as text input), `LlamaForCausalLM`. The visual encoding is split
so callers can reuse it: frames → ViT features (question-independent, the expensive part), then
ViT features + question → Q-Former → projection → per-frame tokens (T, Q, D) → video-input mode → (L, D).
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
from stllm.sampling import segment_midpoints


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


class STLLMForConditionalGeneration(STLLMPreTrainedModel):
    def __init__(self, config: STLLMConfig):
        super().__init__(config)
        vcfg, qcfg, tcfg = config.vision_config, config.qformer_config, config.text_config
        self.vision_model = InstructBlipVisionModel(vcfg)
        # `ln_vision` has eps 1e-5 while the EVA blocks use 1e-6; transformers applies one eps to both.
        self.vision_model.post_layernorm.eps = config.vision_post_layernorm_eps
        self.btadapter = (
            BTAdapter(vcfg, config.btadapter_depth, config.btadapter_max_frames) if config.btadapter_depth else None
        )
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.qformer = InstructBlipQFormerModel(qcfg)
        self.language_projection = nn.Linear(qcfg.hidden_size, tcfg.hidden_size)  # `llama_proj`
        if config.video_input == "residual":
            self.global_down_proj = nn.Linear(tcfg.hidden_size, config.residual_hidden_size)
            self.global_up_proj = nn.Linear(config.residual_hidden_size, tcfg.hidden_size)
        else:
            self.global_down_proj = self.global_up_proj = None
        self.language_model = LlamaForCausalLM(tcfg)
        self.mvm_decoder = MVMDecoder(tcfg.hidden_size) if config.use_mvm_decoder else None
        self.post_init()

    # ---- visual encoding -------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One video's frames (T, 3, H, W) → ViT features after `ln_vision` (T, 1 + P, C).

        Question-independent: compute once per video and reuse for every question.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (T, 3, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values has zero frames")
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        if self.btadapter is None:
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self._vision_features_btadapter(pixel_values)

    def _vision_features_btadapter(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm, adapter = self.vision_model, self.btadapter
        t = pixel_values.shape[0]
        if t > self.config.btadapter_max_frames:
            raise ValueError(f"{t} frames exceed the BT-Adapter's {self.config.btadapter_max_frames} positions")
        x = vm.embeddings(pixel_values)  # (T, 1 + P, C)
        layers = vm.encoder.layers
        first = len(layers) - adapter.depth
        branch = None
        for i, layer in enumerate(layers):
            x = layer(x)
            if i >= first:
                branch = adapter.step(x, branch, i - first, t, vm.embeddings.position_embedding)
        return vm.post_layernorm(adapter.merge(x, branch, t))

    def get_frame_tokens(
        self,
        vision_features: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ViT features (T, 1 + P, C) + the question's Q-Former tokens (1, Lq) → per-frame tokens (T, Q, D)."""
        t = vision_features.shape[0]
        if qformer_input_ids.ndim == 1:
            qformer_input_ids = qformer_input_ids[None]
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        elif qformer_attention_mask.ndim == 1:
            qformer_attention_mask = qformer_attention_mask[None]
        ids = qformer_input_ids.expand(t, -1)
        text_mask = qformer_attention_mask.expand(t, -1)
        queries = self.query_tokens.expand(t, -1, -1)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=text_mask.device), text_mask], 1)
        out = self.qformer(
            input_ids=ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=vision_features.to(self.query_tokens.dtype),
            encoder_attention_mask=torch.ones(vision_features.shape[:2], dtype=torch.long, device=ids.device),
        ).last_hidden_state
        return self.language_projection(out[:, : queries.shape[1]])  # (T, Q, D)

    def get_video_tokens(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens (T, Q, D) → the LLM's visual tokens (L, D) for the configured video-input mode."""
        t, _, d = frame_tokens.shape
        mode = self.config.video_input
        if mode == "all":
            return frame_tokens.reshape(-1, d)  # T·Q tokens in time order
        if mode == "mean":
            return frame_tokens.mean(0)  # Q tokens
        # Global-local: `residual_size` local frames at segment midpoints + an MLP of the mean over all frames.
        local_index = segment_midpoints(t, self.config.residual_size)
        global_tokens = frame_tokens.mean(0, keepdim=True)  # (1, Q, D)
        global_tokens = self.global_up_proj(torch.relu(self.global_down_proj(global_tokens)))
        return (frame_tokens[local_index] + global_tokens).reshape(-1, d)  # (R·Q, D)

    def embed_video(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frames (T, 3, H, W) + question → visual tokens (L, D). Pass `vision_features` to skip the ViT."""
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        return self.get_video_tokens(self.get_frame_tokens(vision_features, qformer_input_ids, qformer_attention_mask))

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


__all__ = ["STLLMForConditionalGeneration", "STLLMPreTrainedModel", "MVMDecoder"]
