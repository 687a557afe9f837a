"""Schemas, the store's tables in Parquet and LanceDB (local and on SeaweedFS S3), search, the run's writer, the
manifest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import schemas
from pipeline.catalog.search import search
from pipeline.jobs import load_job
from pipeline.store.commit import TableStore
from pipeline.store.files import read_parquet
from pipeline.store.lance import connect_lance
from pipeline.store.locks import IndexLock, LockTimeout
from pipeline.store.manifest import RunRecord, list_manifests, mark_interrupted, read_manifest, write_manifest
from pipeline.store.search_indexes import maintain_indexes

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


def _rows(n: int = 5) -> list[dict]:
    """Rows of the `videos` view."""
    now = datetime.now(UTC)
    return [{
        "video_id": f"vid{i}", "content_id": f"c{i}", "copy_of": None, "part": None,
        "uri": f"/videos/{i}.mp4", "size": 100 + i, "etag": f"etag{i}", "run_id": "run1",
        "caption": CAPTIONS[i % 5], "caption_model": "tiny", "caption_prompt": "Describe.", "caption_run": "run1",
        "answers": [{"question": "What colour?", "answer": ANSWERS[i % 5], "model": "tiny", "run": "run1"}],
        "answers_text": schemas.flatten_answers([{"question": "What colour?", "answer": ANSWERS[i % 5]}]),
        "caption_embedding": _unit(i, TEXT_DIM), "visual_embedding": _unit(i, VISUAL_DIM), "visual_model": "tiny",
        "stale": False, "jobs_done": ["demo:s1"],
        "duration_s": 2.0, "fps": 12.0, "width": 96, "height": 64, "codec": "h264", "decoder": "decord",
        "n_frames": 24, "frame_indices": [1, 4, 7], "thumbnail": b"\xff\xd8jpeg",
        "timings": {"decode_s": 0.1}, "indexed_at": now, "updated_at": now,
    } for i in range(n)]


def test_schemas_are_versioned_and_checked() -> None:
    schema = schemas.video_schema(TEXT_DIM, VISUAL_DIM)
    assert schemas.schema_version(schema) == schemas.SCHEMA_VERSION == 3
    assert schemas.schema_version(schemas.error_schema()) == schemas.schema_version(schemas.cell_schema()) == 3
    assert {"video_id", "content_id", "copy_of", "part", "caption_model", "stale", "jobs_done"} <= set(schema.names)
    assert {"cell_id", "content_id", "scope", "kind", "derivation", "model_id", "prompt", "text"} <= set(
        schemas.cell_schema().names)
    assert {"attempts", "first_seen", "last_seen", "retryable", "etag"} <= set(schemas.error_schema().names)
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
    answers = [{"question": "Q?", "answer": "A.", "model": "m"}, {"question": "R?", "answer": "B"}]
    assert schemas.flatten_answers(answers) == "Q? A.\nR? B"


def test_manifest_json_schema_file_is_in_sync() -> None:
    path = Path(schemas.__file__).with_name("manifest.schema.json")
    assert json.loads(path.read_text()) == schemas.manifest_json_schema(), (
        "regenerate: python -c 'from schemas.manifest import write_json_schema; write_json_schema()'")


# ---- one table, two stores, exactly one row per key ------------------------------------------------------

SCHEMA = schemas.video_schema(TEXT_DIM, VISUAL_DIM)


def _store(root: str, s3=None, parquet: bool = True, lance: bool = True) -> TableStore:
    db = connect_lance(f"{root}/lance", s3) if lance else None
    return TableStore("videos", parquet_root=f"{root}/pq" if parquet else None, lance_db=db, s3=s3, schema=SCHEMA,
                      key=("video_id",))


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _state(store: TableStore) -> tuple[list, list]:
    """(Parquet rows, LanceDB rows) as sorted (video_id, caption) — what a plain reader sees."""
    pq_rows = read_parquet(store.parquet_dir, s3=store.s3, columns=["video_id", "caption"]) \
        if store.parquet_dir else None
    lance = store.lance_table.to_arrow() if store.lance_table is not None else None

    def pairs(t):
        return sorted(zip(t.column("video_id").to_pylist(), t.column("caption").to_pylist(), strict=True)) \
            if t is not None else []

    return pairs(pq_rows), pairs(lance)


def test_commits_replace_and_delete_in_both_stores(tmp_path: Path) -> None:
    import duckdb

    store = _store(str(tmp_path))
    rows = _rows(4)
    store.commit(_table(rows), run_id="r1")
    changed = {**rows[1], "caption": "a gorilla juggles oranges"}
    fresh = {**_rows(6)[5]}
    store.commit(_table([changed, fresh]), deletes=[("vid2",)], run_id="r2")
    expected = sorted([("vid0", CAPTIONS[0]), ("vid1", "a gorilla juggles oranges"), ("vid3", CAPTIONS[3]),
                       ("vid5", CAPTIONS[0])])
    assert _state(store) == (expected, expected)
    # A reader that knows nothing of our rules: DuckDB on the part files sees one row per key.
    dup = duckdb.sql(f"SELECT video_id, count(*) n FROM read_parquet('{tmp_path}/pq/videos/*.parquet') "
                     "GROUP BY video_id HAVING n > 1").fetchall()
    assert dup == [] and duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/pq/videos/*.parquet'").fetchall()[0][0] == 4
    parts = {r["video_id"]: r["part"] for r in store.lance_table.to_arrow().to_pylist()}
    assert parts["vid1"] == parts["vid5"] != parts["vid0"]  # LanceDB knows which part holds each row
    assert sorted(p.name for p in (tmp_path / "pq" / "videos").iterdir() if p.is_file()) == sorted(set(
        parts.values()))
    assert not list((tmp_path / "pq" / "videos" / "_staging").iterdir())
    assert not list((tmp_path / "pq" / "videos" / "_journal").iterdir())
    # Lookups by key and by content, and a superseding commit that empties a part file removes it.
    found = store.lookup("content_id", ["c3", "nope"], ["video_id"])
    assert found.column("video_id").to_pylist() == ["vid3"]
    store.commit(None, deletes=[("vid0",), ("vid3",)], run_id="r3")
    assert _state(store)[0] == sorted([("vid1", "a gorilla juggles oranges"), ("vid5", CAPTIONS[0])])
    assert len([p for p in (tmp_path / "pq" / "videos").iterdir() if p.is_file()]) == 1


def test_parquet_only_and_lance_only(tmp_path: Path) -> None:
    for parquet, lance in ((True, False), (False, True)):
        store = _store(str(tmp_path / f"{parquet}{lance}"), parquet=parquet, lance=lance)
        store.commit(_table(_rows(3)), run_id="r1")
        store.commit(_table([{**_rows(3)[0], "caption": "new"}]), run_id="r2")
        got = _state(store)[0 if parquet else 1]
        assert got == sorted([("vid0", "new"), ("vid1", CAPTIONS[1]), ("vid2", CAPTIONS[2])])
        assert store.count() == 3
        assert store.lookup("video_id", ["vid0"], ["caption"]).column("caption").to_pylist() == ["new"]


_CRASH_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.faults import kill_at
from tests.test_sinks import _store, _table, _rows
kill_at({point!r})
store = _store({root!r}, s3={s3})
store.recover()
rows = _rows(3)
if {fresh_only}:  # none of the keys is there: LanceDB appends
    store.commit(_table(_rows(6)[4:]), run_id="r2")
else:  # a key replaced, one deleted, one new: LanceDB merges
    store.commit(_table([{{**rows[1], "caption": "replaced"}}, _rows(5)[4]]), deletes=[("vid2",)], run_id="r2")
"""


