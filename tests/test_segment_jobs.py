"""Jobs with `segments`: a generated 10-minute recording of hard-cut scenes indexed per moment by the real
pipeline (Ray, the tiny model, Parquet + LanceDB), each segment row checked against the scenes' known times,
an exact copy, short clips of three of its scenes to search with, a rerun, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode.segments import fixed_segments, plan_segments
from pipeline.demo.clips import make_scene_video, scene_starts
from tests.test_segments import FPS, _scenes

QUERY_SCENES = (1, 4, 6)  # three different looks (scene k + 8 looks like scene k)


def _overrides(src: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
            f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
            "runtime.batch_size=4", "runtime.commit_every=8", "model.max_new_tokens=4", *extra]


def _run(overrides: list[str]):
    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    return run_job(load_job(None, overrides), progress=False)


def _tables(out: Path, name: str) -> tuple[list[dict], list[dict]]:
    from pipeline.store.files import read_parquet
    from pipeline.store.lance import connect_lance

    parquet = read_parquet(str(out / "parquet" / name))
    lance = connect_lance(str(out / "lancedb")).open_table(name).to_arrow()
    return parquet.to_pylist(), lance.to_pylist()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, list[tuple[float, str, str]]]:
    src = tmp_path_factory.mktemp("archive")
    scenes = _scenes()
    make_scene_video(src / "recording.mp4", scenes, fps=FPS)
    shutil.copy(src / "recording.mp4", src / "recording_copy.mp4")
    for k in QUERY_SCENES:  # the same look as scene k of the recording (colour and motion), a clip of its own
        make_scene_video(src / f"scene{k}.mp4", [(6.0, scenes[k][1], scenes[k][2])], fps=FPS)
    return src, scenes


def _scene_of(frame: int, starts: list[int]) -> int:
    return int(np.searchsorted(starts, frame, side="right")) - 1


def test_shots_job_indexes_every_moment_and_search_lands_on_it(archive, tmp_path) -> None:
    src, scenes = archive
    out = tmp_path / "out"
    extra = ("segments.mode=shots", "segments.min_s=2", "segments.max_s=30")
    manifest = _run(_overrides(src, out, extra))
    assert manifest["status"] == "succeeded", manifest
    c = manifest["counts"]
    plan = plan_segments(src / "recording.mp4", "shots", min_s=2, max_s=30)
    # the recording: its whole-video pass + one per segment; the 3 clips; the copy reuses the recording's results
    assert (c["indexed"], c["copies"], c["errors"]) == (4, 1, 0), c
    assert c["model_calls"] == 1 + len(plan) + len(QUERY_SCENES), c

    videos, videos_lance = _tables(out, "videos")
    segments, segments_lance = _tables(out, "segments")
    assert len(videos) == len(videos_lance) == 5
    key = lambda r: r["segment_id"]  # noqa: E731
    assert sorted(map(key, segments)) == sorted(map(key, segments_lance))  # both stores hold the same rows
    assert len({r["segment_id"] for r in segments}) == len(segments)  # one row per segment
    by_uri: dict[str, list[dict]] = {}
    for r in segments:
        by_uri.setdefault(Path(r["uri"]).name, []).append(r)
    starts = scene_starts(scenes, FPS)
    video_ids = {Path(v["uri"]).name: v["video_id"] for v in videos}
    for name in ("recording.mp4", "recording_copy.mp4"):
        rows = sorted(by_uri[name], key=lambda r: r["segment"])
        assert [(r["start_s"], r["end_s"]) for r in rows] == [(s.start_s, s.end_s) for s in plan]
        for r, s in zip(rows, plan, strict=True):
            assert r["video_id"] == video_ids[name] and r["segment_id"] == f"{video_ids[name]}:{s.index:05d}"
            assert r["media_fragment"] == f"{r['uri']}#t={s.start_s:.3f},{s.end_s:.3f}".replace(".000", "")
            assert r["frame_indices"] == s.sampled(8) and r["caption"] and len(r["caption_embedding"]) == 384
            assert r["thumbnail"][:2] == b"\xff\xd8" and r["visual_embedding"] is not None
            assert len({_scene_of(i, starts) for i in r["frame_indices"]}) == 1  # a shot never spans a cut
    original = {r["segment"]: r for r in by_uri["recording.mp4"]}
    for r in by_uri["recording_copy.mp4"]:  # the copy: the recording's results under its own identity
        assert r["copy_of"] == video_ids["recording.mp4"] and r["caption"] == original[r["segment"]]["caption"]
    for k in QUERY_SCENES:  # a short clip is one segment: itself
        (row,) = by_uri[f"scene{k}.mp4"]
        assert (row["segment"], row["start_s"]) == (0, 0.0) and row["end_s"] == pytest.approx(6.0, abs=0.3)

    # the moments that look like a clip of scene k lie in scene k of the recording (or of its copy)
    from pipeline.catalog.query import Catalog

    catalog, moments = Catalog(str(out / "lancedb")), Catalog(str(out / "lancedb"), "segments")
    for k in QUERY_SCENES:
        hits = catalog.similar_moments(str(src / f"scene{k}.mp4"), moments, k=3)
        assert hits and all(h["media_fragment"].startswith(h["uri"] + "#t=") for h in hits)
        top = hits[0]
        assert Path(top["uri"]).name.startswith("recording"), top
        found = scenes[_scene_of(int(top["start_s"] * FPS), starts)]
        assert found[1:] == scenes[k][1:], (k, top["start_s"], top["end_s"])  # that colour and motion

    # the CLI: search the moments; a rerun finds nothing new and leaves the segments as they are
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(out / "lancedb"), "video",
                          "--segments", "--json", "-k", "5"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    hits = json.loads(res.stdout)
    assert len(hits) == 5 and all("#t=" in h["media_fragment"] and h["video_id"] in video_ids.values()
                                  for h in hits)
    # the web page: moments in search (each opens its video at its start) and in the video's detail view
    from fastapi.testclient import TestClient

    from pipeline.catalog.serve import create_app

    client = TestClient(create_app(str(out / "lancedb")))
    page = client.get("/", params={"q": "video", "segments": "true"}).text
    assert 'id="moments"' in page and page.count('class="hit moment"') >= 5 and "#t=" in page
    rec = video_ids["recording.mp4"]
    detail = client.get(f"/video/{rec}").text
    assert detail.count(f"/video/{rec}?t=") == len(plan)  # one link per moment, seeking the player
    thumb = client.get(f"/thumb/moment/{original[0]['segment_id']}")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    api = client.get("/api/search", params={"q": "video", "segments": "true", "k": 3}).json()
    assert len(api) == 3 and all("#t=" in h["media_fragment"] for h in api)
    again = _run(_overrides(src, out, extra))
    assert again["counts"]["indexed"] == 0 and again["counts"]["model_calls"] == 0
    assert sorted(map(key, _tables(out, "segments")[0])) == sorted(map(key, segments))


def test_fixed_windows_job_and_a_broken_file(archive, tmp_path) -> None:
    src0, scenes = archive
    src = tmp_path / "src"
    src.mkdir()
    # a 3-minute cut of the scenes, and a file that is not a video
    make_scene_video(src / "three_minutes.mp4", scenes[:4], fps=FPS)
    (src / "broken.mp4").write_bytes(b"\0" * 4096)
    out = tmp_path / "out"
    manifest = _run(_overrides(src, out, ("segments.mode=fixed", "segments.length_s=20", "segments.overlap_s=5",
                                          "segments.min_s=4")))
    assert manifest["counts"]["indexed"] == 1 and manifest["counts"]["errors"] == 1, manifest["counts"]
    n = round(sum(d for d, _, _ in scenes[:4]) * FPS)
    want = [(s.start_s, s.end_s) for s in fixed_segments(n, FPS, 20, 5, 4)]
    rows, _ = _tables(out, "segments")
    assert sorted((r["start_s"], r["end_s"]) for r in rows) == want
    from pipeline.store.files import read_parquet

    errors = read_parquet(str(out / "parquet" / "errors")).to_pylist()
    assert [Path(e["uri"]).name for e in errors] == ["broken.mp4"] and errors[0]["stage"] == "decode"
    # a question added to a segments job: once per moment (and once for the whole video), nothing else again
    from pipeline.jobs import load_job as load

    asked = load(None, _overrides(src, out)).questions
    more = _run(_overrides(src, out, ("segments.mode=fixed", "segments.length_s=20", "segments.overlap_s=5",
                                      "segments.min_s=4", "questions=" + json.dumps([*asked, "Is it red?"]))))
    assert more["counts"]["generations"] == {"caption": 0, "answer": 1 + len(want)}, more["counts"]
    rows, _ = _tables(out, "segments")
    assert len(rows) == len(want) and all(a["question"] == "Is it red?" for r in rows for a in r["answers"][-1:])
    # the job's segmentation derives its moments' cells: another window length asks for other cells
    from pipeline.jobs import load_job
    from tests.test_sinks import FACTS

    a = load_job(None, _overrides(src, out, ("segments.mode=fixed", "segments.length_s=20"))).spec(FACTS)
    b = load_job(None, _overrides(src, out, ("segments.mode=fixed", "segments.length_s=30"))).spec(FACTS)
    whole = load_job(None, _overrides(src, out)).spec(FACTS)
    assert whole.segmentation is None and len({a.segmentation, b.segmentation}) == 2
    with pytest.raises(Exception, match="overlap_s"):
        load_job(None, _overrides(src, out, ("segments.mode=fixed", "segments.length_s=5", "segments.overlap_s=5")))


def test_a_long_large_file_streams_its_segments_in_bounded_memory(archive, tmp_path) -> None:
    """The 10-minute recording padded to 300 MB (an MP4 `free` box: bytes every decoder skips), through the
    decode actor's own code in a fresh process, its segment rows taken one block at a time as Ray Data does:
    the process grows by far less than the file or than all the segments' frames together."""
    import struct

    src, _ = archive
    big = tmp_path / "big.mp4"
    with big.open("wb") as f:
        f.write((src / "recording.mp4").read_bytes())
        n = 300 << 20
        f.write(struct.pack(">I", n) + b"free")
        f.seek(n - 8, 1)
        f.truncate()
    repo = Path(__file__).resolve().parents[1]
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(repo)!r})
import pyarrow as pa, pyarrow.compute as pc
from pipeline.stages.decode import DecodeStage
segments = {{"mode": "fixed", "length_s": 5.0, "overlap_s": 0.0, "min_s": 1.0, "max_s": 30.0, "threshold": 27.0}}
stage = DecodeStage(num_frames=8, image_size=224, timeout_s=120, segments=segments)
row = pa.Table.from_pylist([{{"uri": {str(big)!r}, "kind": "work", "video_id": "v", "need_segments": True}}])
blocks = stage(row)
first = next(blocks)  # warm: imports, decode worker, the whole-video pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows, frames = first.num_rows, pc.sum(pc.binary_length(first["frames"])).as_py()
for block in blocks:
    rows += block.num_rows
    frames += pc.sum(pc.binary_length(block["frames"])).as_py()
    last = block
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([rows, frames >> 20, (after - before) >> 10, [e or "-" for e in last["error_stage"].to_pylist()],
                  last["segment_rows"][-1].as_py()]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows, frames_mb, grew_mb, errors, segment_rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert rows == 121 and segment_rows == 120 and set(errors) == {"-"}  # 120 windows of 5 s + the video row
    assert frames_mb > 130  # what holding every segment at once would take (138 MiB)
    assert grew_mb < 64, res.stdout
