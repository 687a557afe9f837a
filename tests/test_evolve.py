"""An index that evolves (real Ray, LanceDB, Parquet; local and on SeaweedFS): a question added runs only that
question, one dropped runs nothing, another model backfills its own cells — one row per video throughout, in
both stores, for every reader; the history stays queryable; kill -9 mid-backfill, two jobs at once, an index of
the previous schema migrated in place, prune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tests.faults import cli_killed_at
from tests.test_reliability import REPO, _clips, _exactly_once, _job_file, _overrides, _s3_section

Q1, Q2, Q3 = "What is the main object?", "Which direction does it move?", "Is it red?"


def _questions(*qs: str) -> str:
    return "questions=[" + ", ".join(json.dumps(q) for q in qs) + "]"


def _run(overrides: list[str]):
    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    return run_job(load_job(None, overrides), progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


def _view(out: str, s3=None) -> dict[str, dict]:
    """The `videos` dataset as a plain reader sees it (pyarrow, no knowledge of our rules), by file name."""
    from pipeline.store.files import filesystem

    fs, root = filesystem(f"{out}/parquet/videos", s3)
    rows = ds.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    assert len({r["video_id"] for r in rows}) == len(rows)
    return {Path(r["uri"]).name: r for r in rows}


def _answers(row: dict) -> dict[str, tuple[str, str]]:
    return {a["question"]: (a["answer"], a["model"]) for a in row["answers"]}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second checkpoint: the same tiny architecture, other weights (another seed)."""
    from stllm.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-b", seed=1)


def test_an_index_evolves_one_question_and_one_model_at_a_time(tmp_path: Path, other_model: Path) -> None:
    from pipeline.catalog.export import export

    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 5, seed0=300)
    n = 5
    a = _run(_overrides(str(src), out, (_questions(Q1, Q2),)))
    assert (a["counts"]["indexed"], a["counts"]["generations"]) == (n, {"caption": n, "answer": 2 * n})
    first = _view(str(out))
    assert len(first) == n and all(list(_answers(r)) == [Q1, Q2] for r in first.values())

    # B: a question added → that question alone, once per video; nothing else generated again
    b = _run(_overrides(str(src), out, (_questions(Q1, Q2, Q3),)))
    assert b["counts"]["generations"] == {"caption": 0, "answer": n} and b["counts"]["visual_encodings"] == 0
    assert b["counts"]["cells_reused"] == n * 6  # media, visual, scores, caption, Q1, Q2
    view = _view(str(out))
    assert len(view) == n
    for name, row in view.items():
        assert row["caption"] == first[name]["caption"] and row["caption_run"] == first[name]["caption_run"]
        assert {q: v for q, v in _answers(row).items() if q != Q3} == _answers(first[name])
        assert list(_answers(row)) == [Q1, Q2, Q3]

    # C: a question dropped → no model work; it leaves the view and stays in the history
    c = _run(_overrides(str(src), out, (_questions(Q1, Q3),)))
    assert (c["counts"]["model_calls"], c["counts"]["decoded"], c["counts"]["copies"]) == (0, 0, n)
    assert c["counts"]["generations"] == {"caption": 0, "answer": 0}
    view = _view(str(out))
    assert len(view) == n and all(list(_answers(r)) == [Q1, Q3] for r in view.values())
    cells = ds.dataset(f"{out}/parquet/cells").to_table(filter=ds.field("prompt") == Q2)
    assert cells.num_rows == n  # Q2's answers are history

    # D: another model → its captions and answers for every video; one row per video throughout
    d = _run(_overrides(str(src), out, (_questions(Q1, Q3), f"model.path={other_model}")))
    assert d["counts"]["generations"] == {"caption": n, "answer": 2 * n} and d["counts"]["visual_encodings"] == n
    rows, _ = _exactly_once(str(out))
    assert len(rows) == n
    view = _view(str(out))
    assert {r["caption_model"] for r in view.values()} == {"tiny-b:residual:8"} and not any(
        r["stale"] for r in view.values())
    assert all({m for _, m in _answers(r).values()} == {"tiny-b:residual:8"} for r in view.values())

    # every reader sees one row per video: search, export, the CLI
    res = _cli("search", str(out / "lancedb"), "a", "--mode", "fts", "-k", "50", "--json")
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)
    assert len(hits) == len({h["video_id"] for h in hits}) <= n
    report = export(str(out / "lancedb"), tmp_path / "export", dedup_threshold=1.01, val_fraction=0.0)
    assert report.videos == n and report.rows == n * 3  # caption + 2 answers each
    manifest = pa.parquet.read_table(tmp_path / "export" / "manifest.parquet").to_pylist()
    assert {m["model"] for m in manifest} == {"tiny-b:residual:8"}

    # the first model's results stay queryable: the history
    old = next(iter(first.values()))
    res = _cli("search", str(out / "lancedb"), old["caption"], "--model", old["caption_model"], "--json")
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)
    assert hits and {h["model"] for h in hits} == {old["caption_model"]} and old["caption"] in {
        h["caption"] for h in hits}
    # ... and exportable for training: the first model's captions and answers, though the view shows tiny-b's
    older = export(str(out / "lancedb"), tmp_path / "older", fmt="jsonl", dedup_threshold=1.01,
                   model=old["caption_model"])
    lines = [json.loads(x) for x in Path(older.files[0]).read_text().splitlines()]
    assert {m["model"] for m in lines} == {old["caption_model"]}
    # every question it answered: the view's (Q1, Q3 of run B) first, then the dropped Q2
    assert [m["question"] for m in lines[:4]] == [old["caption_prompt"], Q1, Q3, Q2] and len(lines) == n * 4
    assert {(Path(m["uri"]).name, m["question"], m["answer"]) for m in lines if m["question"] != Q3} == {
        (name, q, a) for name, r in first.items()
        for q, a in [(r["caption_prompt"], r["caption"]), *((q, a) for q, (a, _) in _answers(r).items())]}
    # the page offers the history too: a model to search the results of
    from fastapi.testclient import TestClient

    from pipeline.catalog.serve import create_app

    page = TestClient(create_app(str(out / "lancedb")))
    found = page.get("/api/search", params={"q": old["caption"], "model": old["caption_model"]}).json()
    assert found and {h["model"] for h in found} == {old["caption_model"]}
    assert 'name="model"' in page.get("/", params={"q": old["caption"], "model": "all"}).text
    from pipeline.index_status import index_status

    cover = index_status(str(out / "parquet"))["coverage"]
    assert [(c["what"], c["contents"]) for c in cover[0]["cells"]][1:] == [(Q1, n), (Q3, n)]


