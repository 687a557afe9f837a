"""End to end against real parts: SeaweedFS S3 in and out, real Ray, real decoders, real LanceDB.

An archive of H.264 / HEVC / VP9 / AV1 clips plus two corrupt files → one row per good video (AV1 through
the PyAV fallback), one error record per bad one; Parquet and LanceDB agree with the schemas and with each
other; full-text and vector search find the right video; a rerun adds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo.clips import make_corrupt_video, make_test_video

CLIPS = {"h264": "a/h264.mp4", "hevc": "a/hevc.mp4", "vp9": "b/vp9.webm", "av1": "b/av1.mp4"}
CORRUPT = {"random": "c/random.mp4", "truncated": "c/truncated.mp4"}


@pytest.fixture(scope="module")
def archive(s3_server, tmp_path_factory):
    """The clips uploaded under s3://<bucket>/archive/, plus a non-video file the listing must ignore."""
    root = tmp_path_factory.mktemp("archive")
    for seed, (codec, name) in enumerate(CLIPS.items()):
        make_test_video(root / name, codec, n_frames=24, seed=seed)
    for kind, name in CORRUPT.items():
        make_corrupt_video(root / name, kind)
    (root / "notes.txt").write_text("not a video")
    bucket = s3_server.bucket("archive")
    client = s3_server.client()
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"archive/{path.relative_to(root)}")
    return bucket


def _overrides(s3_server, bucket: str, runs: Path) -> list[str]:
    o = s3_server.options()
    s3 = (f"{{endpoint_url: '{o.endpoint_url}', region: '{o.region}', access_key_id: '{o.access_key_id}', "
          f"secret_access_key: '{o.secret_access_key.get_secret_value()}'}}")
    return [
        f"source.uri=s3://{bucket}/archive", f"source.s3={s3}",
        f"output.parquet=s3://{bucket}/index/parquet", f"output.lancedb=s3://{bucket}/index/lancedb",
        f"output.s3={s3}", f"output.manifest_dir={runs}",
        "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5", "runtime.batch_size=2",
    ]


@pytest.fixture(scope="module")
def indexed(s3_server, archive, tmp_path_factory):
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    ray.shutdown()
    job = load_job(None, _overrides(s3_server, archive, tmp_path_factory.mktemp("runs")))
    manifest = run_job(job, progress=False)
    yield job, manifest
    ray.shutdown()


def _tables(job):
    from pipeline.store.files import read_parquet
    from pipeline.store.lance import connect_lance

    out = job.output
    parquet = read_parquet(f"{out.parquet}/{out.table}", s3=out.s3)
    errors = read_parquet(f"{out.parquet}/{out.errors_table}", s3=out.s3)
    lance = connect_lance(out.lancedb, out.s3).open_table(out.table).to_arrow()
    return parquet, errors, lance


def test_one_row_per_good_video_one_error_per_bad_one(indexed):
    job, manifest = indexed
    q = len(job.questions)
    assert manifest["counts"] == {"listed": 6, "skipped": 0, "known_bad": 0, "deferred": 0, "indexed": 4,
                                  "copies": 0, "errors": 2, "model_calls": 4, "decoded": 4, "visual_encodings": 4,
                                  "cells_reused": 0, "generations": {"caption": 4, "answer": 4 * q}}
    assert manifest["status"] == "succeeded"
    parquet, errors, _ = _tables(job)
    rows = {Path(u).name: r for u, r in zip(parquet["uri"].to_pylist(), parquet.to_pylist(), strict=True)}
    assert sorted(rows) == sorted(Path(n).name for n in CLIPS.values())
    assert rows["av1.mp4"]["decoder"] == "pyav" and rows["av1.mp4"]["codec"] == "av1"
    assert {rows[n]["decoder"] for n in ("h264.mp4", "hevc.mp4")} == {"decord"}
    for r in rows.values():
        assert r["caption"] and len(r["answers"]) == len(job.questions)
        assert [a["question"] for a in r["answers"]] == list(job.questions)
        assert len(r["frame_indices"]) == 8 and r["n_frames"] == 24 and r["thumbnail"][:2] == b"\xff\xd8"
    err = {Path(u).name: s for u, s in zip(errors["uri"].to_pylist(), errors["stage"].to_pylist(), strict=True)}
    assert err == {"random.mp4": "decode", "truncated.mp4": "decode"}


def test_blocks_fit_the_rows_in_flight_budget(indexed):
    """A block is what Ray Data builds in an actor and stores whole: 8 of them fit `runtime.buffer_mb` (at Ray's
    128 MiB default one decode block outgrew a 64 MiB budget, and the actors' memory grew to it)."""
    import ray

    job, _ = indexed
    assert ray.data.DataContext.get_current().target_max_block_size <= job.runtime.buffer_mb * 2**20 // 8


def test_parquet_and_lancedb_match_the_schemas_and_each_other(indexed):
    from schemas import check_table, error_schema, video_schema

    job, _ = indexed
    parquet, errors, lance = _tables(job)
    text_dim = len(parquet["caption_embedding"][0].as_py())
    visual_dim = len(parquet["visual_embedding"][0].as_py())
    assert (text_dim, visual_dim) == (384, 176)  # MiniLM; the tiny ViT's width
    schema = video_schema(text_dim=text_dim, visual_dim=visual_dim)
    check_table(parquet, schema)
    check_table(lance.select(schema.names), schema)
    check_table(errors, error_schema())
    by_id = {r["video_id"]: r for r in lance.to_pylist()}
    assert len(by_id) == parquet.num_rows == 4
    for r in parquet.to_pylist():
        other = by_id[r["video_id"]]
        for col in ("uri", "caption", "answers", "answers_text", "jobs_done", "caption_model", "frame_indices",
                    "run_id"):
            assert r[col] == other[col], col
        np.testing.assert_array_equal(r["visual_embedding"], other["visual_embedding"])


def test_full_text_and_vector_search_find_the_right_video(indexed):
    from pipeline.catalog.search import search

    job, _ = indexed
    parquet, _, _ = _tables(job)
    rows = parquet.to_pylist()
    target = rows[2]
    hits = search(job.output.lancedb, job.output.table, vector=target["visual_embedding"], k=2,
                  s3=job.output.s3, vector_column="visual_embedding")
    assert hits[0]["video_id"] == target["video_id"]
    captions = [r["caption"] for r in rows]
    unique = next(r for r in rows if captions.count(r["caption"]) == 1)
    hits = search(job.output.lancedb, job.output.table, text=unique["caption"], k=4, s3=job.output.s3)
    assert hits[0]["video_id"] == unique["video_id"]


def test_manifest_and_rerun_adds_nothing(indexed, s3_server, archive, tmp_path):
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    job, manifest = indexed
    saved = json.loads(Path(manifest["outputs"]["manifest"]).read_text())
    from pipeline.runner import model_facts

    assert saved["run_id"] == manifest["run_id"]
    assert saved["config_hash"] == job.spec(model_facts(job)).spec
    again = run_job(load_job(None, _overrides(s3_server, archive, tmp_path)), progress=False)
    ray.shutdown()
    # Same content + same config: the 4 good videos are skipped, the 2 bad ones too (known bad, unchanged).
    assert again["counts"] == {"listed": 6, "skipped": 4, "known_bad": 2, "deferred": 0, "indexed": 0,
                               "copies": 0, "errors": 0, "model_calls": 0, "decoded": 0, "visual_encodings": 0,
                               "cells_reused": 0, "generations": {"caption": 0, "answer": 0}}
    parquet, errors, lance = _tables(job)
    assert parquet.num_rows == 4 and lance.num_rows == 4 and errors.num_rows == 2
