"""Schemas, Parquet and LanceDB sinks (local and on SeaweedFS S3), search, the job's sinks, the manifest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import schemas
from pipeline.catalog.search import search
from pipeline.io.run_sinks import JobSinks
from pipeline.io.sinks import (
    ROW_KEY,
    LanceSink,
    ParquetSink,
    connect_lance,
    read_manifest,
    read_parquet,
    write_manifest,
)
from pipeline.jobs import load_job

TEXT_DIM, VISUAL_DIM = 8, 6
CAPTIONS = [
    "a red car drives along a coastal road",
    "a brown monkey eats a banana in a tree",
    "someone is cooking pasta in a small kitchen",
    "an audience laughs at a television show",
    "snow falls on a quiet mountain village",
]
ANSWERS = ["the car is red", "it is brown", "a white apron", "a blue stage", "everything looks grey"]


def _unit(i: int, dim: int) -> list[float]:
    v = np.full(dim, 0.05, dtype=np.float32)
    v[i % dim] = 1.0
    return (v / np.linalg.norm(v)).tolist()


def _rows(n: int = 5, config_hash: str = "cfg1") -> list[dict]:
    return [{
        "video_id": f"vid{i}", "uri": f"/videos/{i}.mp4", "size": 100 + i, "etag": f"etag{i}",
        "run_id": "run1", "model_id": "tiny", "config_hash": config_hash, "questions_hash": "q1",
        "caption": CAPTIONS[i % 5], "answers": [{"question": "What colour?", "answer": ANSWERS[i % 5]}],
        "answers_text": schemas.flatten_answers([{"question": "What colour?", "answer": ANSWERS[i % 5]}]),
        "caption_embedding": _unit(i, TEXT_DIM), "visual_embedding": _unit(i, VISUAL_DIM),
        "duration_s": 2.0, "fps": 12.0, "width": 96, "height": 64, "codec": "h264", "decoder": "decord",
        "n_frames": 24, "frame_indices": [1, 4, 7], "thumbnail": b"\xff\xd8jpeg",
        "timings": {"decode_s": 0.1}, "indexed_at": datetime.now(UTC),
    } for i in range(n)]


def test_schemas_are_versioned_and_checked() -> None:
    schema = schemas.video_schema(TEXT_DIM, VISUAL_DIM)
    assert schemas.schema_version(schema) == schemas.SCHEMA_VERSION == 1
    assert schemas.schema_version(schemas.error_schema()) == 1
    assert schemas.embedding_dims(schema) == {"caption_embedding": TEXT_DIM, "visual_embedding": VISUAL_DIM}
    table = schemas.rows_to_table(_rows(), schema)
    assert table.num_rows == 5

    with pytest.raises(ValueError, match="column 'caption' is missing"):
        schemas.check_table(table.drop_columns(["caption"]), schema)
    with pytest.raises(ValueError, match="column 'extra' is not in the schema"):
        schemas.check_table(table.append_column("extra", pa.array([1] * 5)), schema)
    with pytest.raises(ValueError, match="column 'caption_embedding' has type"):
        schemas.check_table(table, schemas.video_schema(TEXT_DIM + 1, VISUAL_DIM))
    with pytest.raises(ValueError, match="column 'video_id' has 1 null"):
        bad = table.set_column(0, pa.field("video_id", pa.string()), pa.array([None, "a", "b", "c", "d"]))
        schemas.check_table(bad, schema)
    answers = [{"question": "Q?", "answer": "A."}, {"question": "R?", "answer": "B"}]
    assert schemas.flatten_answers(answers) == "Q? A.\nR? B"


def test_manifest_json_schema_file_is_in_sync() -> None:
    path = Path(schemas.__file__).with_name("manifest.schema.json")
    assert json.loads(path.read_text()) == schemas.manifest_json_schema(), (
        "regenerate: python -c 'from schemas.manifest import write_json_schema; write_json_schema()'")


def test_parquet_sink_writes_part_files(tmp_path: Path) -> None:
    schema = schemas.video_schema(TEXT_DIM, VISUAL_DIM)
    rows = _rows()
    with ParquetSink(str(tmp_path / "videos"), schema, rows_per_file=3) as sink:
        sink.write(rows[:2])
        assert sink.files == []  # buffered
        sink.write(rows[2:])
        assert len(sink.files) == 1
        sink.write(pa.Table.from_pylist(rows[:1], schema=schema))
        with pytest.raises(ValueError, match="column 'caption_embedding'"):
            sink.write([{**rows[0], "caption_embedding": [0.0] * 3}])
    assert len(sink.files) == 2 and all(Path(f).name.startswith("part-") for f in sink.files)
    table = read_parquet(str(tmp_path / "videos"))
    assert table.num_rows == 6
    assert schemas.schema_version(table.schema) == 1
    schemas.check_table(table, schema)
    assert read_parquet(str(tmp_path / "nothing")) is None


def _lance_sink(uri: str, schema: pa.Schema, **kwargs) -> LanceSink:
    return LanceSink(uri, "videos", schema, merge_on=ROW_KEY, fts_columns=("caption", "answers_text"),
                     scalar_columns=("video_id",), vector_columns=("caption_embedding",), **kwargs)


def test_lance_sink_indexes_and_search(tmp_path: Path) -> None:
    uri = str(tmp_path / "lance")
    schema = schemas.video_schema(TEXT_DIM, VISUAL_DIM)
    with _lance_sink(uri, schema, batch_rows=2) as sink:
        sink.write(_rows())
    table = connect_lance(uri).open_table("videos")
    assert table.count_rows() == 5
    assert {c for idx in table.list_indices() for c in idx.columns} == {"caption", "answers_text", "video_id"}
    assert schemas.schema_version(table.schema) == 1
    schemas.check_schema(table.schema, schema)

    assert search(uri, "videos", text="monkey", k=2)[0]["video_id"] == "vid1"
    assert search(uri, "videos", text="grey", k=2)[0]["video_id"] == "vid4"  # only in the answers
    assert search(uri, "videos", text="pasta", fts_columns=("caption",), k=1)[0]["video_id"] == "vid2"
    hit = search(uri, "videos", vector=_unit(3, TEXT_DIM), k=2)[0]
    assert hit["video_id"] == "vid3" and hit["_distance"] == pytest.approx(0.0, abs=1e-5)
    hybrid = search(uri, "videos", text="kitchen", vector=_unit(2, TEXT_DIM), k=3,
                    columns=["video_id", "caption"])
    assert hybrid[0]["video_id"] == "vid2" and "_relevance_score" in hybrid[0]
    assert {r["video_id"] for r in search(uri, "videos", vector=_unit(0, TEXT_DIM), where="size > 102")} == {
        "vid3", "vid4"}
    with pytest.raises(ValueError):
        search(uri, "videos")

    # Rerun: the same keys are upserted, not duplicated; existing indexes take the new rows in.
    changed = _rows(6)[1:]
    changed[0]["caption"] = "a gorilla juggles oranges"
    changed[-1].update(video_id="no-caption", caption=None, caption_embedding=None, visual_embedding=None)
    with _lance_sink(uri, schema) as sink:
        sink.write(changed[::-1])  # a null embedding leading the batch once upset merge_insert
    table = connect_lance(uri).open_table("videos")
    assert table.count_rows() == 6 and table.search().where("caption IS NULL").to_arrow().num_rows == 1
    assert search(uri, "videos", text="gorilla", k=1)[0]["video_id"] == "vid1"

    with pytest.raises(ValueError, match="caption_embedding"):
        _lance_sink(uri, schemas.video_schema(TEXT_DIM * 2, VISUAL_DIM))


def test_vector_index_once_the_table_is_big_enough(tmp_path: Path) -> None:
    schema = schemas.video_schema(16, 4)
    rng = np.random.default_rng(0)
    rows = _rows(300)
    for r in rows:
        r["caption_embedding"] = rng.standard_normal(16).astype(np.float32).tolist()
        r["visual_embedding"] = rng.standard_normal(4).astype(np.float32).tolist()
    uri = str(tmp_path / "lance")
    with _lance_sink(uri, schema, batch_rows=1000, vector_index_min_rows=256) as sink:
        sink.write(rows)
    types = {i.columns[0]: i.index_type for i in connect_lance(uri).open_table("videos").list_indices()}
    assert types["caption_embedding"] == "IvfPq" and types["caption"] == "FTS"
    assert len(search(uri, "videos", vector=rows[7]["caption_embedding"], k=4)) == 4


def _stage_frames(job_rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the runner hands the sinks: pandas batches from Ray (lists arrive as numpy arrays)."""
    ok = []
    for r in job_rows:
        ok.append({
            "uri": r["uri"], "size": r["size"], "etag": r["etag"], "mtime": 1.7e9, "video_id": r["video_id"],
            "frame_indices": np.array(r["frame_indices"]), "duration_s": r["duration_s"], "fps": r["fps"],
            "width": r["width"], "height": r["height"], "codec": r["codec"], "decoder": r["decoder"],
            "n_frames": r["n_frames"], "thumbnail": r["thumbnail"], "decode_s": 0.2, "error_stage": None,
            "caption": r["caption"], "answers": np.array(r["answers"], dtype=object),
            "visual_embedding": np.array(r["visual_embedding"]), "model_s": 0.5,
            "caption_embedding": np.array(r["caption_embedding"], dtype=np.float32),
            "answers_text": r["answers_text"], "embed_s": float("nan"),
        })
    bad = pd.DataFrame([{"uri": "/videos/corrupt.mp4", "error_stage": "decode", "error_type": "DecodeError",
                         "error_message": "probe: not a readable video"}])
    return pd.DataFrame(ok), bad


