"""The vLLM engine's settings for video, its requests and its sampling: what `VLLMEngine.from_pretrained` asks of
vLLM (docs/engine.md), a video's prompts, and how `GenerationOptions` become `SamplingParams`.

Decoding parity with `hf`: greedy / sampling map to SamplingParams; stop at "###" and EOS (id 2), EOS never
first (`min_tokens=1`, the original's `min_length=1`); the repetition penalty covers generated tokens only,
like HF `generate(inputs_embeds=...)`, through the `OutputRepetitionPenalty` logits processor (vLLM's own
penalty would also hit every prompt token). Beam search is refused: vLLM's beam search has no repetition
penalty or stop strings and re-runs the multimodal preprocessing at every step, so it would not be ST-LLM's
decoding.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from stllm.configuration_stllm import STLLMConfig
from stllm.engine import MIN_NEW_TOKENS, GenerationOptions, VideoRequest, check_prompt_budget
from stllm.processing_stllm import STLLMProcessor
from stllm.transforms import as_frames
from stllm.vllm.processor import QUESTION_KWARG, prepare_and_key

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, SamplingParams

DTYPES = ("float32", "bfloat16", "float16")
_GIB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def vit_cache_bytes(config: STLLMConfig, dtype: str) -> int:
    """What the model's ViT feature cache can hold at most: STLLM_VIT_CACHE_SIZE videos of ViT features."""
    from stllm.vllm.model import VIT_CACHE_SIZE_ENV

    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    per_video = config.num_frames * tokens * v.hidden_size * _DTYPE_BYTES[dtype]
    return int(os.environ.get(VIT_CACHE_SIZE_ENV, "8")) * per_video


