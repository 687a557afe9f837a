"""The `vllm` engine: ST-LLM served by vLLM behind the shared `stllm.engine` interface (see `HFEngine`).

One vLLM request per (video, question): token prompt `[pad] + BOS(2) + system + "###Human: q ###Assistant: "`
(the pad placeholder expands to the visual tokens, which therefore come first, as in the `hf` engine),
`multi_modal_data={"video": prepared uint8 frames}`, `mm_processor_kwargs={"question": q}` and the video's
content key as its multimodal UUID (vLLM then hashes the key + question instead of 9.6 MB of pixels).
The ViT runs once per video inside the worker (feature LRU keyed by that content key, see `model.py`).

Decoding parity with `hf`: greedy / sampling map to SamplingParams; stop at "###" and EOS (id 2), EOS never
first (`min_tokens=1`, the original's `min_length=1`); the repetition penalty covers generated tokens only,
like HF `generate(inputs_embeds=...)`, through the `OutputRepetitionPenalty` logits processor (vLLM's own
penalty would also hit every prompt token).
Beam search is refused: vLLM's `LLM.beam_search` has no repetition penalty or stop strings and re-runs the
multimodal preprocessing at every step, so it would not be ST-LLM's decoding.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

import numpy as np

from stllm.configuration_stllm import STLLMConfig
from stllm.engine import (
    MIN_NEW_TOKENS,
    Answer,
    GenerationOptions,
    VideoRequest,
    VideoResult,
    check_prompt_budget,
)
from stllm.processing_stllm import STLLMProcessor
from stllm.transforms import as_frames
from stllm.vllm.feeder import EngineFeeder
from stllm.vllm.processor import QUESTION_KWARG, prepare_and_key

_DTYPES = ("float32", "bfloat16", "float16")
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


class VLLMEngine:
    kind = "vllm"

    def __init__(self, llm, processor: STLLMProcessor):  # llm: vllm.LLM (imported lazily)
        self.llm = llm
        self.processor = processor
        self.config: STLLMConfig = processor.config
        self.max_model_len: int = llm.llm_engine.model_config.max_model_len
        self.max_num_seqs: int = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self.last_timings: dict[str, float] = {}
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._wake_on_engine_death, name="stllm-engine-watchdog",
                                          daemon=True)
        self._watchdog.start()
        self.feeder = EngineFeeder(self)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        dtype: str | None = None,
        device: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        max_batch_size: int | None = None,
        **kwargs: object,
    ) -> VLLMEngine:
        """Start vLLM over a converted checkpoint folder (the same folder the `hf` engine loads).

        dtype: None = bfloat16 on GPU (the released shards' own dtype: nothing is rounded), float32 on CPU;
        "float16" is the original's runtime dtype. device: "auto" | "cpu" | "cuda"; the installed vLLM build
        decides the device, a mismatching request is an error. max_batch_size → vLLM `max_num_seqs`. Other
        kwargs go to `vllm.LLM` (e.g. `load_format="dummy"`, `enforce_eager=True`). On CPU the KV cache is sized
        from what the engine needs (`cpu_kv_cache_bytes`) unless `VLLM_CPU_KVCACHE_SPACE` (GiB) or
        `kv_cache_memory_bytes` says otherwise.

        CPU threads: vLLM binds its model worker to all cores but one (kept for its scheduler process, which
        busy-polls, and for this process's input processing). On a 2-core machine that is one worker thread;
        `VLLM_CPU_OMP_THREADS_BIND=0-1` (set before this call) gives the worker both cores: ~15-20% faster on an
        idle machine, but many times slower when other processes compete for the cores, as any two-thread
        OpenMP run there (the `hf` engine too). The default is kept. `enforce_eager=True` starts ~15-25 s
        sooner on CPU (no inductor compile) at ~10% slower LLM steps.
        """
        if not os.path.isdir(model_dir):
            raise ValueError(f"model folder {model_dir} does not exist (convert the released weights first)")
        from vllm import LLM
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
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        config = STLLMConfig.from_pretrained(model_dir)
        llm_kwargs: dict[str, object] = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"video": 1},
            logits_processors=[LOGITS_PROCESSOR],
            worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm",  # decoding defaults come from GenerationOptions, not the folder
        )
        # Video settings (docs/model.md, "The engines"): every prefill holds the visual tokens + the prompt, so a step
        # must fit a few of them; chunked prefill lets decodes of running sequences go on beside a new prefill.
        # Prefix caching is off: the visual tokens come first and depend on the question (the Q-Former reads
        # it), so two prompts share a prefix only when video AND question are the same — nothing to reuse.
        per_prompt = config.num_visual_tokens() + 256
        llm_kwargs.update(max_num_seqs=max_batch_size or 64, max_num_batched_tokens=max(4096, 4 * per_prompt),
                          enable_chunked_prefill=True, enable_prefix_caching=False)
        cache_bytes = vit_cache_bytes(config, dtype)
        if platform != "cpu":
            # The ViT feature cache lives beside the KV cache: reserve it inside the engine's share of the GPU.
            import torch

            total = torch.cuda.mem_get_info()[1]
            llm_kwargs["gpu_memory_utilization"] = max(0.1, gpu_memory_utilization - cache_bytes / total)
        llm_kwargs.update(kwargs)
        if platform == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_memory_bytes" not in kwargs:
            llm_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
                config, dtype, max_model_len or config.text_config.max_position_embeddings,
                int(llm_kwargs.get("max_num_seqs") or 16))
        llm = LLM(**llm_kwargs)
        llm.collective_rpc("stllm_clear_vit_cache")  # drop the start-up profiling dummy's ViT features
        return cls(llm, STLLMProcessor.from_pretrained(model_dir, config=config))

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def vit_forwards(self) -> int:
        """ViT forwards run by the (first) worker since start-up, start-up profiling included."""
        return int(self.llm.collective_rpc("stllm_vit_forwards")[0])

    def healthy(self) -> bool:
        """False once vLLM's engine core has died (its client marks that): only a restart helps then."""
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)
        return not getattr(resources, "engine_dead", False)

    def _wake_on_engine_death(self, poll_s: float = 0.5) -> None:
        """vLLM 0.32's sync client, when its engine core dies, marks the engine dead and shuts its output thread
        down without waking a caller blocked in `get_output()` or in a utility call (`collective_rpc`, `sleep`):
        those would wait forever. This watchdog hands such callers the EngineDeadError they should have got."""
        while not self._closing.wait(poll_s):
            if not self.healthy():
                from vllm.v1.engine.exceptions import EngineDeadError

                core = self.llm.llm_engine.engine_core
                queue = getattr(core, "outputs_queue", None)
                if queue is not None:
                    queue.put_nowait(EngineDeadError())
                for future in list(getattr(core, "utility_results", {}).values()):
                    if not future.done():
                        future.set_exception(EngineDeadError())
                return

    def close(self) -> None:
        """Stop the feeding loop and the engine-core processes now (otherwise they go at interpreter exit)."""
        self._closing.set()
        self.feeder.close()
        self.llm.llm_engine.engine_core.shutdown()

    def sampling_params(self, options: GenerationOptions):
        from vllm import SamplingParams

        from stllm.vllm.repetition_penalty import PENALTY_ARG

        if options.num_beams > 1:
            raise ValueError(
                "num_beams > 1 is not supported by the vllm engine (vLLM's beam search has no repetition "
                "penalty or stop strings); use the hf engine for beam search"
            )
        rp = options.repetition_penalty_for(self.config.default_repetition_penalty)
        kwargs: dict[str, object] = dict(
            max_tokens=options.max_new_tokens,
            min_tokens=MIN_NEW_TOKENS,
            stop=[self.config.stop_string],
            repetition_penalty=1.0,  # vLLM's would penalise prompt tokens too; ours covers new tokens only
            extra_args={PENALTY_ARG: float(rp)} if rp != 1.0 else None,
            seed=options.seed,
        )
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or 0)
        else:
            kwargs.update(temperature=0.0)
        return SamplingParams(**kwargs)

    def _prompts(self, req: VideoRequest, options: GenerationOptions) -> tuple[str, list[dict]]:
        """Validate one request and build its vLLM prompts; ValueError names what is wrong."""
        if not req.questions:
            raise ValueError("the request has no questions")
        frames = as_frames(req.frames) if req.sampled else self.processor.sample(req.frames)
        if not frames.flags.writeable:
            # a view of someone's buffer (the model stage's Arrow block in Ray's object store): vLLM's caches may
            # keep what it is given, and a view would keep the whole block alive with it
            frames = frames.copy()
        if frames.shape[0] > self.config.num_frames:
            raise ValueError(f"{frames.shape[0]} frames, but this engine serves at most the checkpoint's "
                             f"num_frames={self.config.num_frames} per video")
        frames, key_bytes = prepare_and_key(self.processor, frames)  # vLLM's processor then reuses both
        key = key_bytes.hex()
        placeholder = self.config.text_config.pad_token_id
        n_visual = self.config.num_visual_tokens(frames.shape[0])
        prompts = []
        for q in req.questions:
            ids = self.processor.process_question(q, options.prompt).input_ids  # validated, memoised
            check_prompt_budget(n_visual, len(ids), options.max_new_tokens, self.max_model_len)
            prompts.append({
                "prompt_token_ids": [placeholder, *ids],
                "multi_modal_data": {"video": frames},
                "mm_processor_kwargs": {QUESTION_KWARG: q},
                "multi_modal_uuids": {"video": [key]},
            })
        return key, prompts

    # ---- feeding: the loop thread of `stllm.vllm.feeder` calls these -------------------------------------

    def enqueue(self, requests: list[VideoRequest], options: GenerationOptions
                ) -> tuple[list[VideoResult], dict[int, str], list[tuple[str, int, int]]]:
        """Validate and enqueue a batch: (its results, {request: content key}, [(vLLM id, request, question
        index)]).
        A bad request fails alone (its result has `error`); a dead engine raises."""
        params = self.sampling_params(options)
        results = [VideoResult(video_id=r.video_id) for r in requests]
        keys: dict[int, str] = {}
        added: list[tuple[str, int, int]] = []
        # Video by video, so a video's questions reach the encoder back to back (ViT feature cache hits).
        for i, req in enumerate(requests):
            try:
                keys[i], prompts = self._prompts(req, options)
            except (ValueError, TypeError) as e:
                results[i].error = f"{type(e).__name__}: {e}"
                continue
            mine: list[tuple[str, int, int]] = []
            try:
                for qi, prompt in enumerate(prompts):
                    (rid,) = self.llm.enqueue(prompt, params, use_tqdm=False)
                    mine.append((rid, i, qi))
            except Exception as e:  # vLLM's input processing rejected it: fail this request alone
                if not self.healthy():
                    raise  # not the request's fault: the engine is gone (the caller restarts it)
                if mine:
                    self.llm.llm_engine.abort_request([m[0] for m in mine], internal=True)
                results[i].error = f"{type(e).__name__}: {e}"
                keys.pop(i)
                continue
            added += mine
        return results, keys, added

    def answer(self, question: str, output: object, options: GenerationOptions) -> Answer:
        token_ids = list(output.outputs[0].token_ids)  # type: ignore[attr-defined]
        return Answer(question=question, text=self.processor.decode_answer(token_ids, options.prompt),
                      token_ids=token_ids)

    def attach_embeddings(self, results: list[VideoResult], keys: dict[int, str]) -> None:
        if not keys:
            return
        order = sorted(keys)
        embeddings = self.llm.collective_rpc("stllm_visual_embeddings", args=([keys[i] for i in order],))[0]
        for i, emb in zip(order, embeddings, strict=True):
            if results[i].error:
                continue
            if emb is None:  # only if > 4096 newer videos evicted it meanwhile
                results[i].error = "visual embedding was evicted before it could be read"
                results[i].answers = []
            else:
                results[i].visual_embedding = np.asarray(emb, dtype=np.float32)

    # ---- the engine interface --------------------------------------------------------------------------

    def submit(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> Future:
        """Start a batch; the future resolves to its results when its own videos are done. Batches submitted
        while others run join the engine's running batch (no barrier between them)."""
        options = options or GenerationOptions()
        self.sampling_params(options)  # refuse bad options here, in the caller's thread
        return self.feeder.submit(requests, options)

    def generate(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> list[VideoResult]:
        t0 = time.perf_counter()
        results = self.submit(requests, options).result()
        self.last_timings = {"generate_s": time.perf_counter() - t0}
        return results

    def stats(self) -> dict[str, object]:
        """How busy the engine was since it started (see `stllm.vllm.feeder`)."""
        return self.feeder.stats()


__all__ = ["VLLMEngine"]