@pytest.mark.parametrize("fresh_only", [False, True], ids=["merge", "append"])
@pytest.mark.parametrize("point", ["staged", "journaled", "lance-committed", "applied-new"])
def test_a_commit_killed_at_any_point_is_all_or_nothing(tmp_path: Path, point: str, fresh_only: bool) -> None:
    import subprocess
    import sys

    store = _store(str(tmp_path))
    store.commit(_table(_rows(3)), run_id="r1")
    before = sorted((f"vid{i}", CAPTIONS[i]) for i in range(3))
    after = sorted([*before, ("vid4", CAPTIONS[4]), ("vid5", CAPTIONS[0])]) if fresh_only else sorted(
        [("vid0", CAPTIONS[0]), ("vid1", "replaced"), ("vid4", CAPTIONS[4])])
    code = _CRASH_SCRIPT.format(repo=str(Path(__file__).parents[1]), root=str(tmp_path), s3=None, point=point,
                                fresh_only=fresh_only)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr  # killed by SIGKILL at that point
    recovered = _store(str(tmp_path))
    recovered.recover()  # what the next run does first
    pq_rows, lance_rows = _state(recovered)
    assert pq_rows == lance_rows
    assert pq_rows == (before if point in ("staged", "journaled") else after)
    assert not [p for p in (tmp_path / "pq" / "videos" / "_staging").iterdir()]
    assert not [p for p in (tmp_path / "pq" / "videos" / "_journal").iterdir()]


