"""The `hf` reference engine: the `transformers` model on any machine, batched KV-cached generation."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from stllm.engine import (
    MIN_NEW_TOKENS,
    Answer,
    GenerationOptions,
    VideoRequest,
    VideoResult,
    check_prompt_budget,
)
from stllm.loading import load_model
from stllm.modeling_stllm import STLLMForConditionalGeneration, visual_embedding
from stllm.processing_stllm import STLLMProcessor
from stllm.prompts import PromptFormat
from stllm.transforms import as_frames


@dataclass
class _Pair:
    request: int
    question: str
    video_tokens: torch.Tensor  # (L, D)
    input_ids: list[int]


class HFEngine:
    kind = "hf"

    def __init__(self, model: STLLMForConditionalGeneration, processor: STLLMProcessor, max_batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.vit_forwards = 0  # counted so tests and benchmarks can check "one ViT pass per video"
        self.last_timings: dict[str, float] = {}
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str | None = None, device: str = "auto", max_batch_size: int = 8, **_: object
    ) -> HFEngine:
        model, processor = load_model(path, dtype=dtype, device=device)
        return cls(model, processor, max_batch_size=max_batch_size)

    @property
    def num_frames(self) -> int:
        return self.model.config.num_frames

    def close(self) -> None:
        """Stop the worker thread of `submit` (the model lives in this process)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def submit(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> Future:
        """`generate` on a worker thread, one batch at a time: this engine has no continuous batching, but the
        caller (e.g. the text embedder of the previous batch) runs meanwhile."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stllm-hf")
        return self._executor.submit(self.generate, requests, options)

    def stats(self) -> dict[str, object]:
        return {}

    def healthy(self) -> bool:
        """False when the device is unusable (a CUDA error poisons the whole context until the process exits)."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return True
        except RuntimeError:
            return False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generation_config(self, options: GenerationOptions) -> GenerationConfig:
        tcfg = self.model.config.text_config
        kwargs = dict(
            max_new_tokens=options.max_new_tokens, min_new_tokens=MIN_NEW_TOKENS, num_beams=options.num_beams,
            do_sample=options.do_sample,
            repetition_penalty=options.repetition_penalty_for(self.model.config.default_repetition_penalty),
            eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id, bos_token_id=tcfg.bos_token_id,
            stop_strings=[self.model.config.stop_string],
        )
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or None)
        return GenerationConfig(**kwargs)

    def model_frames(self, req: VideoRequest) -> np.ndarray:
        """The frames the model sees: the request's own when already sampled, else the sampling rule's."""
        return as_frames(req.frames) if req.sampled else self.processor.sample(req.frames)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The model's (sampled) frames → ViT features (T, 1 + P, C) and the visual embedding. One ViT pass."""
        pixel_values = self.processor.pixel_values(frames).to(self.device)
        features = self.model.get_vision_features(pixel_values)
        self.vit_forwards += 1
        return features, visual_embedding(features).cpu().numpy()

    @torch.no_grad()
    def generate(
        self, requests: list[VideoRequest], options: GenerationOptions | None = None
    ) -> list[VideoResult]:
        options = options or GenerationOptions()
        results = [VideoResult(video_id=r.video_id) for r in requests]
        pairs: list[_Pair] = []
        t0 = time.perf_counter()
        max_len = self.model.config.text_config.max_position_embeddings
        for i, req in enumerate(requests):
            try:
                if not req.questions:
                    raise ValueError("the request has no questions")
                processed = [self.processor.process_question(q, options.prompt) for q in req.questions]
                features, results[i].visual_embedding = self.encode(self.model_frames(req))
                for q, pq in zip(req.questions, processed, strict=True):
                    tokens = self.model.get_video_tokens(
                        self.model.get_frame_tokens(features, pq.qformer_input_ids, pq.qformer_attention_mask)
                    )
                    check_prompt_budget(tokens.shape[0], len(pq.input_ids), options.max_new_tokens, max_len)
                    pairs.append(_Pair(i, q, tokens, pq.input_ids))
            except ValueError as e:
                results[i].error = f"{type(e).__name__}: {e}"
                results[i].visual_embedding = None
                pairs = [p for p in pairs if p.request != i]
        t1 = time.perf_counter()
        gen_cfg = self.generation_config(options)
        answers: dict[tuple[int, int], Answer] = {}
        for start in range(0, len(pairs), self.max_batch_size):
            chunk = pairs[start : start + self.max_batch_size]
            done = self._generate_chunk(chunk, gen_cfg, options.seed, options.prompt)
            for idx, ans in zip(range(start, start + len(chunk)), done, strict=True):
                answers[(pairs[idx].request, idx)] = ans
        for (req_idx, _), ans in sorted(answers.items()):
            results[req_idx].answers.append(ans)
        self.last_timings = {"encode_s": t1 - t0, "generate_s": time.perf_counter() - t1}
        return results

    def _generate_chunk(
        self, chunk: list[_Pair], gen_cfg: GenerationConfig, seed: int | None, prompt: PromptFormat
    ) -> list[Answer]:
        embeds, mask = self.model.build_inputs_embeds([p.video_tokens for p in chunk], [p.input_ids for p in chunk])
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():
            # The penalty covering only new tokens is exactly the original's behaviour (inputs_embeds only).
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty`")
            out = self.model.generate_from_embeds(embeds, mask, gen_cfg, tokenizer=self.processor.tokenizer)
        pad = self.model.config.text_config.pad_token_id
        answers = []
        for p, row in zip(chunk, out.tolist(), strict=True):
            while row and row[-1] == pad:  # finished rows are padded to the batch's length
                row.pop()
            answers.append(Answer(question=p.question, text=self.processor.decode_answer(row, prompt),
                                  token_ids=row))
        return answers
