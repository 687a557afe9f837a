"""The Ray Data stages, one small callable each. A row travels: listing (`pipeline.io.listing`) → decode →
model (+ embed) → sink.

Rows carry keys, not bytes: the decode actor fetches the object itself (to a spool file: memory stays bounded
whatever the file's size) and emits only the sampled, 224×224 uint8 frames (≈ T·150 KB). Only `work` rows are
worked on; `copy` and `tally` rows pass through untouched. A failed row keeps flowing with `error_*` set, so
the sink records it and the job goes on. A broken ENGINE is different: the model actor exits, Ray restarts it
with a fresh engine and retries its batch, so one dead engine never turns every later video into an error.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import arrow_batch
from pipeline.proc_stats import descendants, machine_busy_s, process_cpu_s
from pipeline.redact import redact
from pipeline.text_batcher import TextBatcher
from schemas import flatten_answers
from schemas.stages import SEGMENT, WORK

log = logging.getLogger(__name__)
ERROR_FIELDS = ("error_stage", "error_type", "error_message", "error_retryable")
ERROR_TYPES = {"error_stage": pa.string(), "error_type": pa.string(), "error_message": pa.string(),
               "error_retryable": pa.bool_()}
ENGINE_EXIT_CODE = 75  # the model actor's exit status when its engine broke (Ray restarts it)
SEGMENT_BLOCK_ROWS = 8  # rows per output block of a segmented video: a few windows' frames in memory at a time
SEGMENT_FIELDS = ("segment_id", "segment", "start_s", "end_s", "segment_rows")


def _error(row: dict[str, Any], stage: str, exc: BaseException, retryable: bool = False) -> dict[str, Any]:
    row.update(error_stage=stage, error_type=type(exc).__name__, error_message=redact(str(exc) or repr(exc)),
               error_retryable=retryable)
    return row


def is_work(row: Any) -> bool:
    return row.get("kind", WORK) == WORK


def is_model_work(kind: Any) -> bool:
    """Rows the engine runs on: videos, and the segments of long recordings."""
    return kind in (WORK, SEGMENT)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS after a batch (glibc keeps them otherwise; RSS would creep)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class DecodeStage:
    """Decode actor: fetch the bytes, probe, sample the model's frames, resize/crop to the model's input size."""

    def __init__(self, num_frames: int, image_size: int, timeout_s: float, s3_options: Any = None, nice: int = 0,
                 frame_sampling: str = "original", max_bytes: int | None = None,
                 fetch_timeout_s: float | None = None, segments: dict[str, Any] | None = None,
                 scores: dict[str, Any] | None = None):
        from pipeline.decode.scores import Scorer

        if nice > os.getpriority(os.PRIO_PROCESS, 0):
            # Lower CPU priority for this actor and its decode subprocess (inherited): decoding fills the cycles
            # the model actors leave, instead of slowing the slowest stage where they share cores.
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self.image_size = image_size
        self.timeout_s = timeout_s
        self.s3_options = s3_options
        self.max_bytes, self.fetch_timeout_s = max_bytes, fetch_timeout_s
        self.segments = segments if segments and segments.get("mode", "whole") != "whole" else None
        self.scorer = Scorer(scores or {})  # the job's curation signals (`scores`: none without it)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame | Iterator[pd.DataFrame]:
        # A few rows per call: Ray Data's per-task overhead (scheduling, block building) costs more CPU than
        # decoding a short clip, and on shared cores that CPU comes out of the model stage.
        if self.segments is not None:
            return self._segmented(batch)  # a generator: Ray Data takes its blocks as they come
        return pd.DataFrame([self.decode_row(row) for row in batch.to_dict("records")])

    def _blank(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row, **self.scorer.empty())
        row.update(frames=b"", frames_shape=[], frame_indices=[], duration_s=None, fps=None, width=None,
                   height=None, codec=None, decoder=None, n_frames=None, thumbnail=b"", decode_s=0.0,
                   error_stage=None, error_type=None, error_message=None, error_retryable=False,
                   segment_id=None, segment=None, start_s=None, end_s=None, segment_rows=None)
        return row

    def decode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from pipeline.decode import decode_video
        from pipeline.io.fetch import TransientFetchError, fetched

        row = self._blank(row)
        if not is_work(row):
            return row
        t0 = time.perf_counter()
        try:
            with fetched(row["uri"], self.s3_options, max_bytes=self.max_bytes,
                         deadline_s=self.fetch_timeout_s) as path:
                try:
                    v = decode_video(path, num_frames=self.num_frames, size=self.image_size,
                                     timeout_s=self.timeout_s, sampling=self.frame_sampling, native=self.scorer.native)
                except Exception as e:  # noqa: BLE001 — any decode failure becomes an error record
                    return _error(row, "decode", e)
        except TransientFetchError as e:
            return _error(row, "fetch", e, retryable=True)
        except Exception as e:  # noqa: BLE001 — any fetch failure becomes an error record
            return _error(row, "fetch", e)
        row = self._fill(row, v, t0)
        row.update(self.scorer(v.frames, v.frame_indices, v.fps, v.native_frames, name=row["uri"]))
        return row

    @staticmethod
    def _fill(row: dict[str, Any], v: Any, t0: float) -> dict[str, Any]:
        row.update(frames=v.frames.tobytes(), frames_shape=list(v.frames.shape),
                   frame_indices=[int(i) for i in v.frame_indices], duration_s=v.duration_s, fps=v.fps,
                   width=v.width, height=v.height, codec=v.codec, decoder=v.decoder, n_frames=v.n_frames,
                   thumbnail=v.thumbnail_jpeg, decode_s=time.perf_counter() - t0)
        return row

    # ---- long recordings: a row per segment, then the video's own row ------------------------------------

    def _segmented(self, batch: pd.DataFrame) -> Iterator[pd.DataFrame]:
        rows: list[dict[str, Any]] = []
        for row in batch.to_dict("records"):
            for out in self.decode_rows(row):
                rows.append(out)
                if len(rows) >= SEGMENT_BLOCK_ROWS:
                    yield pd.DataFrame(rows)
                    rows = []
        if rows:
            yield pd.DataFrame(rows)

    def decode_rows(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One object of a segmented job: a row per segment (kind `segment`; none when the video is a single
        segment), then the video's own row, whose frames span the whole video (its caption is a global-local
        pass over all of it) and whose `segment_rows` says how many segment rows came before it. A failure
        after some segments turns the video row into the error record (the sink drops those segments)."""
        from pipeline.decode import decode_video
        from pipeline.decode.segments import decode_segments, frame_index, segment_plan
        from pipeline.io.fetch import TransientFetchError, fetched

        base = self._blank(row)
        if not is_work(base):
            yield base
            return
        if not base.get("need_segments"):  # its moments have every cell this job asks for: the video alone
            yield {**self.decode_row(row), "segment_rows": 0}
            return
        t0 = time.perf_counter()
        spec = {k: self.segments[k] for k in ("length_s", "overlap_s", "min_s", "max_s", "threshold")}
        try:
            with fetched(base["uri"], self.s3_options, max_bytes=self.max_bytes,
                         deadline_s=self.fetch_timeout_s) as path:
                try:
                    v = decode_video(path, num_frames=self.num_frames, size=self.image_size,
                                     timeout_s=self.timeout_s, sampling=self.frame_sampling, native=self.scorer.native)
                    video = self._fill(base, v, t0)
                    index = frame_index(path)  # one demux pass, for the plan and the decoding
                    plan, cuts = segment_plan(path, self.segments["mode"], frames=index, fps=video["fps"], **spec)
                except Exception as e:  # noqa: BLE001
                    yield _error(base, "decode", e)
                    return
                video.update(self.scorer(v.frames, v.frame_indices, v.fps, v.native_frames, cuts, name=video["uri"]))
                n = 0
                if len(plan) > 1:
                    started = time.perf_counter()
                    try:
                        for seg in decode_segments(path, plan, self.num_frames, self.image_size,
                                                   self.frame_sampling, frames=index, native=self.scorer.native):
                            yield self._segment_row(video, seg, cuts)
                            n += 1
                            # the whole-file deadline, per segment (decoding runs here, in order, one pass)
                            if time.perf_counter() - started > self.timeout_s * (n + 1):
                                raise TimeoutError(f"segment decoding exceeded {self.timeout_s:g}s per segment")
                    except Exception as e:  # noqa: BLE001
                        yield _error(video, "segments", e)
                        return
                video.update(segment_rows=n, start_s=0.0, end_s=plan[-1].end_s)
                yield video
        except TransientFetchError as e:
            yield _error(base, "fetch", e, retryable=True)
        except Exception as e:  # noqa: BLE001
            yield _error(base, "fetch", e)

    def _segment_row(self, video: dict[str, Any], seg: Any, cuts: list[int] | None) -> dict[str, Any]:
        row = dict(video)
        s = seg.segment
        row.update(kind=SEGMENT, segment_id=f"{video['video_id']}:{s.index:05d}", segment=s.index,
                   start_s=s.start_s, end_s=s.end_s, frames=seg.frames.tobytes(), frames_shape=list(seg.frames.shape),
                   frame_indices=[int(i) for i in seg.frame_indices], thumbnail=seg.thumbnail_jpeg)
        row.update(self.scorer(seg.frames, seg.frame_indices, video["fps"], seg.native_frames, cuts,
                               (s.start_frame, s.end_frame), name=row["segment_id"]))
        return row


