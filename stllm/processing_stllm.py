"""The video processor of the released weights: frame sampling, resize/crop/normalise, the prompt, answers.

Facts (docs/model.md: "Frames and preprocessing", "Prompt and decoding"): frames sampled with the original's
rule (`stllm.frame_sampling`); shorter side → 224 (bicubic, on uint8 PIL images as the original), centre crop
224, [0,1] then CLIP mean/std; prompt = visual tokens, then BOS(id 2) + the prompt format's text
(`stllm.prompts`); the Q-Former's text input is the question; generation stops at "###".
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BertTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from stllm.configuration_stllm import STLLMConfig
from stllm.frame_sampling import frame_indices
from stllm.prompts import DEFAULT_PROMPT, PromptFormat
from stllm.transforms import as_frames, resize_crop

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


@dataclass
class ProcessedQuestion:
    input_ids: list[int]  # LLM text tokens (BOS + the rendered prompt format)
    qformer_input_ids: torch.Tensor  # (1, Lq)
    qformer_attention_mask: torch.Tensor  # (1, Lq)


def normalize_frames(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (T, S, S, 3) → float32 (T, 3, S, S): [0, 1], then (x − mean) / std per channel (mean, std: (1, 3,
    1, 1)). The one implementation of the scaling: the hf processor runs it on the host, the vLLM model on the
    device (its frames travel as uint8, 4× smaller)."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


class STLLMProcessor:
    """Holds the two tokenizers and the preprocessing facts of one checkpoint."""

    def __init__(
        self,
        config: STLLMConfig,
        tokenizer: PreTrainedTokenizerBase,
        qformer_tokenizer: PreTrainedTokenizerBase,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        # The original truncates the Q-Former text on the left.
        self.qformer_tokenizer.truncation_side = "left"
        self.bos_token_id = config.text_config.bos_token_id
        self.pixel_mean = torch.tensor(config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        # The same few questions are asked of every video: tokenize each once (bounded).
        self._prompt_ids = functools.lru_cache(maxsize=1024)(self._tokenize_prompt)
        self._qformer_inputs = functools.lru_cache(maxsize=1024)(self._tokenize_qformer)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: STLLMConfig | None = None) -> STLLMProcessor:
        config = config or STLLMConfig.from_pretrained(path)
        tokenizer = LlamaTokenizer.from_pretrained(path)  # ST-LLM's LLM is Vicuna (LLaMA)
        qformer_tokenizer = BertTokenizer.from_pretrained(os.path.join(path, QFORMER_TOKENIZER_DIR))
        return cls(config, tokenizer, qformer_tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(path)
        self.qformer_tokenizer.save_pretrained(os.path.join(path, QFORMER_TOKENIZER_DIR))

    # ---- video ---------------------------------------------------------------------------------------

    def sample_indices(self, n_frames: int, num_frames: int | None = None) -> list[int]:
        """The frames to use out of a decoded video of `n_frames` (the checkpoint's `frame_sampling` rule)."""
        return frame_indices(n_frames, num_frames or self.config.num_frames, self.config.frame_sampling)

    def sample(self, frames: np.ndarray | list[np.ndarray], num_frames: int | None = None) -> np.ndarray:
        """Pick the model's frames from a whole decoded clip (T', the rule's count, ≤ num_frames)."""
        frames = as_frames(frames)
        return frames[self.sample_indices(frames.shape[0], num_frames)]

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """Sampled uint8 frames (T, H, W, 3) → normalised float32 (T, 3, S, S)."""
        frames = resize_crop(frames, self.config.image_size)
        return normalize_frames(torch.from_numpy(np.ascontiguousarray(frames)), self.pixel_mean, self.pixel_std)

    # ---- text ----------------------------------------------------------------------------------------

    def prompt_text(self, question: str, prompt: PromptFormat = DEFAULT_PROMPT) -> str:
        return prompt.render(question, self.config.system_prompt)

    def prompt_ids(self, question: str, prompt: PromptFormat = DEFAULT_PROMPT) -> list[int]:
        """BOS (the released tokenizer's bos is `</s>`, id 2) + the tokenized prompt (memoised; a fresh list)."""
        return list(self._prompt_ids(question, prompt))

    def qformer_inputs(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The question's Q-Former input ids and mask, (1, Lq) each (memoised; fresh tensors)."""
        ids, mask = self._qformer_inputs(question)
        return ids.clone(), mask.clone()

    def _tokenize_prompt(self, question: str, prompt: PromptFormat) -> tuple[int, ...]:
        ids = self.tokenizer(self.prompt_text(question, prompt), add_special_tokens=False)["input_ids"]
        return (self.bos_token_id, *ids)

    def _tokenize_qformer(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.qformer_tokenizer(
            question, truncation=True, max_length=self.config.qformer_max_txt_len, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    def process_question(self, question: str, prompt: PromptFormat = DEFAULT_PROMPT) -> ProcessedQuestion:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        q_ids, q_mask = self.qformer_inputs(question)
        return ProcessedQuestion(self.prompt_ids(question, prompt), q_ids, q_mask)

    def decode_answer(self, token_ids: list[int], prompt: PromptFormat = DEFAULT_PROMPT) -> str:
        """Generated ids → answer text, cut at the stop string ("###") as the original does."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text = text.split(self.config.stop_string)[0]
        return prompt.clean_answer(text.split("Assistant:")[-1])


__all__ = ["STLLMProcessor", "ProcessedQuestion", "normalize_frames", "QFORMER_TOKENIZER_DIR"]
