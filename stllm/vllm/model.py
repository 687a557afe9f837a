"""ST-LLM as a vLLM model: vLLM's BLIP vision tower (+ BT-Adapter) → InstructBLIP Q-Former → projection →
video-input mode (all / mean / residual) → vLLM's LLaMA.

The maths is `stllm.modeling_stllm.STLLMVisualEncoder`, the same code the `hf` engine runs; this class only
supplies vLLM's layers behind its attribute names. The EVA ViT-g is vLLM's `BlipVisionModel` (fused `qkv` +
concat(q_bias, 0, v_bias) bias, exactly the converted checkpoint's layout, so no renaming is needed); its
`post_layernorm` (`ln_vision`) gets eps 1e-5 while the blocks keep 1e-6. vLLM's Q-Former (`blip2.py`) takes no
text input, so the InstructBLIP Q-Former, the BT-Adapter and the global-local MLP are the modules
`build_visual_modules` makes for the `transformers` model too. The LLM is vLLM's `LlamaForCausalLM`.

ViT once per video: the Q-Former reads the question, so every (video, question) pair is its own vLLM
multimodal item: vLLM's encoder cache is keyed by the data hash AND `mm_processor_kwargs`, and calls
`embed_multimodal` again for each question. The expensive, question-independent part is the ViT, so the
model keeps a small LRU of ViT features keyed by `video_key` (a content hash of the processed frames,
computed by the processor and shipped as a tensor field). A video asked K questions costs one ViT forward
as long as its K requests are encoded within `STLLM_VIT_CACHE_SIZE` (default 8) distinct videos of each
other; the engine enqueues requests video by video, and vLLM schedules encoder work first come first
served, so that holds. The model also counts ViT forwards (`vit_forwards`) and keeps each video's visual
embedding (mean ViT feature, L2-normalised, as the `hf` engine); the engine reads both through the worker
extension below (`AsyncLLM.collective_rpc`), which works in the multiprocess engine without pickled callables.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.blip import BlipVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from stllm.configuration_stllm import STLLMConfig
from stllm.modeling_stllm import STLLMVisualEncoder, build_visual_modules, visual_embedding
from stllm.processing_stllm import normalize_frames
from stllm.vllm.processor import (
    STLLMDummyInputsBuilder,
    STLLMMultiModalProcessor,
    STLLMProcessingInfo,
    tensor_to_key,
)

VIT_CACHE_SIZE_ENV = "STLLM_VIT_CACHE_SIZE"
WORKER_EXTENSION = "stllm.vllm.model.STLLMWorkerExtension"  # dotted qualname, unlike the others
_EMBEDDING_STORE_SIZE = 4096  # visual embeddings are C floats each; kept until evicted


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(0, capacity)

    def get_fresh(self, key: str):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: str, value) -> None:
        if self.capacity == 0:
            return
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class _SameInputMemoLinear(nn.Linear):
    """A Q-Former cross-attention key/value projection that reuses its last output when called again on the very
    same input tensor. A video's questions share one ViT feature tensor (from the feature cache), so the K/V
    projections of the ViT features run once per video instead of once per question (about 1/8 of a tiny
    Q-Former pass). Bit-identical: same op, same input. Only the feature cache's tensors reach it, and nothing
    writes to them in place; a freed input can never match (weak reference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memo = self.__dict__.get("_stllm_memo")
        if memo is not None and memo[0]() is x:
            return memo[1]
        out = super().forward(x)
        self.__dict__["_stllm_memo"] = (weakref.ref(x), out)  # plain attribute: not a registered buffer
        return out


def _memoize_cross_attention_kv(qformer: nn.Module) -> None:
    for layer in qformer.encoder.layer:
        if getattr(layer, "has_cross_attention", False):
            attn = layer.crossattention.attention
            for proj in (attn.key, attn.value):
                if type(proj) is nn.Linear:
                    proj.__class__ = _SameInputMemoLinear  # same parameters and names: loading is unchanged


def checkpoint_keys(config: STLLMConfig) -> set[str]:
    """The exact key set of a converted checkpoint: the `transformers` model's state dict, built on meta."""
    from stllm.modeling_stllm import STLLMForConditionalGeneration

    with torch.device("meta"):
        reference = STLLMForConditionalGeneration(copy.deepcopy(config))
    return set(reference.state_dict())


def _items(x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    # batched fields arrive stacked when shapes agree, as a list otherwise
    return list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)


@MULTIMODAL_REGISTRY.register_processor(
    STLLMMultiModalProcessor, info=STLLMProcessingInfo, dummy_inputs=STLLMDummyInputsBuilder
)
class STLLMVLLMModel(STLLMVisualEncoder, nn.Module, SupportsMultiModal):
    # Checkpoint (project format, see stllm/convert.py) → this module. Every other name is identical:
    #   vision_model.*   → vLLM BlipVisionModel (same names; qkv already fused on disk)
    #   btadapter.*, query_tokens, qformer.*, language_projection.*, global_{down,up}_proj.* → same
    #   language_model.model.*, language_model.lm_head.* → vLLM LlamaForCausalLM (it stacks q/k/v, gate/up)
    # Dropped on purpose: the training-only MVM head.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"mvm_decoder.": None})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("video"):
            return "[PAD]"  # the released tokenizer's pad token (id 32000), expanded by the processor
        raise ValueError("ST-LLM supports only the video modality")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: STLLMConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        vcfg, tcfg = config.vision_config, config.text_config

        with self._mark_tower_model(vllm_config, "video"):
            self.vision_model = BlipVisionModel(vcfg, quant_config, prefix=maybe_prefix(prefix, "vision_model"))
            # `ln_vision` eps is 1e-5; BlipVisionModel gives post_layernorm the blocks' 1e-6.
            self.vision_model.post_layernorm.eps = config.vision_post_layernorm_eps
            for name, module in build_visual_modules(config).items():
                setattr(self, name, module)
            _memoize_cross_attention_kv(self.qformer)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=tcfg,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

        # normalize_frames' constants, on the device (the frames travel as uint8).
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.vit_forwards = 0  # videos encoded
        self.vit_passes = 0  # ViT forward calls (several videos per call when they arrive together)
        self._vit_cache = _LRU(int(os.environ.get(VIT_CACHE_SIZE_ENV, "8")))
        self._visual_embeddings = _LRU(_EMBEDDING_STORE_SIZE)

    # ---- visual encoding (the maths is STLLMVisualEncoder's) ----------------------------------------

    def _store(self, key: str, features: torch.Tensor) -> None:
        self._vit_cache.put(key, features)
        self._visual_embeddings.put(key, visual_embedding(features).cpu())

    def _vision_features(self, key: str, frames: torch.Tensor) -> torch.Tensor:
        features = self._vit_cache.get_fresh(key)
        if features is None:  # evicted between `_encode_missing` and here (a cache smaller than one call)
            features = self.get_vision_features(normalize_frames(frames, self.pixel_mean, self.pixel_std))
            self.vit_forwards += 1
            self.vit_passes += 1
            self._store(key, features)
        return features

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        frames = kwargs.get("video_frames")
        if frames is None:
            return []
        keys, q_ids = kwargs.get("video_key"), kwargs.get("qformer_input_ids")
        if keys is None or q_ids is None:
            raise ValueError("video_frames came without video_key / qformer_input_ids")
        items = list(zip(_items(frames), [tensor_to_key(k) for k in _items(keys)], _items(q_ids), strict=True))
        for f, _, _ in items:
            if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != torch.uint8:
                raise ValueError(f"video_frames must be uint8 (T, S, S, 3), got {tuple(f.shape)} {f.dtype}")
        self._encode_missing(items)
        return [self.get_video_tokens(self.get_frame_tokens(self._vision_features(k, f), q)) for f, k, q in items]

    def _encode_missing(self, items: list[tuple[torch.Tensor, str, torch.Tensor]]) -> None:
        """The ViT over every video of this call that the cache lacks, in ONE forward per frame count (videos
        that arrive together share the pass; a video is still encoded once, whatever its questions)."""
        todo: dict[str, torch.Tensor] = {}
        for f, k, _ in items:
            if k not in todo and self._vit_cache.get_fresh(k) is None:
                todo[k] = f
        by_t: dict[int, list[str]] = {}
        for k, f in todo.items():
            by_t.setdefault(f.shape[0], []).append(k)
        for t, group in by_t.items():
            frames = torch.cat([todo[k] for k in group])  # (n·T, S, S, 3); the BT-Adapter splits it per video
            features = self.get_vision_features(normalize_frames(frames, self.pixel_mean, self.pixel_std), t)
            for j, k in enumerate(group):
                self._store(k, features[j * t:(j + 1) * t])
            self.vit_forwards += len(group)
            self.vit_passes += 1

    # ---- LLM -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ---- weights ---------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict: the checkpoint must hold exactly the converted format's keys, and every parameter here
        must be loaded. Errors name the offending keys (vLLM's own checks skip some of both)."""
        expected = checkpoint_keys(self.config)
        seen: set[str] = set()

        def known(ws: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, w in ws:
                seen.add(name)
                if name in expected:  # unknown ones are reported below, all at once
                    yield name, w

        loaded = AutoWeightsLoader(self).load_weights(known(weights), mapper=self.hf_to_vllm_mapper)
        not_loaded = set(dict(self.named_parameters())) - loaded
        if report := weight_mismatch(expected, seen, not_loaded):
            raise ValueError(report)
        return loaded


def weight_mismatch(expected: set[str], seen: set[str], not_loaded: set[str]) -> str | None:
    """None when the checkpoint keys equal `expected` and every parameter was loaded; else the message."""
    problems = []
    for what, names in (("unexpected keys", seen - expected), ("missing keys", expected - seen),
                        ("parameters not loaded", not_loaded)):
        if names:
            problems.append(f"{what} ({len(names)}): {', '.join(sorted(names)[:50])}")
    return "checkpoint does not match the ST-LLM vLLM model: " + "; ".join(problems) if problems else None


class STLLMWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls=WORKER_EXTENSION`); called with
    `VLLMEngine.collective_rpc("stllm_...")`. Results are plain lists/dicts, so no pickle is needed."""

    def _stllm_model(self) -> STLLMVLLMModel:
        model = self.get_model()  # type: ignore[attr-defined]
        if not isinstance(model, STLLMVLLMModel):
            raise TypeError(f"the served model is {type(model).__name__}, not ST-LLM")
        return model

    def stllm_vit_forwards(self) -> int:
        return self._stllm_model().vit_forwards

    def stllm_vit_passes(self) -> int:
        return self._stllm_model().vit_passes

    def stllm_visual_embeddings(self, keys: list[str]) -> list[list[float] | None]:
        store = self._stllm_model()._visual_embeddings
        return [None if (v := store.get(k)) is None else v.tolist() for k in keys]

    def stllm_clear_vit_cache(self) -> None:
        self._stllm_model()._vit_cache.clear()


__all__ = [
    "STLLMVLLMModel", "STLLMWorkerExtension", "WORKER_EXTENSION", "VIT_CACHE_SIZE_ENV", "checkpoint_keys",
    "weight_mismatch",
]
