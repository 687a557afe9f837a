"""vLLM multimodal processing for ST-LLM: `multi_modal_data={"video": uint8 (T, H, W, 3)}` → model inputs.

Same facts as the `hf` engine (`STLLMProcessor`): the frames given are the model's frames (the engine samples
them with the checkpoint's rule; a clip of more than `num_frames` frames sent straight to vLLM is sampled here
with the same rule), shorter side → 224 bicubic + centre crop. The frames travel to the worker as uint8 224×224
(4× smaller than float pixels); the model normalises them with `normalize_frames`, as the `hf` processor.
The visual token count follows the item's frame count (`all` mode: T·32; a video shorter than `num_frames` has
fewer tokens, as in the original).

Fields per video (all `batched("video")`, i.e. one entry per video item):
- `video_frames`      uint8 (T, S, S, 3)
- `video_key`         int64 (2,): 128 bits of SHA-256 over the processed frames; keys the model's ViT
                      feature cache and the visual-embedding store (see `model.py`)
- `qformer_input_ids` int64 (Lq,): the question, BERT-tokenized (left-truncated) for the Q-Former

The question comes from the request's `mm_processor_kwargs={"question": ...}`. Prompt: ONE placeholder
token (the pad id, `[PAD]`) that is expanded to `config.num_visual_tokens(T)` copies, followed by the text
token ids; the engine sends `[pad] + STLLMProcessor.prompt_ids(question, prompt)` so the visual tokens come
first, then BOS (id 2) + the prompt format's text, exactly as the `hf` engine.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from transformers import BatchFeature, BertTokenizer
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from stllm.configuration_stllm import STLLMConfig
from stllm.processing_stllm import QFORMER_TOKENIZER_DIR, STLLMProcessor
from stllm.transforms import as_frames, resize_crop

QUESTION_KWARG = "question"
# Scope keys vLLM may add to `mm_processor_kwargs` on its own (always empty for this model).
_SCOPE_KWARGS = frozenset({"text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs"})


def prepare_frames(processor: STLLMProcessor, video: object) -> np.ndarray:
    """The model's frames → resized uint8 (T, S, S, 3); a clip longer than `num_frames` is sampled first (the
    checkpoint's rule). Idempotent on prepared frames."""
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    frames = as_frames(video)
    if frames.shape[0] > processor.config.num_frames:
        frames = processor.sample(frames)
    return np.ascontiguousarray(resize_crop(frames, processor.config.image_size))


def video_key(frames: np.ndarray) -> bytes:
    """128-bit content key of prepared frames (SHA-256 is hardware-accelerated: ~7 ms for 64×224²)."""
    h = hashlib.sha256(repr(frames.shape).encode())
    h.update(memoryview(np.ascontiguousarray(frames)).cast("B"))
    return h.digest()[:16]