def test_on_seaweedfs_a_question_added_then_another_model(s3_server, tmp_path: Path, other_model: Path) -> None:
    from pipeline.store.lance import connect_lance

    bucket = s3_server.bucket("evolve")
    for i, clip in enumerate(_clips(tmp_path / "clips", 3, seed0=320)):
        s3_server.client().upload_file(str(clip), bucket, f"in/{i}.mp4")
    s3 = _s3_section(s3_server)
    out = f"s3://{bucket}/out"
    base = _overrides(f"s3://{bucket}/in", out, (f"source.s3={s3}", f"output.s3={s3}"))
    _run([*base, _questions(Q1)])
    b = _run([*base, _questions(Q1, Q3)])
    assert b["counts"]["generations"] == {"caption": 0, "answer": 3}
    d = _run([*base, _questions(Q1, Q3), f"model.path={other_model}"])
    assert d["counts"]["generations"] == {"caption": 3, "answer": 6}
    rows, _ = _exactly_once(out, s3=s3_server.options())
    assert len(rows) == 3 and {r["caption_model"] for r in rows} == {"tiny-b:residual:8"}
    cells = connect_lance(f"{out}/lancedb", s3_server.options()).open_table("cells")
    assert cells.count_rows("kind = 'caption'") == 6  # both models' captions: the history