def test_commit_and_recovery_on_s3(s3_server) -> None:
    import subprocess
    import sys

    bucket = s3_server.bucket("tables")
    root, opts = f"s3://{bucket}/idx", s3_server.options()
    store = _store(root, s3=opts)
    store.commit(_table(_rows(3)), run_id="r1")
    s3_expr = (f"__import__('pipeline.io.sources', fromlist=['S3Options']).S3Options(endpoint_url="
               f"{opts.endpoint_url!r}, access_key_id={opts.access_key_id!r}, secret_access_key={opts.secret!r})")
    code = _CRASH_SCRIPT.format(repo=str(Path(__file__).parents[1]), root=root, s3=s3_expr, point="lance-committed",
                                fresh_only=False)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == -9, out.stderr
    recovered = _store(root, s3=opts)
    assert recovered.recover()["applied"] == 1
    pq_rows, lance_rows = _state(recovered)
    assert pq_rows == lance_rows == sorted([("vid0", CAPTIONS[0]), ("vid1", "replaced"), ("vid4", CAPTIONS[4])])


def test_index_lock_is_exclusive_locally_and_on_s3(tmp_path: Path, s3_server) -> None:
    import subprocess
    import sys
    import time

    hold = ("import sys, time; sys.path.insert(0, {repo!r}); from pipeline.store.locks import IndexLock\n"
            "with IndexLock({root!r}):\n    print('held', flush=True); time.sleep(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold.format(repo=str(Path(__file__).parents[1]),
                                                                root=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout):
            with IndexLock(str(tmp_path), timeout_s=0.5):
                pass
        t0 = time.monotonic()
        with IndexLock(str(tmp_path), timeout_s=30):  # granted once the holder is done
            assert time.monotonic() - t0 > 1.0
    finally:
        proc.kill()
        proc.wait()

    root, opts = f"s3://{s3_server.bucket('lock')}/idx", s3_server.options()
    first = IndexLock(root, opts, lease_s=2.0)
    with first:
        with pytest.raises(LockTimeout):
            with IndexLock(root, opts, timeout_s=0.5):
                pass
        # A holder that died leaves its lock; once the lease is over, the next writer takes it over.
        time.sleep(2.2)
        with IndexLock(root, opts, timeout_s=5):
            pass
    with IndexLock(root, opts, timeout_s=1):  # and it is free again
        pass
    # A holder on this host whose process is gone: taken over at once, long before its lease ends.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    bucket, key = root[5:].split("/", 1)
    body = json.dumps({"owner": "x", "host": __import__("socket").gethostname(), "pid": int(dead.stdout),
                       "expires_at": time.time() + 3600})
    s3_server.client().put_object(Bucket=bucket, Key=f"{key}/_lock", Body=body.encode())
    with IndexLock(root, opts, timeout_s=2):
        pass


def test_indexes_and_search(tmp_path: Path) -> None:
    store = _store(str(tmp_path), parquet=False)
    store.commit(_table(_rows()), run_id="r1")
    table = store.lance_table
    maintain_indexes(table, fts_columns=("caption", "answers_text"), scalar_columns=("video_id",),
                     vector_columns=("caption_embedding",), vector_index_min_rows=10_000)
    uri = str(tmp_path / "lance")
    assert {c for idx in table.list_indices() for c in idx.columns} == {"caption", "answers_text", "video_id"}
    assert search(uri, "videos", text="monkey", k=2)[0]["video_id"] == "vid1"
    assert search(uri, "videos", text="grey", k=2)[0]["video_id"] == "vid4"  # only in the answers
    assert search(uri, "videos", text="pasta", fts_columns=("caption",), k=1)[0]["video_id"] == "vid2"
    hit = search(uri, "videos", vector=_unit(3, TEXT_DIM), k=2)[0]
    assert hit["video_id"] == "vid3" and hit["_distance"] == pytest.approx(0.0, abs=1e-5)
    hybrid = search(uri, "videos", text="kitchen", vector=_unit(2, TEXT_DIM), k=3, columns=["video_id", "caption"])
    assert hybrid[0]["video_id"] == "vid2" and "_relevance_score" in hybrid[0]
    assert {r["video_id"] for r in search(uri, "videos", vector=_unit(0, TEXT_DIM), where="size > 102")} == {
        "vid3", "vid4"}
    with pytest.raises(ValueError):
        search(uri, "videos")
    # New rows (one with a null embedding leading the batch) are upserted; existing indexes take them in.
    changed = _rows(6)[1:]
    changed[0]["caption"] = "a gorilla juggles oranges"
    changed[-1].update(video_id="no-caption", caption=None, caption_embedding=None, visual_embedding=None)
    store.commit(_table(changed[::-1]), run_id="r2")
    maintain_indexes(table, fts_columns=("caption", "answers_text"))
    assert table.count_rows() == 6 and table.search().where("caption IS NULL").to_arrow().num_rows == 1
    assert search(uri, "videos", text="gorilla", k=1)[0]["video_id"] == "vid1"
    with pytest.raises(ValueError, match="caption_embedding"):
        TableStore("videos", parquet_root=None, lance_db=connect_lance(uri), s3=None,
                   schema=schemas.video_schema(TEXT_DIM * 2, VISUAL_DIM), key=("video_id",))


