"""The training loop: freeze groups, AdamW + warmup/cosine, gradient accumulation and checkpointing, checkpoints
every N steps and `resume`, metrics in `metrics.jsonl`, a progress bar; the final folder loads in both engines.

Determinism (so a resumed run continues the same loss curve): the sample order of epoch e is a permutation
seeded by (seed, e); the frames, crop, mask ratio and kept tokens of optimizer step s are drawn from
generators seeded by (seed, s). A checkpoint holds the weights, the optimizer, the scheduler and the step.

Data parallel (`workers` > 1, started by `pipeline.training.train` through Ray Train, which sets up torch.distributed):
rank r takes every `world_size`-th sample of each micro-batch and draws its random choices from (seed, s, r);
the gradients are averaged over the ranks before clipping, so every rank takes the same step. Rank 0 alone
writes metrics, checkpoints and the final model; every rank resumes from them (one machine, or shared storage).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stllm.loading import save_model_folder
from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor, normalize_frames
from stllm.prompts import prompt_format
from stllm.training.augment import augment_clip
from stllm.training.config import TrainConfig
from stllm.training.objective import training_loss

TRAIN_PROMPT = prompt_format("qa")
_ORDER_STREAM, _STEP_STREAM = 11, 13  # distinct tags: numpy's seed sequences ignore trailing zeros


def _logged_step(line: str) -> int:
    """A metrics line's step; a half-written last line (the run was killed mid-write) counts as after all."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # the original trains without system text: "###Human: … ###Assistant: "


@dataclass
class Sample:
    """One decoded training example: the clip's frames (N, H, W, 3) uint8 and one instruction."""

    frames: np.ndarray
    question: str
    answer: str
    uri: str = ""


def group_of(name: str) -> str:
    """The freeze group of a parameter name."""
    if "btadapter" in name:
        return "btadapter"
    if name.startswith("vision_model.post_layernorm") or name.startswith(("qformer.", "query_tokens")):
        return "qformer"  # ln_vision sits with the Q-Former in the original's recipe
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("language_projection"):
        return "projection"
    if name.startswith("global_"):
        return "global_local"
    if name.startswith("mvm_decoder"):
        return "mvm_decoder"
    if name.startswith("language_model"):
        return "llm"
    raise ValueError(f"parameter {name} belongs to no freeze group")


def apply_freeze(model: torch.nn.Module, freeze: Sequence[str], lora: bool = False) -> dict[str, int]:
    """requires_grad per group (with LoRA only the adapters of the LLM train); returns the trainable parameter
    count per group."""
    trainable: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = group_of(name.replace("base_model.model.", ""))
        p.requires_grad_("lora_" in name if lora and group == "llm" else group not in freeze)
        if p.requires_grad:
            trainable[group] = trainable.get(group, 0) + p.numel()
    return trainable


