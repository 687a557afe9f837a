"""The video processor of the released weights: frame sampling, resize/crop/normalise, the prompt, answers.

Facts (DESIGN §2): shorter side → 224 (bicubic, on uint8 PIL images as the original), centre crop 224,
[0,1] then CLIP mean/std; prompt = visual tokens, then BOS(id 2) + system + "###Human: " + question +
" ###Assistant: "; the Q-Former's text input is the question; generation stops at "###".
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BertTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from stllm.configuration_stllm import STLLMConfig
from stllm.sampling import segment_midpoints
from stllm.transforms import as_frames, resize_crop

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


@dataclass
class ProcessedQuestion:
    input_ids: list[int]  # LLM text tokens (BOS + system + ### Human: q ### Assistant: )
    qformer_input_ids: torch.Tensor  # (1, Lq)
    qformer_attention_mask: torch.Tensor  # (1, Lq)


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
        return segment_midpoints(n_frames, num_frames or self.config.num_frames)

    def sample(self, frames: np.ndarray | list[np.ndarray], num_frames: int | None = None) -> np.ndarray:
        """Pick the model's frames from a decoded clip (a no-op when it already has exactly that many)."""
        frames = as_frames(frames)
        return frames[self.sample_indices(frames.shape[0], num_frames)]

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """Sampled uint8 frames (T, H, W, 3) → normalised float32 (T, 3, S, S)."""
        frames = resize_crop(frames, self.config.image_size)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    # ---- text ----------------------------------------------------------------------------------------

    def prompt_text(self, question: str) -> str:
        return self.config.system_prompt + "###Human: " + question + " ###Assistant: "

    def prompt_ids(self, question: str) -> list[int]:
        """BOS (the released tokenizer's bos is `</s>`, id 2) + the tokenized prompt (memoised; a fresh list)."""
        return list(self._prompt_ids(question))

    def qformer_inputs(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The question's Q-Former input ids and mask, (1, Lq) each (memoised; fresh tensors)."""
        ids, mask = self._qformer_inputs(question)
        return ids.clone(), mask.clone()

    def _tokenize_prompt(self, question: str) -> tuple[int, ...]:
        ids = self.tokenizer(self.prompt_text(question), add_special_tokens=False)["input_ids"]
        return (self.bos_token_id, *ids)

    def _tokenize_qformer(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.qformer_tokenizer(
            question, truncation=True, max_length=self.config.qformer_max_txt_len, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    def process_question(self, question: str) -> ProcessedQuestion:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        q_ids, q_mask = self.qformer_inputs(question)
        return ProcessedQuestion(self.prompt_ids(question), q_ids, q_mask)

    def decode_answer(self, token_ids: list[int]) -> str:
        """Generated ids → answer text, cut at the stop string ("###") as the original does."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text = text.split(self.config.stop_string)[0]
        return text.split("Assistant:")[-1].strip()


__all__ = [
    "STLLMProcessor", "ProcessedQuestion", "resize_crop", "as_frames", "QFORMER_TOKENIZER_DIR"
]