# ---- the writers of one run -----------------------------------------------------------------------------


FACTS = {"model_id": "tiny:residual:8", "checkpoint_id": "w1", "num_frames": 8, "frame_sampling": "original"}


def _work(r: dict, spec, **extra) -> dict:
    """A model result as the stages hand it to the writer (Arrow rows: lists as lists)."""
    cap = spec.caption.prompt if spec.caption is not None else None
    return {
        "kind": "work", "uri": r["uri"], "size": r["size"], "etag": r["etag"], "mtime": 1.7e9,
        "video_id": r["video_id"], "content_id": r["content_id"], "copy_of": None, "prev_attempts": 0,
        "first_seen": None, "indexed_at": None, "wait": False, "caption_prompt": cap,
        "questions": [a.prompt for a in spec.questions], "need_media": True, "need_visual": True, "need_scores": True,
        "score_motion": 0.1, "score_sharpness": 300.0,
        "need_segments": False, "reused": 0, "frame_indices": r["frame_indices"], "duration_s": r["duration_s"],
        "fps": r["fps"], "width": r["width"], "height": r["height"], "codec": r["codec"], "decoder": r["decoder"],
        "n_frames": r["n_frames"], "thumbnail": r["thumbnail"], "decode_s": 0.2, "error_stage": None,
        "error_type": None, "error_message": None, "error_retryable": False, "caption": r["caption"],
        "answers": [{"question": a.prompt, "answer": f"{r['caption']} / {a.prompt}"} for a in spec.questions],
        "visual_embedding": r["visual_embedding"], "model_s": 0.5, "model_calls": 1,
        "caption_embedding": r["caption_embedding"], "embed_s": None, **extra,
    }


def _bad(vid: str, **extra) -> dict:
    return {"kind": "work", "uri": f"/videos/{vid}.mp4", "video_id": vid, "content_id": f"c-{vid}", "size": 9,
            "etag": "e", "error_stage": "decode", "error_type": "DecodeError", "prev_attempts": 0,
            "first_seen": None, "error_message": "probe: not a readable video", "error_retryable": False,
            "caption": None, "answers": None, "model_calls": 0, **extra}


def _copy(vid: str, cid: str, copy_of=None, wait: bool = False) -> dict:
    return {"kind": "copy", "uri": f"/copies/{vid}.mp4", "video_id": vid, "content_id": cid, "size": 100,
            "etag": f"etag-{vid}", "copy_of": copy_of, "wait": wait, "indexed_at": None, "model_calls": 0}


def _job(tmp_or_uri: str, extra: list[str] = ()):
    return load_job(None, [f"output.parquet={tmp_or_uri}/parquet", f"output.lancedb={tmp_or_uri}/lancedb",
                           f"output.manifest_dir={tmp_or_uri}/runs", *extra])


def _writer(job, run_id: str):
    from pipeline.runner import index_location
    from pipeline.store.writer import IndexWriter

    return IndexWriter(index_location(job), job.spec(FACTS), run_id=run_id)


