"""Text embeddings of the captions, in the model actor: the captions of every batch waiting are encoded together,
on one thread (`TextBatcher`), while the engine goes on with other batches. MiniLM-L6 is tiny next to the video
model: a stage of its own would cost another process start-up and a hop for every row."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pyarrow as pa

from pipeline.stages import arrow_batch
from pipeline.stages.text_batcher import TextBatcher


class TextEmbedder:
    def __init__(self, model: str, batch_size: int = 32, device: str = "cpu", batches_together: int = 4):
        from pipeline.embedder import load_text_embedder

        self.model = load_text_embedder(model, device=device)
        self.batch_size = batch_size
        self.batches_together = batches_together
        self.batcher: TextBatcher | None = None

    async def embed(self, batch: pa.Table, more_coming: bool = False) -> pa.Table:
        """`batch` with `caption_embedding` (rows with a caption) and `embed_s`; `more_coming` (other batches are
        still on the engine) lets the embedder wait a moment for their text, to encode it in the same call."""
        t0 = time.perf_counter()
        captions = arrow_batch.values(batch, "caption")
        texts = [c for c in captions if c is not None]  # rows with a caption (not errors, copies, questions-only)
        vectors = np.zeros((0, 0), np.float32)
        if texts:
            if self.batcher is None:
                self.batcher = TextBatcher(self.encode, min_texts=self.batch_size, max_submits=self.batches_together)
            vectors = await asyncio.wrap_future(self.batcher.submit(texts, more_coming=more_coming))
        emb = iter(vectors)
        n = batch.num_rows
        out = arrow_batch.with_column(batch, "caption_embedding",
                                      arrow_batch.vectors([next(emb) if c is not None else None for c in captions]))
        return arrow_batch.with_column(out, "embed_s", [(time.perf_counter() - t0) / max(n, 1)] * n, pa.float64())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


__all__ = ["TextEmbedder"]
