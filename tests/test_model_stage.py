"""The model stage keeps its engine fed: several batches on the engine at once, also when Ray Data hands the
actor one batch per call, and the text of several batches embedded in one call (the real MiniLM embedder)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo.clips import make_test_video
from pipeline.embedder import load_text_embedder
from pipeline.stages.text_batcher import TextBatcher

TEXTS = [f"a {c} {s} moves {d}" for c in ("red", "blue", "green") for s in ("circle", "square")
         for d in ("left", "up")]


@pytest.fixture(scope="module")
def encode():
    model = load_text_embedder()

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    return encode


def test_text_arriving_while_more_is_coming_is_encoded_in_one_call(encode):
    batcher = TextBatcher(encode, min_texts=12, max_submits=8, max_wait_s=5.0)
    try:
        parts = [TEXTS[i:i + 3] for i in range(0, 12, 3)]
        futures = []
        for i, part in enumerate(parts):  # batches finishing one by one, the last says nothing more is coming
            futures.append(batcher.submit(part, more_coming=i < len(parts) - 1))
            time.sleep(0.05)
        got = [f.result(timeout=60) for f in futures]
        assert batcher.calls == 1 and batcher.texts == 12
        for part, vectors in zip(parts, got, strict=True):  # each submit gets its own rows, in order
            assert vectors.shape == (3, 384)
            np.testing.assert_allclose(vectors, encode(part), atol=1e-5)
    finally:
        batcher.close()


def test_waiting_stops_at_max_submits(encode):
    """Each submit waiting holds a batch back: after `max_submits` the batcher stops waiting for more text."""
    batcher = TextBatcher(encode, min_texts=100, max_submits=2, max_wait_s=30.0)
    try:
        t0 = time.monotonic()
        futures = [batcher.submit(TEXTS[i:i + 2], more_coming=True) for i in range(0, 4, 2)]
        assert all(f.result(timeout=60).shape == (2, 384) for f in futures)
        assert time.monotonic() - t0 < 10  # not the 30 s it would wait for 100 texts
        assert batcher.calls == 1 and batcher.texts == 4
    finally:
        batcher.close()


def test_nothing_more_coming_is_encoded_at_once_and_close_drains(encode):
    batcher = TextBatcher(encode, min_texts=32, max_wait_s=30.0)
    t0 = time.monotonic()
    assert batcher.submit(TEXTS[:2]).result(timeout=60).shape == (2, 384)
    assert time.monotonic() - t0 < 10  # did not wait the 30 s for more
    waiting = batcher.submit(TEXTS[2:4], more_coming=True)  # would wait up to 30 s for more text...
    batcher.close()  # ...but close embeds it now
    assert waiting.done() and waiting.result().shape == (2, 384)
    assert batcher.submit(TEXTS[:1]).exception() is not None  # closed


def test_a_bad_batch_fails_alone_and_a_cancelled_one_is_left_out(encode):
    def picky(texts: list[str]) -> np.ndarray:
        if "BAD" in texts:
            raise ValueError("cannot embed BAD")
        return encode(texts)

    batcher = TextBatcher(picky, min_texts=100, max_submits=8, max_wait_s=5.0)
    try:
        # grouped in one call that fails: each is tried alone, only the bad one fails
        good, bad = batcher.submit(TEXTS[:2], more_coming=True), batcher.submit(["BAD"], more_coming=False)
        np.testing.assert_allclose(good.result(timeout=60), encode(TEXTS[:2]), atol=1e-5)
        assert isinstance(bad.exception(timeout=60), ValueError)
        # a submit whose caller gave up while the batcher waited is skipped; the thread goes on
        gone = batcher.submit(TEXTS[2:4], more_coming=True)
        assert gone.cancel()
        assert batcher.submit(TEXTS[4:6]).result(timeout=60).shape == (2, 384)
        assert gone.cancelled() and batcher.texts == 2 + 2
    finally:
        batcher.close()


def test_the_model_actor_overlaps_batches_when_its_input_is_ready(tmp_path: Path, monkeypatch, encode):
    """Decoded rows already materialised: Ray Data gives each call of the model actor one small bundle (here
    one batch). Unless the actor's calls overlap, the engine sees one batch at a time."""
    import pandas as pd
    import ray

    from pipeline.io.listing import iter_work
    from pipeline.jobs import load_job
    from pipeline.run_stats import RunStats
    from pipeline.runner import init_ray, model_facts, stage_ops, work_plan

    src = tmp_path / "src"
    for i in range(8):
        make_test_video(src / f"clip{i}.mp4", "h264", n_frames=12, size=(64, 48), seed=400 + i)
    out = tmp_path / "out"
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
                          f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
                          "runtime.batch_size=2", "runtime.decode_batch_size=2", "runtime.model_batches_in_flight=3",
                          "model.max_new_tokens=4"])
    ray.shutdown()
    init_ray(None, job)
    try:
        facts = model_facts(job)
        hub = ray.remote(RunStats).remote()
        ops = stage_ops(job, facts, hub)
        plan = work_plan(job, job.spec(facts))
        rows = [r for block in iter_work(plan) for r in block.to_pylist() if r["kind"] == "work"]
        decoded = ops["decode"](ray.data.from_items(rows)).materialize()
        result: pd.DataFrame = ops["model"](decoded).to_pandas()
        inputs = decoded.take_all()
        time.sleep(1.0)  # the actors' last reports are on their way (fire and forget)
        snapshot = ray.get(hub.snapshot.remote())
    finally:
        ray.shutdown()
    assert len(result) == 8 and result["error_stage"].isna().all()
    # the answers of batches run side by side are those of one synchronous call on the same frames (greedy)
    from pipeline.paths import resolve_model_path
    from stllm import load_engine
    from stllm.engine import VideoRequest

    engine = load_engine("hf", resolve_model_path(facts["path"]), dtype=job.model.dtype, device="cpu")
    requests = [VideoRequest(r["video_id"], np.frombuffer(r["frames"], np.uint8).reshape(r["frames_shape"]),
                             [job.caption_prompt, *job.questions], sampled=True) for r in inputs]
    alone = {r.video_id: r for r in engine.generate(requests, job.generation_options())}
    for _, row in result.iterrows():
        assert row["caption"] == alone[row["video_id"]].answers[0].text
        assert [a["answer"] for a in row["answers"]] == [a.text for a in alone[row["video_id"]].answers[1:]]
        np.testing.assert_allclose(np.asarray(row["visual_embedding"]), alone[row["video_id"]].visual_embedding,
                                   atol=1e-6)
    # the embeddings made several batches at a time are those of each caption alone
    np.testing.assert_allclose(np.stack(result["caption_embedding"].map(np.asarray)), encode(list(result["caption"])),
                               atol=1e-5)
    peak = max(a["peak_on_engine"] for a in snapshot["actors"]["model"])
    assert 2 <= peak <= 3, peak  # several batches at once, never more than runtime.model_batches_in_flight
    assert snapshot["stages"]["decode"]["rows"] == 8 and snapshot["stages"]["model"]["errors"] == 0



