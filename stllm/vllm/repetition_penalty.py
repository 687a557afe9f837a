"""Repetition penalty over the GENERATED tokens only, as a vLLM custom logits processor.

Why: the original ST-LLM (and the `hf` engine) calls HF `generate(inputs_embeds=...)`, whose `input_ids`
start empty, so HF's `RepetitionPenaltyLogitsProcessor` only ever sees new tokens. vLLM's built-in
`repetition_penalty` also penalises every prompt token (the whole system prompt and question), which changes
greedy outputs. The engine therefore sends `repetition_penalty=1.0` to vLLM and the real value in
`SamplingParams.extra_args[PENALTY_ARG]`, which this processor applies with HF's rule: each distinct generated
token's logit is divided by the penalty when positive, multiplied when negative. Both vLLM runners apply
custom processors to the float32 logits before temperature / min-p / top-k / top-p, HF's order too.

vLLM 0.32 has two model runners with different processor interfaces: V1 (CPU, and GPU when
`VLLM_USE_V2_MODEL_RUNNER=0`) and V2 (the GPU default when Triton is present). This class implements both,
so one `logits_processors=[LOGITS_PROCESSOR]` works whichever runner vLLM picks:
- V1: `__init__(vllm_config, device, is_pin_memory)`, `update_state(batch_update)`, `apply(logits)`; the
  batch update hands over a live reference to each request's generated-token list.
- V2: `__init__(vllm_config, req_states)`, `add_request(slot, params)`, `apply(logits, ctx)`; generated
  tokens are `req_states.all_token_ids[slot, prompt_len:total_len]`, read on the device (no host sync).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

PENALTY_ARG = "stllm_output_repetition_penalty"
LOGITS_PROCESSOR = "stllm.vllm.repetition_penalty:OutputRepetitionPenalty"


def _penalty(params: SamplingParams) -> float | None:
    value = (params.extra_args or {}).get(PENALTY_ARG)
    return None if value is None else float(value)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's rule on rows of `logits` (R, V): tokens with `seen` (R, V) get ÷penalty if > 0, ×penalty if < 0."""
    scale = torch.where(seen, penalty.to(logits.dtype)[:, None], torch.ones((), dtype=logits.dtype,
                                                                             device=logits.device))
    return torch.where(logits < 0, logits * scale, logits / scale)


class OutputRepetitionPenalty(V1LogitsProcessor, V2LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, *args: object) -> None:
        self.v2 = len(args) == 1
        if self.v2:
            (req_states,) = args
            assert isinstance(req_states, LogitsProcRequestState)
            self.req_states = req_states
            self.penalty_np = np.ones(req_states.max_num_reqs, dtype=np.float32)
            self.penalty_gpu = torch.ones(req_states.max_num_reqs, dtype=torch.float32, device=req_states.device)
            self.dirty = False
        else:
            # batch row -> (penalty, live reference to that request's generated token ids)
            self.rows: dict[int, tuple[float, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = _penalty(sampling_params)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{PENALTY_ARG} must be a finite number > 0, got {value}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy picks

    # ---- V1 ----------------------------------------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt: list[int] | None, output: list[int]):
            value = _penalty(params)
            return None if value is None or value == 1.0 else (value, output)

        process_dict_updates(self.rows, batch_update, new_state)

    def _apply_v1(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows = sorted(self.rows)
        seen = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
        for i, row in enumerate(rows):
            # -1 marks a not-yet-copied token under async scheduling; vLLM repairs the list before
            # sampling when custom processors are present, the filter is only a guard.
            toks = [t for t in self.rows[row][1] if t >= 0]
            seen[i, toks] = True
        penalty = torch.tensor([self.rows[r][0] for r in rows], dtype=torch.float32)
        index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        logits[index] = penalize(logits[index], seen.to(logits.device, non_blocking=True),
                                 penalty.to(logits.device, non_blocking=True))
        return logits

    # ---- V2 ----------------------------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        value = _penalty(sampling_params)
        value = 1.0 if value is None else value
        if self.penalty_np[req_idx] != value:
            self.penalty_np[req_idx] = value
            self.dirty = True
        return value != 1.0

    def apply_staged_writes(self) -> None:
        if self.dirty:  # pageable source: the copy reads the host array before returning
            self.penalty_gpu.copy_(torch.from_numpy(self.penalty_np))
            self.dirty = False

    def _apply_v2(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not np.any(self.penalty_np[ctx.idx_mapping_np] != 1.0):
            return logits
        rs = self.req_states
        slots = ctx.expanded_idx_mapping.long().clamp_min(0)
        width = min(int(ctx.seq_lens_upper_bound_np.max()), rs.all_token_ids.gpu.shape[1])
        tokens = rs.all_token_ids.gpu[slots, :width].long()  # (R, width): prompt then generated
        pos = torch.arange(width, device=logits.device)
        start = rs.prompt_len.gpu[slots].long()[:, None]
        end = rs.total_len.gpu[slots].long()[:, None]
        generated = (pos >= start) & (pos < end)
        vocab = logits.shape[1]
        # Scatter into an extra dummy column for non-generated positions: no False may overwrite a True.
        seen = torch.zeros(len(slots), vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, torch.where(generated, tokens.clamp(0, vocab - 1), vocab), True)
        return penalize(logits, seen[:, :vocab], self.penalty_gpu[slots])

    # ---- both --------------------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        return self._apply_v2(logits, ctx) if self.v2 else self._apply_v1(logits)


__all__ = ["OutputRepetitionPenalty", "PENALTY_ARG", "LOGITS_PROCESSOR", "penalize"]