def test_writer_cells_view_copies_and_ledger(tmp_path: Path) -> None:
    job = _job(str(tmp_path))
    spec = job.spec(FACTS)
    rows = _rows(4)
    writer = _writer(job, "run-1")
    # A copy of content c0 arrives before c0's result: it waits, then its view row is built from c0's cells.
    writer.add_tally({"listed": 7, "skipped": 0, "known_bad": 0, "deferred": 0})  # counts travel outside the rows
    writer.write([_copy("dup0", "c0", copy_of="vid0", wait=True), _work(rows[1], spec), _bad("bad1")])
    writer.write(pa.Table.from_pylist([_work(r, spec) for r in (rows[0], rows[2], rows[3])] + [_bad("bad2")]))
    writer.finish()
    assert writer.counts_json() == {"listed": 7, "skipped": 0, "known_bad": 0, "deferred": 0, "indexed": 4,
                                    "copies": 1, "errors": 2, "model_calls": 4, "decoded": 4, "visual_encodings": 4,
                                    "cells_reused": 0, "generations": {"caption": 4, "answer": 8}}
    videos = read_parquet(f"{tmp_path}/parquet/videos")
    schemas.check_table(videos, schemas.video_schema(TEXT_DIM, VISUAL_DIM))
    by_id = {r["video_id"]: r for r in videos.to_pylist()}
    assert set(by_id) == {"vid0", "vid1", "vid2", "vid3", "dup0"}
    assert by_id["dup0"]["copy_of"] == "vid0" and by_id["dup0"]["caption"] == by_id["vid0"]["caption"]
    assert by_id["dup0"]["uri"] == "/copies/dup0.mp4" and by_id["dup0"]["content_id"] == "c0"
    row = by_id["vid0"]
    assert row["jobs_done"] == [f"demo:{spec.spec}"] and row["stale"] is False
    assert row["timings"] == {"fetch_s": None, "decode_s": 0.2, "model_s": 0.5, "embed_s": None}
    assert row["frame_indices"] == [1, 4, 7] and row["caption_model"] == "tiny:residual:8"
    assert [(a["question"], a["model"], a["run"]) for a in row["answers"]] == [
        (a.prompt, "tiny:residual:8", "run-1") for a in spec.questions]
    cells = read_parquet(f"{tmp_path}/parquet/cells").to_pylist()
    assert len(cells) == 4 * 6 and {c["kind"] for c in cells} == {"media", "visual", "caption", "answer", "scores"}
    assert (row["score_motion"], row["score_sharpness"], row["score_text"]) == (0.1, 300.0, None)
    db = connect_lance(f"{tmp_path}/lancedb")
    assert db.open_table("videos").count_rows() == 5 and db.open_table("cells").count_rows() == 24
    ledger = {e["video_id"]: e for e in read_parquet(f"{tmp_path}/parquet/errors").to_pylist()}
    assert set(ledger) == {"bad1", "bad2"} and ledger["bad1"]["attempts"] == 1
    assert ledger["bad1"]["config_hash"] == spec.spec and db.open_table("errors").count_rows() == 2

    # Run 2: bad1 fails again (attempts 2, first_seen kept), bad2 now succeeds (its ledger record goes), a new
    # object holding an indexed content gets its view row from the cells at once.
    writer = _writer(job, "run-2")
    first_seen = ledger["bad1"]["first_seen"]
    writer.write([_bad("bad1", prev_attempts=1, first_seen=first_seen),
                  _work({**rows[0], "video_id": "bad2", "uri": "/videos/bad2.mp4", "content_id": "c9"}, spec,
                        in_ledger=True),
                  _copy("dup3", "c3", copy_of="vid3")])
    writer.finish()
    ledger = {e["video_id"]: e for e in read_parquet(f"{tmp_path}/parquet/errors").to_pylist()}
    assert set(ledger) == {"bad1"} and ledger["bad1"]["attempts"] == 2 and ledger["bad1"]["first_seen"] == first_seen
    assert db.open_table("errors").count_rows() == 1
    videos = {r["video_id"]: r for r in read_parquet(f"{tmp_path}/parquet/videos").to_pylist()}
    assert len(videos) == 7 and videos["dup3"]["copy_of"] == "vid3"
    assert videos["dup3"]["caption"] == by_id["vid3"]["caption"] and videos["dup3"]["visual_embedding"] is not None

    from pipeline.runner import index_location

    parquet_only = index_location(_job(str(tmp_path), ["output.lancedb=null"]))
    found = parquet_only.videos().lookup("video_id", ["vid0", "dup3", "nope"], ["video_id"])
    assert sorted(found.column("video_id").to_pylist()) == ["dup3", "vid0"]