class ModelStage:
    """Actor holding one engine (hf or vllm): a caption and an answer per job question for each video, then
    the text embeddings (`EmbedStage`) in the same process. The embedder is small next to the video model:
    a separate actor would cost another process start-up (torch import) and another hop for every row."""

    def __init__(self, engine: str, model_path: str, dtype: str | None, device: str, options: Any,
                 engine_kwargs: dict[str, Any] | None = None, embedder: dict[str, Any] | None = None,
                 batches_in_flight: int = 4):
        from pipeline.paths import resolve_model_path
        from stllm import load_engine

        self.engine = load_engine(engine, resolve_model_path(model_path), dtype=dtype, device=device,
                                  **(engine_kwargs or {}))
        self.options = options  # stllm.engine.GenerationOptions
        self._cpu0: float | None = None
        self._first_call = 0.0
        self._engine_pids: list[int] | None = None
        self._cpu_marks: list[list[float]] = []
        # the embedder waits for the text of at most half of the batches in flight (see TextBatcher)
        self.embed = (EmbedStage(**embedder, batches_together=max(1, batches_in_flight // 2))
                      if embedder is not None else None)
        # Ray Data may hand over more than `batches_in_flight` batches (each call runs a few of its bundle's
        # batches at once): the rest wait here, not in the engine's queue.
        self._slots = asyncio.Semaphore(batches_in_flight)
        self._on_engine = 0  # batches handed to the engine and not answered yet
        self.peak_on_engine = 0
        if self.engine.kind == "vllm":
            # The model runs in vLLM's own worker processes; what runs here (the text embedder, beside the
            # engine's steps) takes one thread, so it does not fight the engine's worker for its cores.
            import torch

            torch.set_num_threads(1)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Async: Ray Data hands this actor several batches at once (`runtime.model_batches_in_flight`); each
        awaits its own results while the engine works on all of them, and embeds its text on a worker thread,
        so the engine is never idle waiting for a batch boundary or for the embedder. Batches come and go as
        Arrow tables (`pipeline.arrow_batch`): the frames are read in place, the other columns pass through."""
        from stllm.engine import VideoRequest

        t0 = time.perf_counter()
        if self._cpu0 is None:
            self._cpu0, self._first_call = process_cpu_s(os.getpid()), t0
        n = batch.num_rows
        kinds = arrow_batch.values(batch, "kind", WORK)
        errors = {f: arrow_batch.values(batch, f) for f in ERROR_FIELDS}
        asked = self._asked(batch, kinds)
        todo = [i for i in range(n) if is_model_work(kinds[i]) and errors["error_stage"][i] is None and asked[i][1]]
        video_ids = arrow_batch.values(batch, "video_id")
        ids = [s if isinstance(s, str) else v  # a segment's own id, else its video's
               for s, v in zip(arrow_batch.values(batch, "segment_id"), video_ids, strict=True)]
        shapes = batch.column("frames_shape")
        # The decode stage sampled these frames (of the file, or of a segment): the engine takes them as they are.
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
        columns = {"caption": pa.array(captions, pa.string()), "answers": pa.array(answers, arrow_batch.QA),
                   "visual_embedding": arrow_batch.vectors(visual),
                   **{f: pa.array(errors[f], ERROR_TYPES[f]) for f in ERROR_FIELDS},
                   # rows the engine ran for (copies reuse a result: the count stays per content)
                   "model_calls": pa.array(calls, pa.int64()),
                   "model_s": pa.array([(time.perf_counter() - t0) / max(n, 1)] * n, pa.float64())}
        out = batch.drop_columns(["frames", "frames_shape"])
        for name, column in columns.items():
            out = arrow_batch.with_column(out, name, column)
        if self.embed is not None:
            # on the embedder's thread, other batches go on meanwhile; it waits for their text while there is some
            out = await self.embed.embed(out, more_coming=self._on_engine > 0)
        self._write_stats()
        _release_freed_memory()
        return out

    @staticmethod
    def _asked(batch: pa.Table, kinds: list[Any]) -> list[tuple[bool, list[str]]]:
        """Per row: (whether the caption is asked, the prompts to generate — caption prompt first): only the cells
        the listing found missing (a video's own, or its segments' for a segment row)."""
        cols = {c: arrow_batch.values(batch, c) for c in ("caption_prompt", "questions", "segment_caption_prompt",
                                                          "segment_questions")}
        out = []
        for i, kind in enumerate(kinds):
            pre = "segment_" if kind == SEGMENT else ""
            cap, questions = cols[f"{pre}caption_prompt"][i], list(cols[f"{pre}questions"][i] or [])
            out.append((cap is not None, ([cap] if cap is not None else []) + questions))
        return out

    def _write_stats(self) -> None:
        """With STLLM_ENGINE_STATS_DIR set (benchmarks), each model actor keeps its engine's stats there."""
        folder = os.environ.get("STLLM_ENGINE_STATS_DIR")
        if folder:
            stats = self.engine.stats() or {}  # the hf engine measures nothing itself
            stats["stage_peak_batches_on_engine"] = self.peak_on_engine
            # per finished batch, [s since the first call, this actor's, its engine processes', the machine's CPU
            # seconds]: where a window's cores went (the benchmark takes the second half)
            if self._engine_pids is None:
                self._engine_pids = descendants(os.getpid())
            cpu = [process_cpu_s(p) for p in (os.getpid(), *self._engine_pids)]
            # this actor's own CPU since its first batch (the engine's processes are apart): what it takes from them
            stats["actor_cpu_s"] = round(cpu[0] - (self._cpu0 or 0.0), 3)
            self._cpu_marks.append([round(time.perf_counter() - self._first_call, 4), cpu[0], sum(cpu[1:]),
                                    machine_busy_s()])
            stats["cpu_marks"] = self._cpu_marks
            if self.embed is not None and (b := self.embed.batcher) is not None:
                stats["text_embedder"] = {"calls": b.calls, "texts": b.texts, "cpu_s": round(b.cpu_s, 3)}
            with open(os.path.join(folder, f"engine-{os.getpid()}.json"), "w") as f:
                json.dump(stats, f)


    def _exit_if_engine_broke(self, error: BaseException | None) -> None:
        if self.engine.healthy():
            return
        # The engine itself is gone (dead vLLM engine core, CUDA error): every later batch would fail the same
        # way. Exit so Ray restarts this actor with a fresh engine and retries the batch (nothing is written).
        log.error("the %s engine broke (%s); exiting for a restart", self.engine.kind, error or "no error raised")
        os._exit(ENGINE_EXIT_CODE)


class OneBatchModelStage(ModelStage):
    """`ModelStage` with a barrier after every batch (`runtime.model_batches_in_flight: 1`): each batch waits for
    its last answer and its text embeddings before the actor takes the next one. How the stage ran before
    batches were fed continuously; kept as the measured baseline and for engines that must see one batch at a
    time."""

    def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        return asyncio.run(super().__call__(batch))


class EmbedStage:
    """sentence-transformers embeddings of each caption (and the answers' text for search); run by
    `ModelStage` in its actor (`embed`: the texts of every batch waiting are encoded together, on one thread),
    or on its own as a Ray Data callable (`batch_format="pyarrow"`)."""

    def __init__(self, model: str, batch_size: int = 32, device: str = "cpu", batches_together: int = 4):
        from pipeline.embedder import load_text_embedder

        self.model = load_text_embedder(model, device=device)
        self.batch_size = batch_size
        self.batches_together = batches_together
        self.batcher: TextBatcher | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        captions = arrow_batch.values(batch, "caption")
        return self._with_embeddings(batch, captions, self.encode(self._texts(captions)), t0)

    async def embed(self, batch: pa.Table, more_coming: bool = False) -> pa.Table:
        """`__call__` for an actor working on several batches at once: the texts of every batch waiting are
        encoded in one call; `more_coming` (other batches are still on the engine) lets it wait a moment for
        theirs."""
        t0 = time.perf_counter()
        captions = arrow_batch.values(batch, "caption")
        texts = self._texts(captions)
        if not texts:  # errors and copies only: nothing to wait for
            return self._with_embeddings(batch, captions, np.zeros((0, 0), np.float32), t0)
        if self.batcher is None:
            self.batcher = TextBatcher(self.encode, min_texts=self.batch_size, max_submits=self.batches_together)
        vectors = await asyncio.wrap_future(self.batcher.submit(texts, more_coming=more_coming))
        return self._with_embeddings(batch, captions, vectors, t0)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    @staticmethod
    def _texts(captions: list[str | None]) -> list[str]:
        return [c for c in captions if c is not None]  # rows with a result (not errors, copies)

    @staticmethod
    def _with_embeddings(batch: pa.Table, captions: list[str | None], vectors: np.ndarray, t0: float) -> pa.Table:
        ok = [c is not None for c in captions]
        emb = iter(vectors)
        answers = arrow_batch.values(batch, "answers")
        n = batch.num_rows
        out = arrow_batch.with_column(batch, "caption_embedding", arrow_batch.vectors([next(emb) if k else None
                                                                                       for k in ok]))
        out = arrow_batch.with_column(out, "answers_text", [flatten_answers(a) if k and a is not None else None
                                                            for a, k in zip(answers, ok, strict=True)], pa.string())
        return arrow_batch.with_column(out, "embed_s", [(time.perf_counter() - t0) / max(n, 1)] * n, pa.float64())