def _job(tmp_or_uri: str, extra: list[str] = ()):
    return load_job(None, [f"output.parquet={tmp_or_uri}/parquet", f"output.lancedb={tmp_or_uri}/lancedb",
                           f"output.manifest_dir={tmp_or_uri}/runs", *extra])


def _run_job_sinks(job, run_id: str) -> tuple[object, dict]:
    h = job.config_hash()
    sinks = JobSinks(job, run_id=run_id, config_hash=h, model_id="tiny:residual:8")
    ok, bad = _stage_frames(_rows(4))
    sinks.write(ok.iloc[:2], bad)
    sinks.write(ok.iloc[2:], None)
    sinks.close()
    path = sinks.write_manifest({
        "run_id": run_id, "job": job.name, "config_hash": h, "model_id": "tiny:residual:8",
        "started_at": datetime.now(UTC).isoformat(), "counts": {"indexed": 4, "errors": 1},
        "outputs": sinks.locations(),
    })
    return sinks, {"manifest": path}


def test_job_sinks_write_everything_and_rerun_adds_nothing(tmp_path: Path) -> None:
    job = _job(str(tmp_path))
    sinks, out = _run_job_sinks(job, "run-1")
    loc = sinks.locations()
    assert loc["parquet"] == str(tmp_path / "parquet" / "videos")
    assert loc["lancedb"] == str(tmp_path / "lancedb")

    videos = read_parquet(loc["parquet"])
    assert videos.num_rows == 4 and set(videos.column("run_id").to_pylist()) == {"run-1"}
    schemas.check_table(videos, schemas.video_schema(TEXT_DIM, VISUAL_DIM))
    row = videos.to_pylist()[0]
    assert row["config_hash"] == job.config_hash() and row["questions_hash"] == job.questions_hash()
    assert row["timings"] == {"fetch_s": None, "decode_s": 0.2, "model_s": 0.5, "embed_s": None}
    assert row["frame_indices"] == [1, 4, 7] and row["answers"][0]["answer"] == "the car is red"
    errors = read_parquet(loc["errors_parquet"]).to_pylist()
    assert [(e["uri"], e["stage"], e["error_type"]) for e in errors] == [("/videos/corrupt.mp4", "decode",
                                                                          "DecodeError")]
    db = connect_lance(loc["lancedb"])
    assert db.open_table("videos").count_rows() == 4 and db.open_table("errors").count_rows() == 1
    assert sinks.existing_ids() == {"vid0", "vid1", "vid2", "vid3"}
    assert sinks.existing_ids("another-config") == set()

    manifest = read_manifest(out["manifest"])
    assert manifest["run_id"] == "run-1" and manifest["schema_version"] == 1
    assert manifest["job_config"]["name"] == "demo" and "pyarrow" in manifest["versions"]
    schemas.RunManifest.model_validate(manifest)

    _run_job_sinks(job, "run-2")  # a rerun upserts the same keys
    assert connect_lance(loc["lancedb"]).open_table("videos").count_rows() == 4
    assert search(str(tmp_path / "lancedb"), "videos", text="monkey", k=1)[0]["run_id"] == "run-2"

    parquet_only = _job(str(tmp_path), ["output.lancedb=null"])
    ids = JobSinks(parquet_only, run_id="r", config_hash=job.config_hash(), model_id="m").existing_ids()
    assert ids == {"vid0", "vid1", "vid2", "vid3"}