def test_arrow_batches_are_read_in_place_and_set_by_name():
    """The model stage's batches are Arrow tables: frames are views of the block (read-only, it may live in
    Ray's shared object store), new columns replace or append by name, vectors keep their rows' None."""
    import pyarrow as pa

    from pipeline.stages import arrow_batch

    frames = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    table = pa.table({"frames": pa.array([b"", frames.tobytes()], pa.binary()), "error_stage": pa.nulls(2)})
    view = arrow_batch.binary_view(table, "frames", 1, [2, 3, 4])
    assert np.array_equal(view, frames) and not view.flags.writeable
    data = table.column("frames").chunk(0).buffers()[2]  # [validity, offsets, data]
    assert view.ctypes.data == data.address + 0  # row 0 is empty: row 1 starts the data buffer
    with pytest.raises(ValueError):
        view[0, 0, 0] = 1
    # several chunks, a slice (chunks with an offset) and a missing value
    chunked = pa.concat_tables([table, pa.table({"frames": pa.array([None, frames[::-1].tobytes(), b"x"],
                                                                    pa.binary()), "error_stage": pa.nulls(3)})])
    part = chunked.slice(1, 3)  # rows 1..3: frames, None, reversed frames
    assert np.array_equal(arrow_batch.binary_view(part, "frames", 0, [2, 3, 4]), frames)
    assert np.array_equal(arrow_batch.binary_view(part, "frames", 2, [2, 3, 4]), frames[::-1])
    with pytest.raises(ValueError, match="has no frames"):
        arrow_batch.binary_view(part, "frames", 1, [2, 3, 4])
    with pytest.raises(TypeError, match="not binary"):  # another layout is refused, not misread
        arrow_batch.binary_view(pa.table({"frames": pa.array(["abcd"])}), "frames", 0, [4])
    assert arrow_batch.values(table, "kind", "work") == ["work", "work"]
    out = arrow_batch.with_column(table, "error_stage", pa.array([None, "model"], pa.string()))
    out = arrow_batch.with_column(out, "visual_embedding", arrow_batch.vectors([None, np.ones(3)]))
    assert out.column_names == ["frames", "error_stage", "visual_embedding"]
    assert out.column("error_stage").to_pylist() == [None, "model"]
    assert out.schema.field("visual_embedding").type == pa.list_(pa.float32())
    assert out.column("visual_embedding").to_pylist() == [None, [1.0, 1.0, 1.0]]