def test_a_backfill_killed_then_rerun_completes_once(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 6, seed0=340)
    _run(_overrides(str(src), out, (_questions(Q1), "runtime.commit_every=2")))
    job = _job_file(tmp_path, _overrides(str(src), out, (_questions(Q1, Q3), "runtime.commit_every=2")))
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path)}
    # killed by SIGKILL right after its second LanceDB commit of the backfill (cells in, views not yet)
    killed = subprocess.run([sys.executable, "-c", cli_killed_at("lance-committed", 2, str(REPO)), "run", str(job),
                             "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from pipeline.store.manifest import list_manifests

    last = list_manifests(str(out / "runs"))[-1]
    assert last["status"] == "succeeded" and last["counts"]["generations"]["caption"] == 0
    assert last["counts"]["generations"]["answer"] < 6  # what the killed run committed was kept
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 6 and all(list(_answers(r)) == [Q1, Q3] for r in rows)
    answers = ds.dataset(f"{out}/parquet/cells").to_table(filter=ds.field("prompt") == Q3)
    assert answers.num_rows == 6


def test_two_jobs_share_one_index_at_once(tmp_path: Path) -> None:
    """A captioning job and a questions-only job run at the same time on one index: each adds its own cells;
    the view shows the caption and the questions of both, and each job's rerun skips everything."""
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 4, seed0=360)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    captions = _job_file(tmp_path / "a", _overrides(str(src), out, ("name=captions", _questions(Q1),
                                                                    "runtime.commit_every=2")))
    safety = _job_file(tmp_path / "b", _overrides(str(src), out, ("name=safety", "caption_prompt=null",
                                                                  _questions(Q2, Q3), "runtime.commit_every=2")))
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(j), "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for j in (captions, safety)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-8000:] for o in outs]
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 4
    for r in rows:
        assert r["caption"] and list(_answers(r)) == [Q1, Q2, Q3] or list(_answers(r)) == [Q2, Q3, Q1]
        assert {m.split(":")[0] for m in r["jobs_done"]} == {"captions", "safety"}
    # each job's rerun would skip every video: the view says both are done with it (jobs_done, above)
    # prune: the questions-only job leaves; its questions leave the view (no model work), its cells stay
    from pipeline.index_status import locate
    from pipeline.store.prune import prune

    assert prune(locate(str(out / "parquet"), None), job="safety", dry_run=True)["jobs"] == ["safety"]
    assert all(list(_answers(r)) in ([Q1, Q2, Q3], [Q2, Q3, Q1]) for r in _exactly_once(str(out))[0])
    res = _cli("prune", str(out / "lancedb"), "--job", "safety")
    assert res.returncode == 0, res.stderr
    rows, _ = _exactly_once(str(out))
    assert all(list(_answers(r)) == [Q1] for r in rows)
    assert ds.dataset(f"{out}/parquet/cells").to_table(filter=ds.field("prompt") == Q2).num_rows == 4


def test_an_index_of_the_previous_schema_is_migrated_in_place(tmp_path: Path) -> None:
    """A schema-2 index (one row per (object, config), no cells), written by the test with the previous layout:
    the next run migrates it — the rows of the running job's config become its cells (nothing computed again),
    another config's rows become history; an index from a newer release is refused."""
    from pipeline.jobs import load_job
    from pipeline.runner import model_facts
    from pipeline.store.lance import connect_lance
    from tests.schema2 import write_schema2_index

    src, out = tmp_path / "src", tmp_path / "out"
    clips = _clips(src, 3, seed0=380)
    overrides = _overrides(str(src), out, (_questions(Q1),))
    job = load_job(None, overrides)
    legacy = job.config_hash(model_facts(job)["checkpoint_id"])
    write_schema2_index(out, [str(c) for c in clips], config_hashes=[legacy, "an-older-config"], question=Q1)
    m = _run(overrides)
    assert m["counts"]["generations"] == {"caption": 0, "answer": 0} and m["counts"]["model_calls"] == 0
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 3 and all(r["caption"].startswith("v2 caption of") for r in rows)
    assert all(_answers(r)[Q1][0] == f"v2 answer {Path(r['uri']).name}" for r in rows)
    cells = ds.dataset(f"{out}/parquet/cells").to_table().to_pylist()
    assert sum(c["kind"] == "caption" for c in cells) == 6  # this config's (current) and the older one's
    # a newer release's index is refused, naming the version
    db = connect_lance(str(out / "lancedb"))
    table = db.open_table("videos")
    meta = {**table.schema.metadata, b"stllm_index.schema_version": b"99"}
    db.create_table("videos", table.to_arrow().replace_schema_metadata(meta), mode="overwrite")
    with pytest.raises(ValueError, match="newer release"):
        _run(overrides)