def test_lancedb_parquet_and_manifest_on_s3(s3_server) -> None:
    bucket = s3_server.bucket("sink")
    opts = s3_server.options()
    schema = schemas.video_schema(TEXT_DIM, VISUAL_DIM)

    lance_uri = f"s3://{bucket}/lance"
    with LanceSink(lance_uri, "videos", schema, s3=opts, merge_on=ROW_KEY, fts_columns=("caption",)) as sink:
        sink.write(_rows())
    hits = search(lance_uri, "videos", text="monkey", k=1, s3=opts, fts_columns=("caption",))
    assert hits[0]["video_id"] == "vid1"
    assert search(lance_uri, "videos", vector=_unit(4, TEXT_DIM), k=1, s3=opts)[0]["video_id"] == "vid4"

    with ParquetSink(f"s3://{bucket}/parquet/videos", schema, s3=opts) as sink:
        sink.write(_rows())
    assert sink.files[0].startswith(f"s3://{bucket}/parquet/videos/part-")
    assert read_parquet(f"s3://{bucket}/parquet/videos", s3=opts).num_rows == 5

    manifest = {"run_id": "r1", "job": "t", "config_hash": "c", "model_id": "m",
                "started_at": datetime.now(UTC)}
    path = write_manifest(f"s3://{bucket}/runs/r1.json", manifest, s3=opts)
    assert read_manifest(path, s3=opts)["run_id"] == "r1"

    # The whole job layout on S3, credentials from the job's output.s3 section.
    s3_section = (f"output.s3={{endpoint_url: '{s3_server.endpoint}', "
                  f"access_key_id: '{s3_server.access_key}', secret_access_key: '{s3_server.secret_key}'}}")
    job = _job(f"s3://{bucket}/job", [s3_section])
    sinks, out = _run_job_sinks(job, "s3-run")
    assert sinks.existing_ids() == {"vid0", "vid1", "vid2", "vid3"}
    written = read_manifest(out["manifest"], s3=opts)
    assert written["job_config"]["output"]["s3"]["secret_access_key"] == "**********"  # never the secret