def test_a_run_that_died_is_marked_interrupted(tmp_path: Path) -> None:
    record = RunRecord(str(tmp_path / "runs"), "dead-run")
    record.start({"run_id": "dead-run", "job": "demo", "config_hash": "s", "model_id": "m",
                  "started_at": datetime.now(UTC).isoformat()})  # never ended: its process "died"
    assert read_manifest(record.path)["status"] == "running"
    assert mark_interrupted(record.folder, stale_after_s=60) == 0  # still beating
    assert mark_interrupted(record.folder, stale_after_s=0) == 1
    assert [m["status"] for m in list_manifests(record.folder)] == ["interrupted"]


def test_manifest_on_s3_never_holds_credentials(s3_server) -> None:
    bucket = s3_server.bucket("sink")
    opts = s3_server.options()
    manifest = {"run_id": "r1", "job": "t", "config_hash": "c", "model_id": "m", "started_at": datetime.now(UTC)}
    path = write_manifest(f"s3://{bucket}/runs/r1.json", manifest, s3=opts)
    assert read_manifest(path, s3=opts)["run_id"] == "r1"
    s3_section = (f"output.s3={{endpoint_url: 'http://user:pw-sentinel@{s3_server.endpoint[7:]}', "
                  f"access_key_id: '{s3_server.access_key}', secret_access_key: '{s3_server.secret_key}'}}")
    job = _job(f"s3://{bucket}/job", [s3_section, "model.engine_kwargs={token: tok-sentinel}"])
    text = json.dumps(job.redacted())
    for secret in (s3_server.secret_key, s3_server.access_key, "pw-sentinel", "tok-sentinel"):
        assert secret not in text


def test_vector_index_is_maintained_then_retrained_when_its_stats_say_so(tmp_path: Path) -> None:
    from pipeline.store import search_indexes as indexes

    schema = schemas.video_schema(16, 8)
    rng = np.random.default_rng(0)

    def rows(n: int, start: int) -> pa.Table:
        out = []
        for i, r in enumerate(_rows(n)):
            r.update(video_id=f"v{start + i}", caption_embedding=rng.standard_normal(16).astype(np.float32).tolist(),
                     visual_embedding=rng.standard_normal(8).astype(np.float32).tolist())
            out.append(r)
        return pa.Table.from_pylist(out, schema=schema)

    db = connect_lance(str(tmp_path / "lance"))
    table = db.create_table("videos", rows(300, 0))
    assert indexes.maintain_indexes(table, vector_columns=("caption_embedding",), vector_index_min_rows=1000) == {}
    done = indexes.maintain_indexes(table, fts_columns=("caption",), vector_columns=("caption_embedding",),
                                    vector_index_min_rows=256)
    assert done == {"caption": "created", "caption_embedding": "trained"}
    assert table.index_stats("caption_embedding_idx").index_type == "IVF_PQ"
    trained = []
    for k in range(indexes.MAX_DELTAS + 1):  # each run's rows become a delta segment of the same centroids
        table.add(rows(20, 300 + 20 * k))
        done = indexes.maintain_indexes(table, fts_columns=("caption",), vector_columns=("caption_embedding",),
                                        vector_index_min_rows=256)
        trained.append(done.get("caption_embedding"))
        assert table.index_stats("caption_embedding_idx").num_unindexed_rows == 0
    first = trained.index("trained")  # once the deltas outnumber MAX_DELTAS, and not before a few runs
    assert first >= 2 and set(trained[:first]) == {"updated"}
    hit = search(str(tmp_path / "lance"), "videos", vector=table.to_arrow()["caption_embedding"][7].as_py(), k=1)
    assert hit[0]["video_id"] == table.to_arrow()["video_id"][7].as_py()


def test_a_vector_index_that_cannot_be_trained_leaves_the_rows_searchable(tmp_path: Path) -> None:
    """70k rows but 50 distinct vectors: k-means cannot form √70k = 264 partitions (Lance refuses once it samples
    256 vectors a partition). The upkeep warns and goes on (the rows are committed); a search scans the exact
    vectors."""
    from pipeline.store import search_indexes as indexes
    from pipeline.store.lance import connect_lance

    n, distinct = 70_000, np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(distinct[np.arange(n) % 50].ravel()), 16)
    db = connect_lance(str(tmp_path / "lance"))
    table = db.create_table("videos", pa.table({"video_id": [f"v{i}" for i in range(n)], "caption_embedding": vectors}))
    done = indexes.maintain_indexes(table, vector_columns=("caption_embedding",), vector_index_min_rows=50_000)
    assert done == {"caption_embedding": "not trained"} and table.list_indices() == []
    hit = table.search(distinct[7].tolist(), vector_column_name="caption_embedding").limit(1).to_list()
    assert int(hit[0]["video_id"][1:]) % 50 == 7


