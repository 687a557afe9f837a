"""The catalog on a real index built by the pipeline: search with filters, similar videos, curation export, and
the web page in a real headless browser (Debian's Chromium, driven by Selenium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo.clips import make_corrupt_video, make_test_video
from tests.browser import chrome, free_port, served

COPY_NOTE = b"\x00\x00\x00\x10free" + b"near-copy"[:8]  # an MP4 `free` box: other bytes, the same frames


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> dict[str, Path]:
    """Clips in a/ and b/: three distinct scenes (H.264, HEVC, VP9), an exact copy of one, a near copy
    (the same frames, other bytes) of another, and a corrupt file — indexed by a real run."""
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    root = tmp_path_factory.mktemp("catalog")
    src = root / "src"
    scenes = [make_test_video(src / "a" / "red.mp4", "h264", seed=0),
              make_test_video(src / "a" / "blue.mp4", "hevc", seed=1),
              make_test_video(src / "b" / "green.webm", "vp9", seed=6)]
    shutil.copyfile(scenes[0], src / "b" / "red_copy.mp4")
    (src / "b" / "blue_near.mp4").write_bytes(scenes[1].read_bytes() + COPY_NOTE)
    make_corrupt_video(src / "b" / "broken.mp4", "random")
    out = root / "out"
    ray.shutdown()
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
                          f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
                          "model.max_new_tokens=6"])
    manifest = run_job(job, progress=False)
    ray.shutdown()
    assert (manifest["counts"]["indexed"], manifest["counts"]["copies"]) == (4, 1)
    return {"src": src, "out": out, "lancedb": out / "lancedb", "runs": out / "runs"}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_search_and_filters(index) -> None:
    from pipeline.catalog.query import Catalog, Filters

    cat = Catalog(str(index["lancedb"]))
    everything = cat.search("a video", k=20)
    assert len(everything) == 5 and all("matching_answer" in h for h in everything)
    by = {mode: {Path(h["uri"]).name for h in cat.search("video", k=20, mode=mode)} for mode in ("vector", "fts")}
    assert by["vector"] == {"red.mp4", "blue.mp4", "green.webm", "red_copy.mp4", "blue_near.mp4"}
    only_b = cat.search("a video", k=20, filters=Filters(prefix=str(index["src"] / "b") + "/"))
    assert {Path(h["uri"]).name for h in only_b} == {"green.webm", "red_copy.mp4", "blue_near.mp4"}
    vp9 = cat.search("a video", k=20, filters=Filters(where="codec = 'vp9' AND duration_s > 1"))
    assert [Path(h["uri"]).name for h in vp9] == ["green.webm"]
    answer = cat.row(str(index["src"] / "a" / "red.mp4"))["answers"][0]
    hits = cat.search("a video", k=20, filters=Filters(answers=[(answer["question"], answer["answer"][:5].upper())]))
    assert "red.mp4" in {Path(h["uri"]).name for h in hits}
    assert hits[0]["matching_answer"].startswith(answer["question"])
    assert cat.search("a video", filters=Filters(since="2999-01-01")) == []
    assert len(cat.search("a video", k=20, filters=Filters(until="2999-01-01"))) == 5
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        cat.search("x", filters=Filters(where="colour = 'red'"))
    with pytest.raises(ValueError, match="ISO date"):
        cat.search("x", filters=Filters(since="yesterday"))


def test_similar_leaves_out_exact_copies(index) -> None:
    from pipeline.catalog.query import Catalog

    cat = Catalog(str(index["lancedb"]))
    red = str(index["src"] / "a" / "red.mp4")
    names = [Path(h["uri"]).name for h in cat.similar(red, k=10)]
    assert "red.mp4" not in names and "red_copy.mp4" not in names  # itself and its exact copy
    assert sorted(names) == ["blue.mp4", "blue_near.mp4", "green.webm"]
    blue = [Path(h["uri"]).name for h in cat.similar(str(index["src"] / "a" / "blue.mp4"), k=1)]
    assert blue == ["blue_near.mp4"]  # the same frames in other bytes: the nearest, not an exact copy
    out = _cli("similar", str(index["lancedb"]), red, "--json")
    assert out.returncode == 0, out.stderr
    assert {Path(h["uri"]).name for h in json.loads(out.stdout)} == set(names)
    plain = _cli("similar", str(index["lancedb"]), red)  # the table shows each hit's answers: there is no query
    assert plain.returncode == 0 and "answers" in plain.stdout
    assert plain.stdout.count("Which direction does it move?") == len(names), plain.stdout


def test_export_is_deterministic_and_groups_near_copies(index, tmp_path: Path) -> None:
    from pipeline.catalog.export import export

    for fmt in ("parquet", "jsonl", "webdataset"):
        a = export(str(index["lancedb"]), tmp_path / f"{fmt}1", fmt=fmt, dedup_threshold=0.999)
        b = export(str(index["lancedb"]), tmp_path / f"{fmt}2", fmt=fmt, dedup_threshold=0.999)
        assert [Path(f).read_bytes() for f in a.files] == [Path(f).read_bytes() for f in b.files], fmt
    # 5 videos; the exact copy and the near copy join their originals: 3 groups, one video each is kept.
    assert (a.videos, a.groups, a.kept) == (5, 3, 3)
    rows = pq.read_table(tmp_path / "parquet1" / "manifest.parquet").to_pylist()
    kept = {Path(r["uri"]).name for r in rows}
    assert kept == {"blue.mp4", "green.webm", "red.mp4"}  # the first of each group by uri
    per_video = {}
    for r in rows:
        per_video.setdefault(r["video_id"], []).append(r)
        assert r["answer"] and r["split"] in ("train", "val") and r["group_id"]
    assert all(len(v) == 3 for v in per_video.values())  # the caption + the demo job's two questions
    assert {r["question"] for r in rows} >= {"Describe the video in detail."}
    # No dedup below exact copies: 4 groups (only red and its copy share content).
    assert export(str(index["lancedb"]), tmp_path / "all", dedup_threshold=1.01).kept == 4
    import tarfile

    # one shape and length bucket: the clips are all 96×64 (aspect 1.5), 2 s
    with tarfile.open(tmp_path / "webdataset1" / "ar1.15-1.54_dur0-5-00000.tar") as tar:
        names = sorted(tar.getnames())
        assert len(names) == 6 and {n.rsplit(".", 1)[1] for n in names} == {"json", "mp4", "webm"}
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_bad_input_is_a_clear_error_and_writes_nothing(index, tmp_path: Path) -> None:
    out = _cli("search", str(index["lancedb"]), "video", "--where", "colour = 'red'")
    assert out.returncode == 2 and "unknown column 'colour'" in out.stderr
    # Read-only commands: a missing index is an error, and stays missing (LanceDB's connect used to create it).
    nowhere, target = tmp_path / "nowhere", tmp_path / "export"
    for args in (("search", str(nowhere), "video"), ("serve", str(nowhere), "--port", str(free_port()))):
        out = _cli(*args)
        assert out.returncode == 2 and "is not an index" in out.stderr, (args, out.stderr)
        assert not nowhere.exists(), args
    from pipeline.catalog.export import export
    from pipeline.catalog.query import Catalog
    from pipeline.index_status import index_status

    for read in (lambda: Catalog(str(nowhere)).similar("x"), lambda: export(str(nowhere), target),
                 lambda: index_status(str(nowhere))):  # what `similar`, `export` and `status` call
        with pytest.raises(ValueError, match="is not an index"):
            read()
        assert not nowhere.exists() and not target.exists()
    (tmp_path / "plain").mkdir()
    out = _cli("export", str(tmp_path / "plain"), "--to", str(target))  # a folder, not an index
    assert out.returncode == 2 and "is not an index" in out.stderr
    assert not list((tmp_path / "plain").iterdir()) and not target.exists()
    target = tmp_path / "export"
    out = _cli("export", str(index["lancedb"]), "--to", str(target), "--where", "nope > 1")
    assert out.returncode == 2 and "unknown column 'nope'" in out.stderr and not target.exists()
    out = _cli("export", str(index["lancedb"]), "--to", str(target), "--where", "duration_s > 1000")
    assert out.returncode == 2 and "select no video" in out.stderr and not target.exists()
    import lancedb

    import schemas

    empty = tmp_path / "empty"
    lancedb.connect(str(empty)).create_table("videos", schema=schemas.video_schema(384, 176))
    out = _cli("search", str(empty), "video")
    assert out.returncode == 2 and "is empty" in out.stderr


def test_status_finds_the_runs_where_the_job_put_them(index) -> None:
    """The job wrote its manifests to out/runs (output.manifest_dir), outside both index roots: the index
    recorded where, and `status` of either root shows the run."""
    from pipeline.index_status import index_status

    out = _cli("status", str(index["lancedb"]), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["manifest_dirs"] == [str(index["runs"])]
    assert status["runs"] and status["runs"][0]["status"] == "succeeded"
    assert index_status(str(index["out"] / "parquet"))["runs"] == status["runs"]
    assert index_status(str(index["lancedb"]), manifest_dir=str(index["out"]))["runs"] == []  # as told, still


def test_a_rerun_with_nothing_new_succeeds_and_keeps_full_paths_when_piped(index) -> None:
    """Every video indexed already: exit 0, no Ray; the summary, piped, shows whole paths (rich cut them at 80
    columns with "…")."""
    out = index["out"]
    job = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
    sets = [f"source.uri={index['src']}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
            f"output.manifest_dir={out}/runs", "model.max_new_tokens=6"]
    run = _cli("run", str(job), *(a for s in sets for a in ("--set", s)))
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "…" not in text and "succeeded" in text
    assert str(out / "parquet" / "videos") in text and f"{out / 'runs'}/" in text
    assert re.search(r"skipped \(up to date\)\s*│\s*5\s*│", text)
    assert re.search(r"indexed \(cells computed\)\s*│\s*0\s", text)


def test_the_page_in_a_real_browser(index, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with served(index["lancedb"], "--manifest-dir", str(index["runs"])) as base, \
            chrome(tmp_path / "chrome") as browser:
        names = {"red.mp4", "blue.mp4", "green.webm", "red_copy.mp4", "blue_near.mp4"}

        def shown() -> list[str]:
            return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".hit .uri")]

        def count_says(text: str) -> None:  # the new page is there (the old one had hits too)
            # a node read while the page is replaced may be gone: Chrome says so as a stale element or, at times,
            # as an inspector error ("Node with given id does not belong to the document")
            WebDriverWait(browser, 60, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                                           WebDriverException)) \
                .until(lambda b: text in b.find_element(By.ID, "count").text)

        browser.get(base + "/")  # the home, before any search: the latest indexed videos
        assert {Path(u).name for u in shown()} == names
        assert browser.find_element(By.ID, "count").text == "videos 1–5 of 5, newest first"
        assert not browser.find_elements(By.CSS_SELECTOR, ".hit .score")  # no search, no score
        browser.save_screenshot(str(tmp_path / "home.png"))
        browser.get(base + "/?n=2")  # a page at a time, through the "older" links
        pages = [shown()]
        while browser.find_elements(By.ID, "older"):
            browser.find_element(By.ID, "older").click()
            count_says(f"videos {2 * len(pages) + 1}–")
            pages.append(shown())
        assert [len(p) for p in pages] == [2, 2, 1] and {Path(u).name for p in pages for u in p} == names
        assert browser.find_element(By.ID, "newer")  # and back
        browser.get(base + "/")
        browser.find_element(By.NAME, "until").send_keys("2000-01-01")  # the until filter, as the CLI's --until
        browser.find_element(By.ID, "go").click()
        count_says("no video matches")
        assert shown() == []
        browser.find_element(By.NAME, "until").clear()
        browser.find_element(By.NAME, "until").send_keys("2999-01-01")
        browser.find_element(By.ID, "go").click()
        count_says("of 5")
        browser.get(base + "/")
        box = browser.find_element(By.NAME, "q")
        box.send_keys("a video")
        browser.find_element(By.NAME, "prefix").send_keys(str(index["src"] / "b" / "green"))
        browser.find_element(By.ID, "go").click()
        count_says("result(s)")
        hits = browser.find_elements(By.CSS_SELECTOR, ".hit")
        assert len(hits) == 1 and hits[0].find_element(By.CSS_SELECTOR, ".uri").text.endswith("green.webm")
        score, body = (hits[0].find_element(By.CSS_SELECTOR, c) for c in (".score", ".body"))
        assert score.text.split()[0] == "score" and float(score.text.split()[1]) > 0
        assert score.location["x"] >= body.location["x"] + body.size["width"]  # a column apart from the name
        img = hits[0].find_element(By.TAG_NAME, "img")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        browser.save_screenshot(str(tmp_path / "search.png"))
        hits[0].find_element(By.CSS_SELECTOR, ".uri").click()
        player = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.ID, "player")))
        assert "/media/" in player.get_attribute("src")
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(
            "return arguments[0].readyState >= 1 && arguments[0].duration > 1", player))  # the file plays
        assert browser.find_element(By.ID, "caption").text
        assert browser.find_elements(By.CSS_SELECTOR, ".similar a")  # what looks like it
        browser.save_screenshot(str(tmp_path / "video.png"))
        until = urllib.parse.urlencode({"q": "a video", "until": "2000-01-01"})
        assert json.load(urllib.request.urlopen(f"{base}/api/search?{until}", timeout=60)) == []
        browser.get(base + "/runs")
        assert "succeeded" in browser.find_element(By.ID, "runs").text
        assert (tmp_path / "search.png").stat().st_size > 1000


def test_near_visual_keeps_to_one_model_and_leaves_a_content_out(tmp_path) -> None:
    """`similar`'s query: without filters the nearest hits are filtered afterwards; where that leaves fewer than k
    (a backfill: most rows still show another model's embedding) it filters first, so k hits still come back."""
    import numpy as np
    import pyarrow as pa

    from pipeline.catalog.query import Catalog
    from pipeline.store.lance import connect_lance

    rng = np.random.default_rng(0)
    n = 60
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    models = ["old"] * 50 + ["new"] * 10  # the nearest rows are mostly the old model's
    connect_lance(str(tmp_path)).create_table("videos", pa.table({
        "video_id": [f"v{i}" for i in range(n)], "content_id": [f"c{i // 2}" for i in range(n)],
        "uri": [f"/v/{i}.mp4" for i in range(n)], "caption": [""] * n, "visual_model": models,
        "visual_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)}))
    cat = Catalog(str(tmp_path))
    hits = cat.near_visual(vectors[55], "new", k=5, leave_out="c27")
    ids = [h["video_id"] for h in hits]
    assert len(ids) == 5 and all(int(i[1:]) >= 50 for i in ids)  # the new model's rows only
    assert "v54" not in ids and "v55" not in ids  # the content left out, both its copies
    first = cat.near_visual(vectors[10], "old", k=3)
    assert [h["video_id"] for h in first][0] == "v10" and all(h["_score"] <= 1.0 + 1e-6 for h in first)
