"""Stage 1 of the world model's recipe: pretrain the vision tower on frames of the world.

The stand-in for EVA-CLIP/BLIP-2 pretraining (nothing here can download it): the ViT, ln_vision, the Q-Former
(+ its query tokens) and the projection learn, supervised on each frame's attributes, to put what is in a frame
into its 32 tokens: colour, shape and size (classified) and the object's position (regressed, so the tokens of
successive frames say where the object went — what the LLM needs for the direction question). Small heads on
the mean of a frame's tokens read them out; they are dropped afterwards. Frames are rendered on the fly from the
`train` split's attribute combinations (the `unseen` pairs never appear), passed through a yuv420 chroma round
trip as the encoded clips are, and each frame is paired with one of the world's questions as the Q-Former's text
(stage 2 asks all of them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor, normalize_frames
from stllm.world.render import chroma_420, render
from stllm.world.scenes import CAPTION_PROMPT, COLOURS, QUESTIONS, SHAPES, SIZES, sample_scene

_SEED_OFFSET = 1 << 20  # pretraining scenes come from seeds no `synth` run of a small seed uses


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    position_weight: float = Field(default=20.0, ge=0, description="MSE weight of the (x, y) regression")
    patch_weight: float = Field(default=2.0, ge=0, description="weight of the per-patch shape loss on the ViT")
    seed: int = 0
    log_every: int = Field(default=50, ge=1)


class FrameHeads(nn.Module):
    """The mean of a frame's tokens → colour / shape / size logits and the object's (x, y) in frame units; and
    each ViT patch → which shape covers it (0: none). The patch loss is dense supervision where the ViT needs it:
    shape is a detail of one or two patches that a pooled label teaches slowly."""

    def __init__(self, dim: int, vision_dim: int):
        super().__init__()
        self.patch_shape = nn.Linear(vision_dim, 1 + len(SHAPES))
        self.colour = nn.Linear(dim, len(COLOURS))
        self.shape = nn.Linear(dim, len(SHAPES))
        self.size = nn.Linear(dim, len(SIZES))
        self.position = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:  # tokens (B, Q, D)
        pooled = tokens.mean(1)
        return {"colour": self.colour(pooled), "shape": self.shape(pooled), "size": self.size(pooled),
                "position": self.position(pooled)}

    def patches(self, vision_features: torch.Tensor) -> torch.Tensor:  # (B, 1 + P, C) → (B, P, 1 + shapes)
        return self.patch_shape(vision_features[:, 1:])


def frame_batch(rng: np.random.Generator, batch: int, size: int, patch: int, split: str = "train"
                ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """`batch` frames of freshly drawn scenes of `split`, uint8 (B, size, size, 3), and their labels (per patch:
    the shape covering > 20 % of it, else 0)."""
    frames, labels = [], {"colour": [], "shape": [], "size": [], "position": [], "patches": []}
    for _ in range(batch):
        scene = sample_scene(_SEED_OFFSET + int(rng.integers(1 << 30)), split, 0, size=(size, size))  # type: ignore[arg-type]
        i = int(rng.integers(scene.n_frames))
        frame = render(scene, [i])[0]
        frames.append(frame)
        covered = (frame != np.array(scene.background, dtype=np.uint8)).any(-1)  # (H, W)
        grid = covered.reshape(size // patch, patch, size // patch, patch).mean((1, 3)).reshape(-1)
        labels["patches"].append(np.where(grid > 0.2, 1 + SHAPES.index(scene.shape), 0))
        labels["colour"].append(list(COLOURS).index(scene.colour))
        labels["shape"].append(SHAPES.index(scene.shape))
        labels["size"].append(list(SIZES).index(scene.size))
        labels["position"].append(scene.position(i))
    out = {k: torch.tensor(np.array(v)) for k, v in labels.items()}
    out["position"] = out["position"].float()
    return chroma_420(np.stack(frames)), out


def _questions() -> list[str]:
    return [CAPTION_PROMPT, *QUESTIONS.values()]


class VisionPretrainer:
    def __init__(self, model: STLLMForConditionalGeneration, processor: STLLMProcessor, config: PretrainConfig):
        self.model, self.processor, self.config = model, processor, config
        from stllm.training.trainer import apply_freeze

        apply_freeze(model, [g for g in ("btadapter", "global_local", "llm", "mvm_decoder")])
        self.heads = FrameHeads(model.config.text_config.hidden_size, model.config.vision_config.hidden_size)
        self.patch = model.config.vision_config.patch_size
        params = [p for p in model.parameters() if p.requires_grad] + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, config.steps)
        # Every question's Q-Former ids, padded to one length: frame i reads question q[i].
        tok = processor.qformer_tokenizer(_questions(), padding=True, return_tensors="pt")
        self.q_ids, self.q_mask = tok["input_ids"], tok["attention_mask"]
        self._patch_class_weight = torch.tensor([0.1] + [1.0] * len(SHAPES))  # most patches are background

    def _forward(self, frames: np.ndarray, q: torch.Tensor) -> dict[str, torch.Tensor]:
        pv = normalize_frames(torch.from_numpy(frames), self.processor.pixel_mean, self.processor.pixel_std)
        feats = self.model.get_vision_features(pv, num_frames=1)  # each frame its own "video"
        tokens = self.model.get_frame_tokens(feats, self.q_ids[q], self.q_mask[q])  # (B, Q, D)
        return {**self.heads(tokens), "patches": self.heads.patches(feats)}

    def loss(self, frames: np.ndarray, labels: dict[str, torch.Tensor], q: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self._forward(frames, q)
        parts = {k: F.cross_entropy(out[k], labels[k]) for k in ("colour", "shape", "size")}
        parts["patches"] = self.config.patch_weight * F.cross_entropy(
            out["patches"].flatten(0, 1), labels["patches"].flatten(), weight=self._patch_class_weight)
        parts["position"] = self.config.position_weight * F.mse_loss(out["position"], labels["position"])
        return sum(parts.values()), {k: round(v.item(), 5) for k, v in parts.items()}  # type: ignore[return-value]

    def train(self, log: Path | None = None, progress: bool = True) -> dict[str, Any]:
        cfg, size = self.config, self.model.config.image_size
        rng = np.random.default_rng([cfg.seed, 17])
        self.model.train()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, desc="pretrain vision", unit="step", dynamic_ncols=True)
        t0, last = time.perf_counter(), {}
        for step in range(1, cfg.steps + 1):
            frames, labels = frame_batch(rng, cfg.batch_size, size, self.patch)
            q = torch.from_numpy(rng.integers(len(_questions()), size=cfg.batch_size))
            loss, parts = self.loss(frames, labels, q)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
            self.optimizer.step()
            self.scheduler.step()
            last = {"step": step, "loss": round(loss.item(), 5), **parts,
                    "frames_per_s": round(step * cfg.batch_size / (time.perf_counter() - t0), 1)}
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                with open(log, "a") as f:
                    f.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        self.model.eval()
        return last

    @torch.no_grad()
    def evaluate(self, n: int = 512, split: str = "heldout", seed: int = 99) -> dict[str, float]:
        """Head accuracy (and mean position error in frame units) on fresh frames of `split`."""
        rng = np.random.default_rng([seed, 19])
        frames, labels = frame_batch(rng, n, self.model.config.image_size, self.patch, split)
        q = torch.from_numpy(rng.integers(len(_questions()), size=n))
        out = self._forward(frames, q)
        acc = {k: float((out[k].argmax(-1) == labels[k]).float().mean()) for k in ("colour", "shape", "size")}
        acc["position_error"] = float((out["position"] - labels["position"]).abs().mean())
        return acc


__all__ = ["FrameHeads", "PretrainConfig", "VisionPretrainer", "frame_batch"]
