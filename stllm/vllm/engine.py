"""The `vllm` engine: ST-LLM served by vLLM's async engine (`AsyncLLM`) behind the shared `stllm.engine` interface.

One vLLM request per (video, question): token prompt `[pad] + BOS(2) + system + "###Human: q ###Assistant: "`
(the pad placeholder expands to the visual tokens, which therefore come first, as in the `hf` engine),
`multi_modal_data={"video": prepared uint8 frames}`, `mm_processor_kwargs={"question": q}` and the video's
content key as its multimodal UUID (vLLM then hashes the key + question instead of 9.6 MB of pixels).
The ViT runs once per video inside the worker (feature LRU keyed by that content key, see `model.py`).

Feeding: one thread runs an asyncio loop that owns the `AsyncLLM`. `submit` (any thread) schedules a batch's
coroutine there and returns a concurrent future. A batch's requests are added back to back (a video's
questions in a row, so they meet its cached ViT features); they join the requests of the batches already
running (vLLM's continuous batching, no barrier between batches), and the batch's future resolves as soon as
its own outputs are in. An idle engine's scheduler is paused while batches are added, so videos that arrive
together share one ViT call (otherwise vLLM steps on the first request alone). A request vLLM refuses fails
its video alone; a dead engine core fails every batch in flight at once (`EngineDeadError`) and `healthy()`
turns False. `close()` finishes what is in flight, then shuts vLLM down and stops, by process id, any of the
processes vLLM started that outlived that (a killed engine core leaves its worker to init). Statistics come from
vLLM's own per-step metrics (`stllm.vllm.metrics`).

Decoding parity with `hf` and the settings for video: `stllm.vllm.settings`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from stllm.configuration_stllm import STLLMConfig
from stllm.engine import (
    Answer,
    GenerationOptions,
    VideoRequest,
    VideoResult,
)
from stllm.processing_stllm import STLLMProcessor
from stllm.vllm import processes, settings

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

    from stllm.vllm.metrics import EngineMetrics

T = TypeVar("T")
_DEATH_POLL_S = 0.2  # how soon waiters learn that the engine core died
_FAILED = ("abort", "error")  # finish reasons of a request that did not complete


class VLLMEngine:
    kind = "vllm"

    def __init__(self, engine_args: AsyncEngineArgs, processor: STLLMProcessor):
        """Start vLLM's async engine on a loop thread of its own (see the module docstring)."""
        self.processor = processor
        self.config: STLLMConfig = processor.config
        self.last_timings: dict[str, float] = {}
        self.metrics: EngineMetrics | None = None
        self._ids = itertools.count()
        self._closed = False
        self._inflight: set[Future] = set()
        self._lock = threading.Lock()  # submit vs close
        # Frames are sampled, resized and hashed here, one batch after another, off the loop: vLLM's output
        # handler shares the loop and must not wait behind them.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stllm-vllm-prepare")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stllm-vllm-engine", daemon=True)
        self._thread.start()
        before = processes.children()
        try:
            self.llm: AsyncLLM = self._run(self._start(engine_args))
        except BaseException:
            self._stop_loop()
            raise
        self.processes = processes.started_since(before)  # vLLM's engine core and its workers
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.max_num_seqs: int = self.llm.vllm_config.scheduler_config.max_num_seqs

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
        kwargs are `vllm.AsyncEngineArgs` fields (e.g. `load_format="dummy"`, `enforce_eager=True`). On CPU the
        KV cache is sized from what the engine needs (`cpu_kv_cache_bytes`) unless `VLLM_CPU_KVCACHE_SPACE` (GiB)
        or `kv_cache_memory_bytes` says otherwise.

        CPU threads and start-up: see `stllm.vllm.settings.engine_args`.
        """
        args, config = settings.engine_args(model_dir, dtype=dtype, device=device, max_model_len=max_model_len,
                                   gpu_memory_utilization=gpu_memory_utilization, max_batch_size=max_batch_size,
                                   **kwargs)
        return cls(args, STLLMProcessor.from_pretrained(model_dir, config=config))

    async def _start(self, engine_args: AsyncEngineArgs) -> AsyncLLM:
        from vllm.v1.engine.async_llm import AsyncLLM

        from stllm.vllm.metrics import EngineMetrics

        def metrics_logger(vllm_config, engine_index: int) -> EngineMetrics:  # vLLM's StatLoggerFactory
            self.metrics = EngineMetrics(vllm_config, engine_index)
            return self.metrics

        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[metrics_logger])
        try:
            if self.metrics is not None:
                self.metrics.unfinished = llm.get_num_unfinished_requests
            self._dead = asyncio.Event()
            self._to_add: asyncio.Queue = asyncio.Queue()
            # the loop keeps only weak references to tasks
            self._tasks = [asyncio.create_task(self._watch(llm)), asyncio.create_task(self._adder())]
            await llm.collective_rpc("stllm_clear_vit_cache")  # drop the start-up profiling dummy's ViT features
        except BaseException:
            llm.shutdown()
            raise
        return llm

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    # ---- health, closing ------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False once vLLM's engine core has died (vLLM's `errored`) or the loop thread is gone: only a restart
        helps then."""
        return self._thread.is_alive() and not self.llm.errored

    async def _watch(self, llm: AsyncLLM) -> None:
        """Wake every waiter when the engine dies. vLLM fails the requests it tracks with EngineDeadError, but a
        utility call (`collective_rpc`, `pause_generation`) in flight when the core dies is never answered."""
        while not llm.errored:
            await asyncio.sleep(_DEATH_POLL_S)
        self._dead.set()

    async def _until_dead(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or EngineDeadError as soon as the engine is found dead."""
        from vllm.v1.engine.exceptions import EngineDeadError

        task = asyncio.ensure_future(awaitable)
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise EngineDeadError()

    def close(self, timeout_s: float = 300.0) -> None:
        """Finish the batches in flight (each gets its results), then shut vLLM down (its engine-core
        processes); later submits fail. A dead engine's batches have failed already: closing does not wait."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inflight = list(self._inflight)
        if inflight:
            from concurrent.futures import wait

            wait(inflight, timeout=timeout_s)
        try:
            if self._thread.is_alive():
                self._run(self._shutdown(), timeout_s=60.0)
        finally:
            self._stop_loop()
            processes.stop(self.processes)

    async def _shutdown(self) -> None:
        self.llm.shutdown()
        # what is left on the loop (ours, vLLM's output handler) ends here, not as "destroyed but pending"
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the engine's loop from another thread and wait for it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking engine call from the engine's own loop thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # ---- worker RPCs (the model's ViT counters and caches) ---------------------------------------------------

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call a method of the worker extension (`stllm.vllm.model.STLLMWorkerExtension`) on every worker."""
        return self._run(self._until_dead(self.llm.collective_rpc(method, args=args)))

    @property
    def vit_forwards(self) -> int:
        """Videos the (first) worker's ViT encoded since start-up, start-up profiling included."""
        return int(self.collective_rpc("stllm_vit_forwards")[0])

    @property
    def vit_passes(self) -> int:
        """ViT forward calls of the (first) worker (several videos per call when they arrive together)."""
        return int(self.collective_rpc("stllm_vit_passes")[0])

    def reset_caches(self) -> None:
        """Forget every video seen: the model's ViT features and vLLM's multimodal caches (benchmarks)."""
        self.collective_rpc("stllm_clear_vit_cache")
        self._run(self._until_dead(self.llm.reset_mm_cache()))

    # ---- requests -------------------------------------------------------------------------------------------

    def sampling_params(self, options: GenerationOptions) -> SamplingParams:
        return settings.sampling_params(options, self.config)

    def _prepare(self, requests: list[VideoRequest], options: GenerationOptions
                 ) -> tuple[list[VideoResult], list[tuple[int, str, list[dict]]]]:
        """Each request's result and, for the valid ones, (index, content key, prompts); a bad request fails
        alone."""
        results = [VideoResult(video_id=r.video_id) for r in requests]
        prepared = []
        for i, req in enumerate(requests):
            try:
                key, prompts = settings.prompts(self.processor, req, options, self.max_model_len)
            except (ValueError, TypeError) as e:
                results[i].error = f"{type(e).__name__}: {e}"
                continue
            prepared.append((i, key, prompts))
        return results, prepared

    def answer(self, question: str, output: RequestOutput, options: GenerationOptions) -> Answer:
        token_ids = list(output.outputs[0].token_ids)
        return Answer(question=question, text=self.processor.decode_answer(token_ids, options.prompt),
                      token_ids=token_ids)

    async def _generate(self, requests: list[VideoRequest], options: GenerationOptions,
                        params: SamplingParams) -> list[VideoResult]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.llm.errored:
            raise EngineDeadError()
        loop = asyncio.get_running_loop()
        results, prepared = await loop.run_in_executor(self._prepare_pool, self._prepare, requests, options)
        added = await self._add(prepared, params, results)
        # every output of the batch; a dead engine fails them all (vLLM's EngineDeadError, or ours if vLLM
        # missed a request that was being added when the core died)
        outputs = await self._until_dead(asyncio.gather(*(self._collect(c) for _, _, cs in added for c in cs)))
        it = iter(outputs)
        keys: dict[int, str] = {}
        for i, key, collectors in added:
            mine = [next(it) for _ in collectors]
            failed = [o for o in mine if o.outputs[0].finish_reason in _FAILED]
            if failed:
                results[i].error = f"vLLM ended request {failed[0].request_id}: {failed[0].outputs[0].finish_reason}"
                continue
            questions = requests[i].questions
            results[i].answers = [self.answer(q, o, options) for q, o in zip(questions, mine, strict=True)]
            keys[i] = key
        await self._attach_embeddings(results, keys)
        return results

    async def _add(self, prepared: list[tuple[int, str, list[dict]]], params: SamplingParams,
                   results: list[VideoResult]) -> list[tuple[int, str, list[RequestOutputCollector]]]:
        """Hand a batch's requests to vLLM (through the adding task): [(index, key, output collectors)]."""
        added: asyncio.Future = asyncio.get_running_loop().create_future()
        self._to_add.put_nowait((prepared, params, results, added))
        return await self._until_dead(added)

    async def _adder(self) -> None:
        """The one task that adds requests, batch after batch, video by video (a video's questions back to
        back). An idle engine's scheduler is paused until every batch waiting here is in, so their videos share
        the first ViT call; a busy engine is never paused (new requests join its running batch)."""
        while True:
            item = await self._to_add.get()
            paused = False
            try:
                if self.llm.get_num_unfinished_requests() == 0:
                    await self._until_dead(self.llm.pause_generation(mode="keep", clear_cache=False))
                    paused = True
                while item is not None:
                    await self._add_batch(*item)
                    item = self._next_to_add()
            except Exception as e:  # the engine died (or refused the pause): this batch and the ones queued fail
                while item is not None:
                    if not item[3].done():
                        item[3].set_exception(e)
                    item = self._next_to_add()
            finally:
                if paused and not self.llm.errored:
                    try:
                        await self._until_dead(self.llm.resume_generation())
                    except Exception:  # noqa: BLE001 — the engine died: the batches in flight learn it from vLLM
                        pass

    def _next_to_add(self) -> tuple | None:
        return None if self._to_add.empty() else self._to_add.get_nowait()

    async def _add_batch(self, prepared: list[tuple[int, str, list[dict]]], params: SamplingParams,
                         results: list[VideoResult], added: asyncio.Future) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if added.done():  # the caller gave up (cancelled) while the batch waited
            return
        done: list[tuple[int, str, list[RequestOutputCollector]]] = []
        try:
            for i, key, prompts in prepared:
                collectors: list[RequestOutputCollector] = []
                try:
                    for prompt in prompts:
                        collectors.append(await self.llm.add_request(f"stllm-{next(self._ids)}", prompt, params))
                except EngineDeadError:
                    raise
                except Exception as e:  # vLLM's input processing refused it: this video fails alone
                    if self.llm.errored:
                        raise EngineDeadError() from e
                    if collectors:
                        await self.llm.abort([c.request_id for c in collectors], internal=True)
                    results[i].error = f"{type(e).__name__}: {e}"
                    continue
                done.append((i, key, collectors))
        except EngineDeadError:
            raise  # the adder fails this batch and the ones queued
        except asyncio.CancelledError:  # the engine is shutting down
            added.cancel()
            raise
        except Exception as e:  # anything else fails this batch alone
            await self._abort(done)
            if not added.done():
                added.set_exception(e)
            return
        if added.done():  # cancelled meanwhile: nobody will read these outputs
            await self._abort(done)
        else:
            added.set_result(done)

    async def _abort(self, added: list[tuple[int, str, list[RequestOutputCollector]]]) -> None:
        ids = [c.request_id for _, _, cs in added for c in cs]
        if ids and not self.llm.errored:
            await self.llm.abort(ids, internal=True)

    async def _collect(self, collector: RequestOutputCollector) -> RequestOutput:
        """A request's final output (FINAL_ONLY: one); vLLM raises EngineDeadError here when the core dies."""
        try:
            while True:
                out = collector.get_nowait() or await collector.get()
                if out.finished:
                    return out
        except asyncio.CancelledError:
            if not self.llm.errored:
                await self.llm.abort(collector.request_id, internal=True)
            raise
        finally:
            collector.close()

    async def _attach_embeddings(self, results: list[VideoResult], keys: dict[int, str]) -> None:
        if not keys:
            return
        order = sorted(keys)
        rpc = self.llm.collective_rpc("stllm_visual_embeddings", args=([keys[i] for i in order],))
        embeddings = (await self._until_dead(rpc))[0]
        for i, emb in zip(order, embeddings, strict=True):
            if emb is None:  # only if > 4096 newer videos evicted it meanwhile
                results[i].error = "visual embedding was evicted before it could be read"
                results[i].answers = []
            else:
                results[i].visual_embedding = np.asarray(emb, dtype=np.float32)

    # ---- the engine interface -------------------------------------------------------------------------------

    def submit(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> Future:
        """Start a batch; the future resolves to its results when its own videos are done. Batches submitted
        while others run join the engine's running batch (no barrier between them)."""
        options = options or GenerationOptions()
        params = self.sampling_params(options)  # refuse bad options here, in the caller's thread
        with self._lock:
            if self._closed:
                future: Future = Future()
                future.set_exception(RuntimeError("the engine is closed"))
                return future
            if self.metrics is not None:
                self.metrics.batch_submitted()
            future = asyncio.run_coroutine_threadsafe(self._generate(list(requests), options, params), self._loop)
            self._inflight.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._inflight.discard(future)
        if self.metrics is not None:
            self.metrics.batch_done()

    def generate(self, requests: list[VideoRequest], options: GenerationOptions | None = None) -> list[VideoResult]:
        t0 = time.perf_counter()
        results = self.submit(requests, options).result()
        self.last_timings = {"generate_s": time.perf_counter() - t0}
        return results

    def stats(self) -> dict[str, object]:
        """vLLM's own metrics since start-up or `reset_stats()` (`stllm.vllm.metrics`; docs/engine.md says what
        each key means)."""
        return self.metrics.snapshot() if self.metrics is not None else {}

    def reset_stats(self) -> None:
        """Start the figures of `stats()` again (a benchmark's timed part after its warm-up)."""
        if self.metrics is not None:
            self.metrics.reset()


__all__ = ["VLLMEngine"]
