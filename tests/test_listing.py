"""What a run has to do, page by page, against a real index (local folder + LanceDB + Parquet): skips, the
error ledger's rules (known bad, retry, backoff, store failures, changed files), copies, limit."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from pipeline.io.listing import WorkPlan, has_new_work, iter_work
from pipeline.io.sources import local_content_id, object_id
from pipeline.jobs import load_job
from pipeline.store.cells import cell_id, cells_table
from pipeline.store.location import IndexLocation
from schemas import error_schema
from schemas.stages import COPY, WORK
from tests.test_sinks import FACTS, SCHEMA, _rows

SPEC = load_job(None).spec(FACTS)


def _plan(src: Path, out: Path, spec=SPEC, **kw) -> WorkPlan:
    index = IndexLocation(parquet_root=str(out / "pq"), lancedb=str(out / "lance"), videos_table="videos",
                          errors_table="errors", s3=None)
    return WorkPlan(source_uri=str(src), extensions=("mp4",), source_s3=None, spec=spec, index=index,
                    page_size=3, **kw)


def _rows_of(plan: WorkPlan) -> tuple[dict[str, dict], dict[str, int]]:
    rows, tally = {}, {"listed": 0, "skipped": 0, "known_bad": 0, "deferred": 0}

    def count(page: dict[str, int]) -> None:
        for k in tally:
            tally[k] += int(page[k])

    for block in iter_work(plan, on_tally=count):
        for r in block.to_pylist():
            rows[Path(r["uri"]).name] = r
    return rows, tally


def _cells(content: str, spec=SPEC, skip: tuple[str, ...] = ()) -> list[dict]:
    now = datetime.now(UTC)
    wanted = [("media", spec.media, None), ("visual", spec.visual, None), ("scores", spec.scores, None),
              *((a.kind, a.derivation, a.prompt) for a in spec.asks)]
    return [{"cell_id": cell_id(content, "", d), "content_id": content, "scope": "", "kind": kind, "derivation": d,
             "prompt": prompt, "text": "{}" if kind == "media" else "x", "run_id": "r0", "created_at": now}
            for kind, d, prompt in wanted if prompt not in skip]


def _index(plan: WorkPlan, src: Path, done: dict[str, str], failed: dict[str, dict]) -> None:
    """Put view rows and cells for `done` {file: content id} and ledger records for `failed` in the index."""
    videos, errors, cells = plan.index.videos(), plan.index.errors(), plan.index.cells()
    results = []
    for i, name in enumerate(done):
        uri = str(src / name)
        results.append({**_rows(1)[0], "video_id": object_id(uri), "uri": uri, "content_id": done[name],
                        "etag": _etag(src / name), "caption": f"caption {i}",
                        "jobs_done": [f"{plan.spec.job}:{plan.spec.spec}"]})
    if results:
        videos.commit(pa.Table.from_pylist(results, schema=SCHEMA), run_id="r0")
        cells.commit(cells_table([c for cid in done.values() for c in _cells(cid)]), run_id="r0")
    now = datetime.now(UTC)
    ledger = [{"video_id": object_id(str(src / name)), "config_hash": plan.spec.spec, "uri": str(src / name),
               "etag": f.get("etag", _etag(src / name)), "size": 1, "content_id": None, "stage": "decode",
               "error_type": "DecodeError", "message": "bad", "attempts": 1, "retryable": f.get("retryable", False),
               "first_seen": now, "last_seen": f.get("last_seen", now), "run_id": "r0", "part": None}
              for name, f in failed.items()]
    if ledger:
        errors.commit(pa.Table.from_pylist(ledger, schema=error_schema()), run_id="r0")


def _etag(path: Path) -> str:
    from pipeline.io.sources import local_fingerprint

    return local_fingerprint(path)


def test_pages_against_the_index(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name, body in {"a.mp4": b"A" * 10, "b.mp4": b"B" * 10, "c.mp4": b"C" * 10, "dup_of_a.mp4": b"A" * 10,
                       "d.mp4": b"D" * 10, "d_again.mp4": b"D" * 10, "bad.mp4": b"x", "bad_old.mp4": b"y",
                       "flaky.mp4": b"z", "touched.mp4": b"T" * 10}.items():
        (src / name).write_bytes(body)
    plan = _plan(src, out)
    _index(plan, src, done={"a.mp4": local_content_id(str(src / "a.mp4")), "touched.mp4": "tc"},
           failed={"bad.mp4": {}, "bad_old.mp4": {"last_seen": datetime.now(UTC) - timedelta(days=3)},
                   "flaky.mp4": {"retryable": True}})
    # touched.mp4 was rewritten since (new etag) with the bytes it had: a refresh of its own row
    touched_cid = local_content_id(str(src / "touched.mp4"))
    videos = plan.index.videos()
    row = videos.lookup("video_id", [object_id(str(src / "touched.mp4"))]).to_pylist()[0]
    videos.commit(pa.Table.from_pylist([{**row, "content_id": touched_cid, "etag": "old-etag"}], schema=SCHEMA),
                  run_id="r0")
    plan.index.cells().commit(cells_table(_cells(touched_cid)), run_id="r0")

    rows, tally = _rows_of(plan)
    assert tally == {"listed": 10, "skipped": 1, "known_bad": 2, "deferred": 0}  # a.mp4; bad.mp4, bad_old.mp4
    assert set(rows) == {"b.mp4", "c.mp4", "dup_of_a.mp4", "d.mp4", "d_again.mp4", "flaky.mp4", "touched.mp4"}
    assert rows["dup_of_a.mp4"]["kind"] == COPY and rows["dup_of_a.mp4"]["copy_of"] == object_id(str(src / "a.mp4"))
    first, second = sorted(["d.mp4", "d_again.mp4"])
    assert rows[first]["kind"] == WORK and rows[second]["kind"] == COPY and rows[second]["wait"]
    assert rows["flaky.mp4"]["kind"] == WORK  # the store failed last time, not the file: tried again
    assert rows["flaky.mp4"]["prev_attempts"] == 1
    assert rows["touched.mp4"]["kind"] == COPY and rows["touched.mp4"]["copy_of"] is None  # its own cells
    # a work row asks for everything a new content needs
    assert rows["b.mp4"]["caption_prompt"] == SPEC.caption.prompt and rows["b.mp4"]["need_visual"]
    assert rows["b.mp4"]["questions"] == [a.prompt for a in SPEC.questions]
    assert rows["b.mp4"]["content_id"].startswith("sha256:") and rows["b.mp4"]["content_id"].endswith(":10")

    # Backoff: the known-bad file whose last failure is older than the job's backoff is tried again.
    rows, tally = _rows_of(_plan(src, out, retry_after_s=24 * 3600))
    assert tally["known_bad"] == 1 and rows["bad_old.mp4"]["kind"] == WORK
    # --retry-errors: every known-bad file; a bad file that changed is tried whatever the ledger says.
    rows, tally = _rows_of(_plan(src, out, retry_errors=True))
    assert tally["known_bad"] == 0 and {"bad.mp4", "bad_old.mp4"} <= set(rows)
    st = (src / "bad.mp4").stat()
    (src / "bad.mp4").write_bytes(b"w")
    os.utime(src / "bad.mp4", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime differs
    rows, tally = _rows_of(plan)
    assert tally["known_bad"] == 1 and rows["bad.mp4"]["kind"] == WORK and rows["bad.mp4"]["prev_attempts"] == 0

    # limit caps the new objects of a run (copies included); has_new_work stops at the first.
    rows, _ = _rows_of(_plan(src, out, limit=2))
    assert len(rows) == 2
    assert has_new_work(plan)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not has_new_work(_plan(empty, out))


def test_only_the_missing_cells_are_asked_for(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name, body in {"a.mp4": b"A" * 10, "b.mp4": b"B" * 10, "c.mp4": b"C" * 10}.items():
        (src / name).write_bytes(body)
    plan = _plan(src, out)
    _index(plan, src, done={n: local_content_id(str(src / n)) for n in ("a.mp4", "b.mp4", "c.mp4")}, failed={})
    rows, tally = _rows_of(plan)
    assert rows == {} and tally["skipped"] == 3
    # a question added: a work row per video asking that question alone
    q1, q2 = (a.prompt for a in SPEC.questions)
    more = load_job(None, [f'questions=["{q1}", "{q2}", "Is it red?"]']).spec(FACTS)
    rows, _ = _rows_of(_plan(src, out, spec=more))
    assert {r["kind"] for r in rows.values()} == {WORK}
    assert all((r["caption_prompt"], r["questions"], r["need_visual"], r["need_media"], r["reused"]) ==
               (None, ["Is it red?"], False, False, 6) for r in rows.values())
    # a question dropped: nothing to compute, the view is rebuilt from the cells
    fewer = load_job(None, [f'questions=["{q1}"]']).spec(FACTS)
    rows, _ = _rows_of(_plan(src, out, spec=fewer))
    assert {r["kind"] for r in rows.values()} == {COPY} and not any(r["wait"] for r in rows.values())
    # another checkpoint: everything but the media facts
    other = load_job(None).spec({**FACTS, "checkpoint_id": "w2"})
    rows, _ = _rows_of(_plan(src, out, spec=other))
    assert all((r["caption_prompt"] is not None, len(r["questions"]), r["need_visual"], r["need_media"]) ==
               (True, 2, True, False) for r in rows.values())
    # --where steers a backfill: only the view rows it selects, the others deferred
    rows, tally = _rows_of(_plan(src, out, spec=more, where="uri LIKE '%a.mp4'"))
    assert set(rows) == {"a.mp4"} and tally["deferred"] == 2