def cpu_kv_cache_bytes(config: STLLMConfig, dtype: str, max_model_len: int, max_num_seqs: int) -> int:
    """A KV cache that holds `max_num_seqs` sequences of `max_model_len` tokens, in [256 MiB, 4 GiB].

    Why: vLLM's CPU worker otherwise reserves `gpu_memory_utilization` (0.92) of the whole NUMA node and refuses
    to start when other processes use more than ~8% of it. An explicit KV cache size skips that check, so the
    engine starts on a busy laptop and takes what it needs, not the node. `VLLM_CPU_KVCACHE_SPACE` (GiB), when
    set, wins (vLLM reads it itself)."""
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim * _DTYPE_BYTES[dtype]
    need = per_token * max_model_len * max_num_seqs
    return int(min(max(need, _GIB // 4), 4 * _GIB))


def engine_args(model_dir: str, *, dtype: str | None, device: str, max_model_len: int | None,
                gpu_memory_utilization: float, max_batch_size: int | None,
                **kwargs: object) -> tuple[AsyncEngineArgs, STLLMConfig]:
    """vLLM's engine arguments for a converted checkpoint folder (see `VLLMEngine.from_pretrained`), and its
    config.

    CPU threads: vLLM binds its model worker to all cores but one (kept for its scheduler process, which
    busy-polls, and for this process's input processing). On a 2-core machine that is one worker thread;
    `VLLM_CPU_OMP_THREADS_BIND=0-1` (set before this call) gives the worker both cores: ~15-20% faster on an idle
    machine, but many times slower when other processes compete for the cores, as any two-thread OpenMP run
    there (the `hf` engine too). The default is kept. `enforce_eager=True` starts ~15-25 s sooner on CPU (no
    inductor compile) at ~10% slower LLM steps."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model folder {model_dir} does not exist (convert the released weights first)")
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform

    from stllm.vllm.model import WORKER_EXTENSION
    from stllm.vllm.plugin import register
    from stllm.vllm.repetition_penalty import LOGITS_PROCESSOR

    register()  # the entry point does this too; explicit so a non-installed checkout also works here
    platform = "cpu" if current_platform.is_cpu() else current_platform.device_type
    if device not in ("auto", platform):
        raise ValueError(f"device={device!r} but the installed vLLM build runs on {platform!r}")
    if dtype is None:
        dtype = "float32" if platform == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = STLLMConfig.from_pretrained(model_dir)
    args: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"video": 1},
        logits_processors=[LOGITS_PROCESSOR],
        worker_extension_cls=WORKER_EXTENSION,
        generation_config="vllm",  # decoding defaults come from GenerationOptions, not the folder
        # vLLM's periodic stats log lines stay off; our stat logger (`stllm.vllm.metrics`) still gets every step
        disable_log_stats=True,
    )
    # Video settings (docs/engine.md): every prefill holds the visual tokens + the prompt, so a step must fit
    # a few of them; chunked prefill lets decodes of running sequences go on beside a new prefill.
    # Prefix caching is off: the visual tokens come first and depend on the question (the Q-Former reads
    # it), so two prompts share a prefix only when video AND question are the same — nothing to reuse.
    per_prompt = config.num_visual_tokens() + 256
    args.update(max_num_seqs=max_batch_size or 64, max_num_batched_tokens=max(4096, 4 * per_prompt),
                enable_chunked_prefill=True, enable_prefix_caching=False)
    cache_bytes = vit_cache_bytes(config, dtype)
    if platform != "cpu":
        # The ViT feature cache lives beside the KV cache: reserve it inside the engine's share of the GPU.
        import torch

        total = torch.cuda.mem_get_info()[1]
        args["gpu_memory_utilization"] = max(0.1, gpu_memory_utilization - cache_bytes / total)
    args.update(kwargs)
    if platform == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_memory_bytes" not in kwargs:
        args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
            config, dtype, max_model_len or config.text_config.max_position_embeddings,
            int(args.get("max_num_seqs") or 16))
    return AsyncEngineArgs(**args), config


def sampling_params(options: GenerationOptions, config: STLLMConfig) -> SamplingParams:
    """The vLLM sampling of one call's options (greedy or sampled; beams refused: see the engine's docstring)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from stllm.vllm.repetition_penalty import PENALTY_ARG

    if options.num_beams > 1:
        raise ValueError(
            "num_beams > 1 is not supported by the vllm engine (vLLM's beam search has no repetition "
            "penalty or stop strings); use the hf engine for beam search"
        )
    rp = options.repetition_penalty_for(config.default_repetition_penalty)
    kwargs: dict[str, object] = dict(
        max_tokens=options.max_new_tokens,
        min_tokens=MIN_NEW_TOKENS,
        stop=[config.stop_string],
        repetition_penalty=1.0,  # vLLM's would penalise prompt tokens too; ours covers new tokens only
        extra_args={PENALTY_ARG: float(rp)} if rp != 1.0 else None,
        seed=options.seed,
        output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request: the finished answer
    )
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or 0)
    else:
        kwargs.update(temperature=0.0)
    return SamplingParams(**kwargs)


def prompts(processor: STLLMProcessor, req: VideoRequest, options: GenerationOptions,
            max_model_len: int) -> tuple[str, list[dict]]:
    """Validate one request and build its vLLM prompts, one per question: token prompt `[pad] + BOS(2) + system +
    "###Human: q ###Assistant: "` (the pad placeholder expands to the visual tokens, which therefore come first,
    as in the `hf` engine), the prepared frames, the question for the Q-Former, and the video's content key as its
    multimodal UUID; returns (content key, prompts). ValueError names what is wrong."""
    config = processor.config
    if not req.questions:
        raise ValueError("the request has no questions")
    frames = as_frames(req.frames) if req.sampled else processor.sample(req.frames)
    if not frames.flags.writeable:
        # a view of someone's buffer (the model stage's Arrow block in Ray's object store): vLLM's caches may
        # keep what it is given, and a view would keep the whole block alive with it
        frames = frames.copy()
    if frames.shape[0] > config.num_frames:
        raise ValueError(f"{frames.shape[0]} frames, but this engine serves at most the checkpoint's "
                         f"num_frames={config.num_frames} per video")
    frames, key_bytes = prepare_and_key(processor, frames)  # vLLM's processor then reuses both
    key = key_bytes.hex()
    placeholder = config.text_config.pad_token_id
    n_visual = config.num_visual_tokens(frames.shape[0])
    out = []
    for q in req.questions:
        ids = processor.process_question(q, options.prompt).input_ids  # validated, memoised
        check_prompt_budget(n_visual, len(ids), options.max_new_tokens, max_model_len)
        out.append({
            "prompt_token_ids": [placeholder, *ids],
            "multi_modal_data": {"video": frames},
            "mm_processor_kwargs": {QUESTION_KWARG: q},
            "multi_modal_uuids": {"video": [key]},
        })
    return key, out


__all__ = ["DTYPES", "prompts", "cpu_kv_cache_bytes", "engine_args", "sampling_params", "vit_cache_bytes"]
