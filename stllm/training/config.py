"""The training config: every choice of the recipe is a field (YAML like the jobs, `--set` overrides).

Defaults are the original's recipe for real weights (`train_hf.py` + its yaml): ViT frozen except a BT-Adapter,
Q-Former + query tokens + ln_vision frozen; LLM, projection and global-local MLP trained; AdamW lr 2e-5,
cosine with 3% warmup, weight decay 0; bf16 where supported; 'rand' frames + RandomResizedCrop(0.5-1);
dynamic masking + MVM; answers cut at 256 tokens; the training prompt has no system text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FreezeGroup = Literal["vision", "btadapter", "qformer", "projection", "global_local", "llm", "mvm_decoder"]
FREEZE_GROUPS: tuple[str, ...] = ("vision", "btadapter", "qformer", "projection", "global_local", "llm",
                                  "mvm_decoder")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(_Strict):
    """LoRA on the LLM through `peft` (off in the original's recipe)."""

    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Strict):
    model: str = Field(description="the checkpoint folder to start from (project format; `tiny`: the demo's)")
    manifest: str = Field(description="training manifest: parquet or jsonl with uri, question, answer")
    output: str = Field(description="folder for checkpoints, metrics.jsonl and the final model")
    split: str | None = Field(default="train", description="use manifest rows of this split (null: all rows)")
    qtypes: list[str] | None = Field(default=None, description="use only rows of these question types (the "
                                     "manifest's qtype column; null: every row)")
    repeat: dict[str, int] = Field(default_factory=dict, description="question type → times each of its rows "
                                   "is used per epoch (e.g. {direction: 4}: a hard question asked more often)")
    freeze: list[FreezeGroup] = Field(default_factory=lambda: ["vision", "qformer"],
                                      description="parameter groups kept fixed")
    lr: float = Field(default=2e-5, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    grad_checkpointing: bool = False
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description="auto: bf16 on a GPU")
    device: str = "auto"
    masking: bool = Field(default=True, description="dynamic video-token masking + MVM loss")
    mask_ratio: float | None = Field(default=None, gt=0, lt=1, description="fixed ratio (null: ~N(0.5, 0.1))")
    frame_sampling: Literal["rand", "original"] = Field(default="rand",
                                                        description="rand: a random frame per interval")
    crop_scale: tuple[float, float] | None = Field(default=(0.5, 1.0),
                                                   description="RandomResizedCrop scale (null: no crop)")
    decode_frames: int = Field(default=32, ge=1, description="frames decoded per clip for 'rand' to pick from")
    answer_max_tokens: int = Field(default=256, ge=1)
    instruction: str = Field(default="", description="text before the question (the original's {instruction})")
    save_every: int = Field(default=100, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    lora: LoraConfig = Field(default_factory=LoraConfig)
    workers: int = Field(default=1, ge=1, description="data-parallel training processes (Ray Train; one GPU each "
                         "where there are GPUs): each takes batch_size / workers samples of every step")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}")
        for qtype, times in self.repeat.items():
            if times < 1:
                raise ValueError(f"repeat.{qtype} must be >= 1, got {times}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of workers ({self.workers})")
        if self.lora.enabled and "llm" in self.freeze:
            raise ValueError("lora.enabled trains adapters on the LLM: remove 'llm' from freeze")
        return self


__all__ = ["FREEZE_GROUPS", "FreezeGroup", "LoraConfig", "TrainConfig"]