def _same_content(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality of two C-contiguous uint8 arrays (a uint64 view: ~4× faster than `np.array_equal`)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.nbytes % 8 == 0 and a.flags.c_contiguous and b.flags.c_contiguous:
        return bool((a.reshape(-1).view(np.uint64) == b.reshape(-1).view(np.uint64)).all())
    return bool(np.array_equal(a, b))


class _PreparedClips:
    """The last few prepared clips of this process: (settings, private copy of the prepared frames, key).

    A video asked K questions reaches vLLM's processor as K requests with the same frames (and the engine
    prepares and keys them once before that). A byte comparison with a recent clip (~0.2 ms for 8×224²)
    replaces sampling + resizing + SHA-256 (~5 ms) for all of them but the first. Hits are exact: the
    stored copy is compared byte for byte, so a mutated or different clip can never get another's key.
    """

    def __init__(self, size: int = 4):
        self._items: deque[tuple[tuple[int, int], np.ndarray, bytes]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def get(self, settings: tuple[int, int], frames: np.ndarray) -> tuple[np.ndarray, bytes] | None:
        with self._lock:
            for s, prepared, key in self._items:
                if s == settings and _same_content(prepared, frames):
                    return prepared, key
        return None

    def put(self, settings: tuple[int, int], prepared: np.ndarray, key: bytes) -> None:
        with self._lock:
            self._items.appendleft((settings, prepared.copy(), key))


_PREPARED = _PreparedClips()


def prepare_and_key(processor: STLLMProcessor, video: object) -> tuple[np.ndarray, bytes]:
    """`prepare_frames` + `video_key`, reusing the work for a clip prepared moments ago (see `_PreparedClips`).

    The cache holds its own copy of the frames, so callers may keep (or change) the returned array."""
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    settings = (processor.config.num_frames, processor.config.image_size)
    if isinstance(video, np.ndarray) and (hit := _PREPARED.get(settings, video)) is not None:
        return np.ascontiguousarray(video), hit[1]  # equal bytes: the input already is the prepared clip
    frames = prepare_frames(processor, video)
    key = video_key(frames)
    _PREPARED.put(settings, frames, key)
    return frames, key


def key_to_tensor(key: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(key, dtype=np.int64).copy())


def tensor_to_key(t: torch.Tensor) -> str:
    """The hex form used by the model's caches and the worker RPC (`video_key(...).hex()`)."""
    return t.detach().to("cpu", torch.int64).numpy().tobytes().hex()


class STLLMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> STLLMConfig:
        return self.ctx.get_hf_config(STLLMConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": 1}  # one video per prompt: the released prompt format has a single video

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # No HF ProcessorMixin exists to introspect; `question` stays a flat kwarg.
        return {"text_kwargs": set(), "videos_kwargs": set()}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"video": self.get_num_video_tokens()}

    def get_num_video_tokens(self, num_frames: int | None = None) -> int:
        """Visual tokens of a video of `num_frames` prepared frames (default: the most, `config.num_frames`)."""
        return self.get_hf_config().num_visual_tokens(num_frames)

    def get_placeholder_token_id(self) -> int:
        return self.get_hf_config().text_config.pad_token_id

    @cached_property
    def stllm_processor(self) -> STLLMProcessor:
        model_dir = self.ctx.model_config.model
        qdir = os.path.join(model_dir, QFORMER_TOKENIZER_DIR)
        if not os.path.isdir(qdir):
            raise ValueError(f"{model_dir} has no {QFORMER_TOKENIZER_DIR}/ (convert the checkpoint first)")
        # Only sampling, resizing and the Q-Former tokenizer are used here; the LLaMA tokenizer is vLLM's.
        return STLLMProcessor(self.get_hf_config(), self.get_tokenizer(), BertTokenizer.from_pretrained(qdir))


class STLLMDummyInputsBuilder(BaseDummyInputsBuilder[STLLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        tokenizer = self.info.get_tokenizer()
        placeholder = tokenizer.convert_ids_to_tokens([self.info.get_placeholder_token_id()])[0]
        return placeholder * mm_counts.get("video", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        config = self.info.get_hf_config()
        return {
            "video": self._get_dummy_videos(
                width=config.image_size,
                height=config.image_size,
                num_frames=config.num_frames,
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video") if mm_options else None,
            )
        }


class STLLMMultiModalProcessor(BaseMultiModalProcessor[STLLMProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        unknown = sorted(k for k, v in hf_kwargs.items() if k != QUESTION_KWARG and not (k in _SCOPE_KWARGS and not v))
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown}; ST-LLM takes only {QUESTION_KWARG!r}")
        question = hf_kwargs.get(QUESTION_KWARG, "")  # no question (profiling dummies): empty Q-Former text
        if not isinstance(question, str):
            raise ValueError(f"mm_processor_kwargs[{QUESTION_KWARG!r}] must be a string")
        proc = self.info.stllm_processor
        prepared = [prepare_and_key(proc, v) for v in hf_data.get("videos", [])]
        q_ids = self.info.stllm_processor.qformer_inputs(question)[0][0]  # (Lq,), memoised; mask all ones
        return BatchFeature({
            "video_frames": [torch.from_numpy(f) for f, _ in prepared],
            "video_key": [key_to_tensor(k) for _, k in prepared],
            "qformer_input_ids": [q_ids.clone() for _ in prepared],
        })

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "video_frames": MultiModalFieldConfig.batched("video"),
            "video_key": MultiModalFieldConfig.batched("video", keep_on_cpu=True),  # read on the host
            "qformer_input_ids": MultiModalFieldConfig.batched("video"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        ph = self.info.get_placeholder_token_id()

        def replacement(item_idx: int) -> list[int]:
            frames = out_mm_kwargs["video"][item_idx]["video_frames"].data
            return [ph] * self.info.get_num_video_tokens(int(frames.shape[0]))

        return [PromptReplacement(modality="video", target=[ph], replacement=replacement)]


__all__ = [
    "STLLMProcessingInfo",
    "STLLMDummyInputsBuilder",
    "STLLMMultiModalProcessor",
    "prepare_frames",
    "prepare_and_key",
    "video_key",
    "key_to_tensor",
    "tensor_to_key",
    "QUESTION_KWARG",
]
