"""The model stage: `decoded_schema` rows in, `modeled_schema` rows out (schemas/stages.py).

An actor holds one engine (hf or vllm, `stllm.load_engine`) and generates, for each video or moment, what its row
asks for — the caption, the questions whose answers are missing — with one ViT pass per video, then the captions'
text embeddings (`pipeline.stages.embed`) in the same process. Several batches are on the engine at once: each call
awaits its own results while the engine works on all of them. A failed request fails its row; a broken ENGINE is
different: the actor exits, Ray restarts it with a fresh engine and retries its batch, so one dead engine never
turns every later video into an error.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.proc_stats import descendants, process_cpu_s
from pipeline.redact import redact
from pipeline.run_stats import Reporter
from pipeline.stages import arrow_batch
from pipeline.stages.embed import TextEmbedder
from schemas.stages import ERROR_FIELDS, QA_TYPE, SEGMENT, WORK, modeled_schema

log = logging.getLogger(__name__)
ENGINE_EXIT_CODE = 75  # the model actor's exit status when its engine broke (Ray restarts it)
ERROR_TYPES = {f.name: f.type for f in ERROR_FIELDS}


def is_model_work(kind: Any) -> bool:
    """Rows the engine runs on: videos, and the moments of long recordings."""
    return kind in (WORK, SEGMENT)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS after a batch (glibc keeps them otherwise; RSS would creep)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ModelStage:
    def __init__(self, engine: str, model_path: str, dtype: str | None, device: str, options: Any,
                 engine_kwargs: dict[str, Any] | None = None, embedder: dict[str, Any] | None = None,
                 batches_in_flight: int = 4, hub: Any = None):
        from pipeline.paths import resolve_model_path
        from stllm import load_engine

        self.engine = load_engine(engine, resolve_model_path(model_path), dtype=dtype, device=device,
                                  **(engine_kwargs or {}))
        self.options = options  # stllm.engine.GenerationOptions
        # the embedder waits for the text of at most half of the batches in flight (see TextBatcher)
        self.embed = (TextEmbedder(**embedder, batches_together=max(1, batches_in_flight // 2))
                      if embedder is not None else None)
        # Ray Data may hand over more than `batches_in_flight` batches (each call runs a few of its bundle's
        # batches at once): the rest wait here, not in the engine's queue.
        self._slots = asyncio.Semaphore(batches_in_flight)
        self._on_engine = 0  # batches handed to the engine and not answered yet
        self.peak_on_engine = 0
        self.schema = modeled_schema()
        self.report = Reporter(hub, "model")
        self._engine_pids: list[int] | None = None
        if self.engine.kind == "vllm":
            # The model runs in vLLM's own worker processes; what runs here (the text embedder, beside the
            # engine's steps) takes one thread, so it does not fight the engine's worker for its cores.
            import torch

            torch.set_num_threads(1)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Async: Ray Data hands this actor several batches at once (`runtime.model_batches_in_flight`); each
        awaits its own results while the engine works on all of them, and embeds its text on the embedder's
        thread, so the engine is never idle waiting for a batch boundary or for the embedder. The frames are read
        in place from the Arrow batch (`pipeline.stages.arrow_batch`); only the new columns are built."""
        from stllm.engine import VideoRequest

        t0 = time.perf_counter()
        n = batch.num_rows
        kinds = arrow_batch.values(batch, "kind", WORK)
        errors = {f: arrow_batch.values(batch, f) for f in ERROR_TYPES}
        asked = self._asked(batch, kinds)
        todo = [i for i in range(n) if is_model_work(kinds[i]) and errors["error_stage"][i] is None and asked[i][1]]
        video_ids = arrow_batch.values(batch, "video_id")
        ids = [s if isinstance(s, str) else v  # a moment's own id, else its video's
               for s, v in zip(arrow_batch.values(batch, "segment_id"), video_ids, strict=True)]
        shapes = batch.column("frames_shape")
        # The decode stage sampled these frames (of the file, or of a moment): the engine takes them as they are.
        requests = [VideoRequest(ids[i], arrow_batch.binary_view(batch, "frames", i, shapes[i].as_py()),
                                 asked[i][1], sampled=True) for i in todo]
        captions: list[str | None] = [None] * n
        answers: list[list[dict[str, str]]] = [[] for _ in range(n)]
        visual: list[np.ndarray | None] = [None] * n
        try:
            async with self._slots:
                self._on_engine += 1
                self.peak_on_engine = max(self.peak_on_engine, self._on_engine)
                try:
                    results = (await asyncio.wrap_future(self.engine.submit(requests, self.options))
                               if requests else [])
                finally:
                    self._on_engine -= 1
        except Exception as e:  # noqa: BLE001 — a broken batch fails its rows, not the job
            self._exit_if_engine_broke(e)
            results = []
            for i in todo:
                errors["error_stage"][i], errors["error_type"][i] = "model", type(e).__name__
                errors["error_message"][i] = redact(f"{e}\n{traceback.format_exc(limit=3)}")
        self._exit_if_engine_broke(None)  # a dead engine's per-request errors are not the videos' fault
        calls = [0] * n
        for i, res in zip(todo, results, strict=False):
            calls[i] = 1
            if not res.ok:
                errors["error_stage"][i], errors["error_type"][i] = "model", "ValueError"
                errors["error_message"][i] = res.error
                continue
            generated = res.answers
            if asked[i][0]:  # the caption was asked first
                captions[i], generated = generated[0].text, generated[1:]
            answers[i] = [{"question": a.question, "answer": a.text} for a in generated]
            visual[i] = res.visual_embedding
        columns = {"caption": pa.array(captions, pa.string()), "answers": pa.array(answers, QA_TYPE),
                   "visual_embedding": arrow_batch.vectors(visual),
                   **{f: pa.array(errors[f], t) for f, t in ERROR_TYPES.items()},
                   "model_calls": pa.array(calls, pa.int64()),  # the rows the engine ran for
                   "model_s": pa.array([(time.perf_counter() - t0) / max(n, 1)] * n, pa.float64())}
        out = batch.drop_columns(["frames", "frames_shape"])
        for name, column in columns.items():
            out = arrow_batch.with_column(out, name, column)
        if self.embed is not None:
            # on the embedder's thread, other batches go on meanwhile; it waits for their text while there is some
            out = await self.embed.embed(out, more_coming=self._on_engine > 0)
        else:
            out = arrow_batch.with_column(out, "caption_embedding", arrow_batch.vectors([None] * n))
            out = arrow_batch.with_column(out, "embed_s", [0.0] * n, pa.float64())
        self.report.add(self._figures, rows=n, busy_s=time.perf_counter() - t0,
                        errors=sum(e is not None for e in errors["error_stage"]))
        release_freed_memory()
        return out.select(self.schema.names).cast(self.schema)

    def _figures(self) -> dict[str, Any]:
        """What this actor reports besides its counters: its engine's statistics (vLLM's own), the most batches
        it had on the engine at once, and the CPU seconds of this actor and of its engine's processes."""
        if self._engine_pids is None:
            self._engine_pids = descendants(os.getpid())
        return {"engine": self.engine.stats() or {}, "peak_on_engine": self.peak_on_engine,
                "actor_cpu_s": process_cpu_s(os.getpid()),
                "engine_cpu_s": sum(process_cpu_s(p) for p in self._engine_pids)}

    @staticmethod
    def _asked(batch: pa.Table, kinds: list[Any]) -> list[tuple[bool, list[str]]]:
        """Per row: (whether the caption is asked, the prompts to generate — caption prompt first): only the cells
        the listing found missing (a video's own, or its moments' for a moment's row)."""
        cols = {c: arrow_batch.values(batch, c) for c in ("caption_prompt", "questions", "segment_caption_prompt",
                                                          "segment_questions")}
        out = []
        for i, kind in enumerate(kinds):
            pre = "segment_" if kind == SEGMENT else ""
            cap, questions = cols[f"{pre}caption_prompt"][i], list(cols[f"{pre}questions"][i] or [])
            out.append((cap is not None, ([cap] if cap is not None else []) + questions))
        return out

    def _exit_if_engine_broke(self, error: BaseException | None) -> None:
        if self.engine.healthy():
            return
        # The engine itself is gone (dead vLLM engine core, CUDA error): every later batch would fail the same
        # way. Exit so Ray restarts this actor with a fresh engine and retries the batch (nothing is written).
        log.error("the %s engine broke (%s); exiting for a restart", self.engine.kind, error or "no error raised")
        os._exit(ENGINE_EXIT_CODE)


__all__ = ["ModelStage", "ENGINE_EXIT_CODE", "is_model_work", "release_freed_memory"]