def merge_lora(module: torch.nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the base layer back: the plain model's keys."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer) and name:
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
            merged += 1
    return merged


def _device_dtype(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    return device, dtype


class Trainer:
    def __init__(self, config: TrainConfig, samples: Sequence[Sample], rank: int = 0, world_size: int = 1):
        if not samples:
            raise ValueError("no training samples (every sample failed to decode, or the manifest is empty)")
        self.config = config
        self.samples = list(samples)
        self.rank, self.world_size = rank, world_size
        self.out = Path(config.output)
        self.device, self.dtype = _device_dtype(config)
        self.processor = STLLMProcessor.from_pretrained(config.model)
        # fp32 master weights (and optimizer state); bf16 only inside autocast, as the HF Trainer's bf16=True:
        # in pure bf16 an lr-2e-5 update is below the weights' resolution and rounds away.
        model = STLLMForConditionalGeneration.from_pretrained(config.model, dtype=torch.float32)
        if config.lora.enabled:  # adapters injected in place: the model keeps its layout (and its maths)
            from peft import LoraConfig as PeftLora
            from peft import inject_adapter_in_model

            lc = config.lora
            inject_adapter_in_model(PeftLora(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=lc.target_modules), model.language_model)
        self.model = model.to(self.device)
        self.trainable = apply_freeze(self.model, config.freeze, lora=config.lora.enabled)
        if config.grad_checkpointing:
            self.model.language_model.gradient_checkpointing_enable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"freeze={config.freeze} leaves nothing to train")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        per_step = config.batch_size * config.grad_accum
        self.steps_per_epoch = max(1, len(self.samples) // per_step)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = (get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
                          if config.lr_schedule == "cosine" else
                          get_constant_schedule_with_warmup(self.optimizer, warmup))
        self.step = 0
        self._saved_step = -1
        self._started = False

    # ---- data ------------------------------------------------------------------------------------------

    def _batch_indices(self, step: int, micro: int) -> list[int]:
        """The samples of micro-batch `micro` of optimizer step `step` (0-based): epochs are seeded permutations."""
        per_step = self.config.batch_size * self.config.grad_accum
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, _ORDER_STREAM, epoch]).permutation(len(self.samples))
        start = within * per_step + micro * self.config.batch_size
        return [int(order[(start + i) % len(order)]) for i in range(self.config.batch_size)]

    def _pixel_values(self, sample: Sample, rng: np.random.Generator) -> torch.Tensor:
        cfg, size = self.config, self.model.config.image_size
        if cfg.frame_sampling == "original" and cfg.crop_scale is None:  # the evaluation path, exactly
            return self.processor.pixel_values(self.processor.sample(sample.frames))
        indices = None if cfg.frame_sampling == "rand" else self.processor.sample_indices(len(sample.frames))
        frames = augment_clip(sample.frames, self.model.config.num_frames, size, rng, cfg.crop_scale, indices)
        return normalize_frames(frames, self.processor.pixel_mean, self.processor.pixel_std)

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"][: self.config.answer_max_tokens]
        return ids + [self.processor.tokenizer.eos_token_id]

    # ---- loop ------------------------------------------------------------------------------------------

    def _micro_step(self, indices: list[int], rng: np.random.Generator, generator: torch.Generator) -> Any:
        cfg = self.config
        pvs, q_inputs, prompts, answers = [], [], [], []
        for i in indices:
            s = self.samples[i]
            q_text = f"{cfg.instruction} {s.question}".strip()  # what the Q-Former reads
            q_inputs.append(self.processor.qformer_inputs(q_text))
            pvs.append(self._pixel_values(s, rng))
            prompts.append(self.processor.prompt_ids(q_text, TRAIN_PROMPT))
            answers.append(self._answer_ids(s.answer))
        ratio = (cfg.mask_ratio if cfg.masking else 0.0)
        tokens = self._video_tokens(pvs, q_inputs)
        out = training_loss(self.model, torch.stack(tokens), prompts, answers, mask_ratio=ratio,
                            generator=generator, mvm=cfg.masking)
        if self.world_size > 1:  # the LM loss is a mean over answer tokens: weigh this rank's by its share of them
            import torch.distributed as dist

            counts = torch.tensor(float(sum(len(a) for a in answers)), device=self.device)
            local = counts.item()
            dist.all_reduce(counts)
            out.lm_loss = out.lm_loss * (local * self.world_size / counts.item())  # averaged over ranks: exact
            out.loss = out.lm_loss + (out.mvm_loss if out.mvm_loss is not None else 0)
        return out

    def _video_tokens(self, pvs: list[torch.Tensor], q_inputs: list[tuple[torch.Tensor, torch.Tensor]]
                      ) -> list[torch.Tensor]:
        """Each sample's visual tokens (L, D). Clips of one frame count go through the ViT and the Q-Former in
        one forward each, every frame reading its own clip's (padded) question."""
        t = pvs[0].shape[0]
        if any(pv.shape[0] != t for pv in pvs):  # clips shorter than num_frames: one at a time
            return [self.model.embed_video(pv.to(self.device), ids.to(self.device), m.to(self.device))
                    for pv, (ids, m) in zip(pvs, q_inputs, strict=True)]
        feats = self.model.get_vision_features(torch.cat(pvs).to(self.device), num_frames=t)
        width = max(ids.shape[1] for ids, _ in q_inputs)
        pad = self.processor.qformer_tokenizer.pad_token_id or 0
        q_ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=pad) for ids, _ in q_inputs])
        q_mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in q_inputs])
        frame_tokens = self.model.get_frame_tokens(feats, q_ids.repeat_interleave(t, 0).to(self.device),
                                                   q_mask.repeat_interleave(t, 0).to(self.device))
        return [self.model.get_video_tokens(ft) for ft in frame_tokens.split(t)]

    def train(self, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Run to `total_steps` (from the latest checkpoint with `resume`); `stop_after` ends early after that
        many steps of this call (a run that is cut off). Returns the final metrics."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        main = self.rank == 0
        if resume:
            self._load_latest()
        elif main and not self._started and (list(self.out.glob("checkpoint-*"))
                                             or (self.out / "metrics.jsonl").exists()):
            raise ValueError(f"{self.out} holds an earlier run: --resume it, or give another output")
        self._started = True
        if main:
            (self.out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
        self.model.train()
        self._frozen_modules_eval()
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        done_here, window, t_window = 0, [], time.perf_counter()
        last: dict[str, Any] = {}
        while self.step < self.total_steps and (stop_after is None or done_here < stop_after):
            rng = np.random.default_rng([cfg.seed, _STEP_STREAM, self.step, self.rank])  # rank 0: (seed, s)
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            torch.manual_seed(int(rng.integers(2**62)))  # dropout, if any
            self.optimizer.zero_grad(set_to_none=True)
            parts = []
            for micro in range(cfg.grad_accum):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                    shard = self._batch_indices(self.step, micro)[self.rank::self.world_size]
                    out = self._micro_step(shard, rng, generator)
                (out.loss / cfg.grad_accum).backward()
                parts.append(out)
            if self.world_size > 1:
                self._average_gradients()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               cfg.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            done_here += 1
            loss, lm, mvm = self._step_losses(parts)
            window.append(loss)
            last = {"step": self.step, "loss": round(loss, 6), "lm_loss": round(lm, 6),
                    "mvm_loss": round(mvm, 6) if mvm is not None else None, "lr": lr,
                    "mask_ratio": round(parts[-1].mask_ratio, 4)}
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t_window
                last["samples_per_s"] = round(len(window) * cfg.batch_size * cfg.grad_accum / max(elapsed, 1e-9), 2)
                window, t_window = [], time.perf_counter()
            if main:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **(
                    {"samples/s": last["samples_per_s"]} if "samples_per_s" in last else {}))
            if main and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        if main and self.step >= self.total_steps:
            self.save_model(self.out / "final")
        elif main and self._saved_step != self.step:
            self._save_checkpoint()
        return last

    def _average_gradients(self) -> None:
        import torch.distributed as dist

        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def _step_losses(self, parts: list[Any]) -> tuple[float, float, float | None]:
        """(loss, LM loss, MVM loss or None) of a step: the mean over its micro-batches and the ranks."""
        mvm = [p.mvm_loss.detach() for p in parts if p.mvm_loss is not None]
        values = torch.stack([torch.stack([p.loss.detach() for p in parts]).mean(),
                              torch.stack([p.lm_loss.detach() for p in parts]).mean(),
                              torch.stack(mvm).mean() if mvm else torch.zeros((), device=parts[0].loss.device)])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= self.world_size
        loss, lm, m = values.float().tolist()
        return loss, lm, (m if mvm else None)

    def _frozen_modules_eval(self) -> None:
        """Frozen towers run in eval mode, as the original's `disabled_train`: no Q-Former dropout noise on
        features that cannot learn from it (and train-time tokens equal the inference ones)."""
        frozen = set(self.config.freeze)
        if "vision" in frozen:
            self.model.vision_model.eval()
        if "qformer" in frozen:
            self.model.qformer.eval()

    # ---- checkpoints -----------------------------------------------------------------------------------

    def _save_checkpoint(self) -> Path:
        folder = self.out / f"checkpoint-{self.step:07d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": self.step, "run": self._run_facts()},
                   tmp / "state.pt")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # a checkpoint is whole or absent (the older ones stay until it is)
        self._saved_step = self.step
        for old in sorted(self.out.glob("checkpoint-*[0-9]"))[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def _load_latest(self) -> None:
        found = sorted(self.out.glob("checkpoint-*[0-9]"))
        if not found:
            raise ValueError(f"--resume: no checkpoint in {self.out}")
        state = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=False)
        if state.get("run") != self._run_facts():
            raise ValueError(f"--resume: {found[-1]} was written by a run with {state.get('run')}, this one has "
                             f"{self._run_facts()}: the data order would differ")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():  # drop what was logged after that checkpoint (the run died later)
            kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def _run_facts(self) -> dict[str, int]:
        """What fixes the data order and the schedule: a resumed run must have the same."""
        facts = {"samples": len(self.samples), "batch_size": self.config.batch_size,
                 "grad_accum": self.config.grad_accum, "total_steps": self.total_steps, "seed": self.config.seed}
        return facts | ({"workers": self.world_size} if self.world_size > 1 else {})  # each rank draws its own

    def save_model(self, dst: Path) -> Path:
        """The trained model in the project's format (LoRA merged): loads in the hf and vLLM engines."""
        model = self.model
        if self.config.lora.enabled:
            merge_lora(model.language_model)
        return save_model_folder(model, self.processor, dst)


__all__ = ["Sample", "TRAIN_PROMPT", "Trainer", "apply_freeze", "group_of", "merge_lora"]