class _LostAnswerS3:
    """The real S3 file system, but the first `fail` uploads raise after (`landed`) or instead of reaching the
    server — what a stalled server does to pyarrow's CompleteMultipartUpload (its retry gets NoSuchUpload though
    the object is in place). Simulated: a real stall cannot be timed to hit one request."""

    def __init__(self, fs, fail: int, landed: bool):
        self.fs, self.fail, self.landed, self.uploads = fs, fail, landed, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path):
        import contextlib

        self.uploads += 1
        if self.uploads > self.fail:
            return self.fs.open_output_stream(path)

        @contextlib.contextmanager
        def failing():
            if self.landed:
                with self.fs.open_output_stream(path) as f:
                    yield f
            else:
                yield pa.BufferOutputStream()
            raise OSError("AWS Error NO_SUCH_UPLOAD during CompleteMultipartUpload operation")
        return failing()


def test_s3_writes_survive_a_lost_completion_answer(s3_server, monkeypatch) -> None:
    from pipeline.store import files as sinks

    monkeypatch.setattr(sinks.time, "sleep", lambda s: None)
    bucket = s3_server.bucket("lost")
    fs, root = sinks.filesystem(f"s3://{bucket}/x", s3_server.options())
    landed = _LostAnswerS3(fs, fail=1, landed=True)  # in place: no second upload
    sinks.write_atomic(landed, f"{root}/a.json", b"one")
    assert landed.uploads == 1 and fs.open_input_stream(f"{root}/a.json").read() == b"one"
    lost = _LostAnswerS3(fs, fail=2, landed=False)  # never arrived: uploaded again, as a whole
    sinks.write_parquet(lost, f"{root}/b.parquet", _table(_rows(2)))
    assert lost.uploads == 3
    import pyarrow.parquet as pq

    assert pq.read_table(f"{root}/b.parquet", filesystem=fs).num_rows == 2
    with pytest.raises(OSError, match="NO_SUCH_UPLOAD"):  # a store that never takes it: the error, not a loss
        sinks.write_atomic(_LostAnswerS3(fs, fail=9, landed=False), f"{root}/c.json", b"three")


# ---- a writer that keeps up: compaction, batching by time, bounded files and versions -------------------------


def _parts(root: Path) -> list[Path]:
    return sorted(p for p in (root / "pq" / "videos").iterdir() if p.suffix == ".parquet")


def _one_row_per_key(tmp_path: Path, store: TableStore) -> list[str]:
    import duckdb

    dup = duckdb.sql(f"SELECT video_id, count(*) n FROM read_parquet('{tmp_path}/pq/videos/*.parquet') "
                     "GROUP BY ALL HAVING n > 1").fetchall()
    assert dup == []
    pq_rows, lance_rows = _state(store)
    assert pq_rows == lance_rows
    return [v for v, _ in pq_rows]


def _small_parts(store: TableStore, n: int, start: int = 0) -> None:
    for i in range(start, start + n):  # one small part per commit, as a long run's commits leave them
        store.commit(_table([{**_rows(1)[0], "video_id": f"v{i}", "caption": f"caption {i}"}]), run_id=f"r{i}")


def test_compaction_folds_small_parts_and_keys_stay_unique(tmp_path: Path) -> None:
    store = _store(str(tmp_path))
    _small_parts(store, 12)
    assert len(_parts(tmp_path)) == 12
    assert store.compact(run_id="c1", small_parts=8) == {"merged": 12, "into": 1}
    assert len(_parts(tmp_path)) == 1 and sorted(_one_row_per_key(tmp_path, store)) == sorted(
        f"v{i}" for i in range(12))
    # a row of a compacted part is superseded: found through the part map, replaced in the merged part
    store.commit(_table([{**_rows(1)[0], "video_id": "v3", "caption": "replaced"}]), run_id="r3b")
    assert _state(store)[0].count(("v3", "replaced")) == 1 and len(_one_row_per_key(tmp_path, store)) == 12
    _small_parts(store, 8, start=12)  # compacting again folds the merged part in with the new ones
    store.compact(run_id="c2", small_parts=8)
    store.commit(None, deletes=[("v5",), ("v15",)], run_id="d")
    assert sorted(_one_row_per_key(tmp_path, store)) == sorted(f"v{i}" for i in range(20) if i not in (5, 15))
    assert len(_parts(tmp_path)) == 1 and store.lance_table.count_rows() == 18


