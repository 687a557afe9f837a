"""ST-LLM configuration: EVA ViT-g (+ optional BT-Adapter) → InstructBLIP Q-Former → LLaMA."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    PreTrainedConfig,
)

from stllm.frame_sampling import FRAME_SAMPLINGS, num_sampled
from stllm.prompts import DEFAULT_SYSTEM_PROMPT

VideoInput = Literal["all", "mean", "residual"]
VIDEO_INPUT_MODES: tuple[str, ...] = ("all", "mean", "residual")


@strict
class STLLMConfig(PreTrainedConfig):
    r"""
    vision_config: EVA ViT-g/14 sizes (`InstructBlipVisionConfig`; its `layer_norm_eps` is the blocks' 1e-6).
    qformer_config: InstructBLIP Q-Former (BERT-base, cross-attention every `cross_attention_frequency` layers).
    text_config: the LLaMA (Vicuna-7B v1.1 for the released weights).
    num_query_tokens: learned queries, i.e. tokens per frame (32).
    vision_post_layernorm_eps: `ln_vision` eps (1e-5 in the original, unlike the blocks' 1e-6).
    video_input: how per-frame tokens (T, Q, D) become the LLM's visual tokens:
        `all` → T·Q tokens in time order, `mean` → Q tokens, `residual` (global-local) → residual_size·Q.
    residual_size: local frames of the global-local input.
    residual_hidden_size: width of the global MLP (down 4096→1024 → ReLU → up 1024→4096).
    num_frames: frames sampled per video (64 conversation, 16 QA); a shorter video gives fewer.
    frame_sampling: `original` (the original's `get_seq_frames`) or `midpoint` (see `stllm.frame_sampling`).
    btadapter_depth: BT-Adapter temporal branch depth (0 = plain EVA; 3 for the QA weights).
    btadapter_max_frames: size of the BT-Adapter temporal position table.
    use_mvm_decoder: the masked-video-modeling decoder (Linear + LayerNorm) used in training.
    qformer_max_txt_len: Q-Former text truncation (left side), as the original tokenizer.
    image_size, image_mean, image_std: the preprocessing.
    system_prompt, stop_string, default_repetition_penalty: the released prompt format (`stllm.prompts`).
    """

    model_type = "stllm"
    sub_configs = {
        "vision_config": InstructBlipVisionConfig,
        "qformer_config": InstructBlipQFormerConfig,
        "text_config": LlamaConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    vision_post_layernorm_eps: float = 1e-5
    video_input: str = "residual"
    residual_size: int = 16
    residual_hidden_size: int = 1024
    num_frames: int = 64
    frame_sampling: str = "original"
    btadapter_depth: int = 0
    btadapter_max_frames: int = 64
    use_mvm_decoder: bool = True
    qformer_max_txt_len: int = 256
    image_size: int = 224
    image_mean: list[float] | tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: list[float] | tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stop_string: str = "###"
    default_repetition_penalty: float = 1.5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = InstructBlipVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = InstructBlipVisionConfig(**self.vision_config)
        if self.qformer_config is None:
            self.qformer_config = InstructBlipQFormerConfig(vocab_size=30523)
        elif isinstance(self.qformer_config, dict):
            self.qformer_config = InstructBlipQFormerConfig(**self.qformer_config)
        if self.text_config is None:
            self.text_config = LlamaConfig(vocab_size=32001, pad_token_id=32000, bos_token_id=2, eos_token_id=2)
        elif isinstance(self.text_config, dict):
            self.text_config = LlamaConfig(**self.text_config)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Reject inconsistent options with the field and the reason."""
        if self.video_input not in VIDEO_INPUT_MODES:
            raise ValueError(f"video_input must be one of {VIDEO_INPUT_MODES}, got {self.video_input!r}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.frame_sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {self.frame_sampling!r}")
        if self.image_size != self.vision_config.image_size:
            raise ValueError(f"image_size={self.image_size} but vision_config.image_size="
                             f"{self.vision_config.image_size}: the processor and the ViT must agree")
        if self.video_input == "residual" and not 1 <= self.residual_size <= self.num_frames:
            raise ValueError(
                f"residual_size must be in [1, num_frames={self.num_frames}], got {self.residual_size}"
            )
        if self.btadapter_depth > self.vision_config.num_hidden_layers:
            raise ValueError("btadapter_depth cannot exceed the number of ViT blocks")
        if self.btadapter_depth and self.num_frames > self.btadapter_max_frames:
            raise ValueError(
                f"num_frames={self.num_frames} exceeds the BT-Adapter's {self.btadapter_max_frames} positions"
            )

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def num_visual_tokens(self, num_frames: int | None = None) -> int:
        """LLM visual tokens for `num_frames` SAMPLED frames (default: `self.num_frames`, the most)."""
        t = self.num_frames if num_frames is None else num_frames
        q = self.num_query_tokens
        if self.video_input == "all":
            return t * q
        if self.video_input == "mean":
            return q
        return self.residual_size * q

    def frames_sampled(self, n_frames: int) -> int:
        """How many frames the sampling rule takes out of a video of `n_frames` frames."""
        return num_sampled(n_frames, self.num_frames, self.frame_sampling)


__all__ = ["STLLMConfig", "VIDEO_INPUT_MODES"]