_COMPACT_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.faults import kill_at
from tests.test_sinks import _store
kill_at({point!r})
store = _store({root!r})
store.recover()
store.compact(run_id="crash", small_parts=4)
"""


@pytest.mark.parametrize("point", ["compact-staged", "compact-journaled", "applied-new", "compact-mapped"])
def test_a_compaction_killed_at_any_step_leaves_each_key_once(tmp_path: Path, point: str) -> None:
    import subprocess
    import sys

    store = _store(str(tmp_path))
    _small_parts(store, 6)
    code = _COMPACT_SCRIPT.format(repo=str(Path(__file__).parents[1]), root=str(tmp_path), point=point)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr
    recovered = _store(str(tmp_path))
    recovered.recover()
    assert sorted(_one_row_per_key(tmp_path, recovered)) == sorted(f"v{i}" for i in range(6))
    assert len(_parts(tmp_path)) == (6 if point in ("compact-staged",) else 1)
    # and what comes next still finds every row: a superseding commit replaces, never doubles
    recovered.commit(_table([{**_rows(1)[0], "video_id": "v2", "caption": "after"}]), run_id="next")
    assert _state(recovered)[0].count(("v2", "after")) == 1 and len(_one_row_per_key(tmp_path, recovered)) == 6
    assert not list((tmp_path / "pq" / "videos" / "_staging").iterdir())
    assert not list((tmp_path / "pq" / "videos" / "_journal").iterdir())


def test_the_writer_thread_commits_a_trickle_within_its_time_bound(tmp_path: Path) -> None:
    import time

    from pipeline.store.background import BackgroundWriter

    job = _job(str(tmp_path))
    spec = job.spec(FACTS)
    background = BackgroundWriter(_writer(job, "trickle"), max_rows=1000, max_seconds=0.5)
    try:
        background.submit(pa.Table.from_pylist([_work(_rows(1)[0], spec)]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and background.writer.counts["indexed"] < 1:
            time.sleep(0.05)
        committed_after = time.monotonic() - (deadline - 10)
        assert background.writer.counts["indexed"] == 1 and committed_after < 5  # not held for 1000 rows
        assert read_parquet(f"{tmp_path}/parquet/videos").num_rows == 1
    finally:
        background.close()
    stats = background.stats()
    assert stats["commits"] == 1 and stats["rows_per_commit"] == 1 and 0 <= stats["busy_fraction"] <= 1


def test_a_long_run_keeps_its_files_and_versions_bounded(tmp_path: Path) -> None:
    """10k rows in 200-row commits, folded every 10 commits as the writer does: Parquet parts and LanceDB
    versions stay bounded (what a commit costs over such a run is measured by `make bench`, not here)."""
    store = _store(str(tmp_path))
    base = _rows(1)[0]
    most_parts = most_versions = 0
    for c in range(50):
        rows = [{**base, "video_id": f"v{c * 200 + i}"} for i in range(200)]
        store.commit(_table(rows), run_id=f"r{c}")
        if c % 10 == 9:
            store.fold(run_id=f"f{c}", keep_versions_s=0.0, scalar_columns=("video_id",))
            most_parts = max(most_parts, len(_parts(tmp_path)))
            most_versions = max(most_versions, len(store.lance_table.list_versions()))
    assert store.count() == 10_000 and len(_one_row_per_key(tmp_path, store)) == 10_000
    assert most_parts <= 8 and most_versions <= 12  # not 50 of each
    assert any(idx.columns == ["video_id"] for idx in store.lance_table.list_indices())


def test_a_questions_only_job_on_a_new_index_writes_its_rows(tmp_path: Path) -> None:
    job = _job(str(tmp_path), ["caption_prompt=null"])
    spec = job.spec(FACTS)
    writer = _writer(job, "q-only")
    writer.write([_work({**_rows(1)[0], "caption": None, "caption_embedding": None}, spec)])
    writer.finish()
    videos = read_parquet(f"{tmp_path}/parquet/videos")
    assert videos.num_rows == 1 and videos.column("caption").to_pylist() == [None]
    assert schemas.embedding_dims(videos.schema)["caption_embedding"] == 384  # the job's text embedder's width
    assert [a["question"] for a in videos.column("answers")[0].as_py()] == [a.prompt for a in spec.questions]
