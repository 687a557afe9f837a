"""Curation on a real index (issue 25): filters on the scores through the CLI and the page, each score's histogram
(`status`, the page), and the training export — WebDataset shards by shape/length bucket, byte-identical across
runs, with a manifest of what was left out and why.

The index is built by a real run of the pipeline over clips with planted properties and known sizes and lengths
(`pipeline.demo.clips.PlantedClip`): one still, one dark, one exact copy, one near copy (the same frames, other
bytes), and three moving clips of other shapes — one long enough to be cut into segments."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.demo.clips import PlantedClip, make_planted_clip

# name → the clip: (width, height) and n_frames / fps give its shape and length
CLIPS = {
    "a/wide.mp4": PlantedClip(1, size=(128, 72)),  # 16:9, 2 s
    "a/square.mp4": PlantedClip(2, size=(96, 96), n_frames=32, fps=8),  # 1:1, 4 s
    "a/portrait.mp4": PlantedClip(3, size=(72, 128), n_frames=48, fps=4),  # 9:16, 12 s: three 4 s segments
    "b/still.mp4": PlantedClip(4, moving=False, size=(128, 96)),  # 4:3, 2 s, nothing moves
    "b/dark.mp4": PlantedClip(5, gain=0.2, size=(128, 96)),  # 4:3, 2 s, a fifth of the light
}
NEAR_NOTE = b"\x00\x00\x00\x10free" + b"near-cop"  # an MP4 `free` box: other bytes, the same frames
# Buckets "duration=3,10" (aspect: the default edges 0.87, 1.15, 1.54, 2.04), worked out by hand from CLIPS.
SPEC = "duration=3,10"
BUCKET = {"wide.mp4": "ar1.54-2.04_dur0-3", "square.mp4": "ar0.87-1.15_dur3-10",
          "portrait.mp4": "ar0-0.87_dur10-inf", "still.mp4": "ar1.15-1.54_dur0-3", "dark.mp4": "ar1.15-1.54_dur0-3"}
DEFAULT_BUCKET = {"wide.mp4": "ar1.54-2.04_dur0-5", "square.mp4": "ar0.87-1.15_dur0-5",
                  "portrait.mp4": "ar0-0.87_dur5-15", "still.mp4": "ar1.15-1.54_dur0-5",
                  "dark.mp4": "ar1.15-1.54_dur0-5", "wide_copy.mp4": "ar1.54-2.04_dur0-5"}


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> dict[str, Path]:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    root = tmp_path_factory.mktemp("curation")
    src = root / "src"
    for name, clip in CLIPS.items():
        make_planted_clip(src / name, clip)
    shutil.copyfile(src / "a" / "wide.mp4", src / "b" / "wide_copy.mp4")
    (src / "b" / "wide_near.mp4").write_bytes((src / "a" / "wide.mp4").read_bytes() + NEAR_NOTE)
    out = root / "out"
    ray.shutdown()
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
                          f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
                          "model.max_new_tokens=4", "segments.mode=fixed", "segments.length_s=4"])
    manifest = run_job(job, progress=False)
    ray.shutdown()
    assert (manifest["counts"]["indexed"], manifest["counts"]["copies"]) == (6, 1), manifest["counts"]
    return {"src": src, "lancedb": out / "lancedb", "parquet": out / "parquet", "runs": out / "runs"}


def _view(curated) -> dict[str, dict]:
    import lancedb

    rows = lancedb.connect(str(curated["lancedb"])).open_table("videos").to_arrow().to_pylist()
    return {Path(r["uri"]).name: r for r in rows}


def _cli(capfd, *args: str) -> tuple[int, str, str]:
    """`stllm-index ARGS` in this process (its imports and the text embedder load once for all calls)."""
    from pipeline.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def test_score_filters_through_the_cli(curated, capfd) -> None:
    index, wide = str(curated["lancedb"]), str(curated["src"] / "a" / "wide.mp4")

    def found(*args: str) -> list[str]:
        code, out, err = _cli(capfd, *args, "--json")
        assert code == 0, err
        return sorted(Path(h.get("media_fragment") or h["uri"]).name for h in json.loads(out))

    def search(where: str, *more: str) -> list[str]:
        return found("search", index, "a video", "--mode", "vector", "-k", "20", "--where", where, *more)

    assert search("score_static_fraction > 0.5") == ["still.mp4"]
    assert search("score_brightness < 0.2") == ["dark.mp4"]
    assert search("score_motion > 0.001 AND score_blank_fraction < 0.1") == [
        "portrait.mp4", "square.mp4", "wide.mp4", "wide_copy.mp4", "wide_near.mp4"]
    assert search("score_text_fraction > 0") == []  # OCR off: null, and null is no match
    # moments: each segment has its own scores
    assert search("score_static_fraction > 0.5", "--segments") == ["still.mp4#t=0,2"]
    assert search("score_motion > 0.001 AND start_s >= 4", "--segments") == ["portrait.mp4#t=4,8",
                                                                              "portrait.mp4#t=8,12"]
    assert found("similar", index, wide, "--where", "score_static_fraction > 0.5") == ["still.mp4"]
    assert found("similar", index, wide, "--segments", "--where", "score_brightness < 0.2") == ["dark.mp4#t=0,2"]
    code, _, err = _cli(capfd, "search", index, "a video", "--where", "motion > 0.2")
    assert code == 2 and "unknown column 'motion'; did you mean 'score_motion'?" in err


def test_histograms_over_the_index(curated, capfd) -> None:
    """Every score's histogram in `status` (text and JSON, Parquet root or LanceDB folder), checked against
    numpy's histogram of the view's values; null scores counted apart."""
    from pipeline.catalog.histograms import NUMERIC_SCORES, histogram, text_bars
    from pipeline.index_status import index_status

    code, out, err = _cli(capfd, "status", str(curated["lancedb"]), "--json")
    assert code == 0, err
    hists = {h["column"]: h for h in json.loads(out)["histograms"]}
    assert list(hists) == list(NUMERIC_SCORES)
    assert index_status(str(curated["parquet"]))["histograms"] == list(hists.values())
    view = _view(curated)
    for column, h in hists.items():
        values = [r[column] for r in view.values() if r[column] is not None]
        assert h["nulls"] == len(view) - len(values) and h["values"] == len(values), column
        if values:
            assert h["counts"] == np.histogram(values, bins=h["edges"])[0].tolist(), column
            assert h["edges"][0] <= min(values) and max(values) <= h["edges"][-1]
    static = hists["score_static_fraction"]
    assert static["edges"] == [i / 20 for i in range(21)] and static["counts"][-1] == 1 and static["counts"][0] == 6
    for column in ("score_cuts", "score_text_fraction"):  # no shot detector, no OCR: all null, apart
        assert (hists[column]["nulls"], hists[column]["edges"], hists[column]["counts"]) == (7, [], [])
    code, out, _ = _cli(capfd, "status", str(curated["lancedb"]))
    line = next(t for t in out.splitlines() if "score_static_fraction" in t)
    assert text_bars(static["counts"]) in line and "█" in line
    h = histogram("score_cuts", pa.array([0, 3, 1, None, 3]))
    assert (h.edges, h.counts, h.nulls) == ([0.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 0, 2], 1)
    h = histogram("score_sharpness", pa.array([3.0, 1140.0, float("nan")]))
    assert (h.edges[:3], h.edges[-1], sum(h.counts), h.nulls) == ([0.0, 100.0, 200.0], 1200.0, 2, 1)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_webdataset_shards_by_bucket_are_byte_identical(curated, tmp_path: Path) -> None:
    from pipeline.catalog.export import export

    index = str(curated["lancedb"])
    runs = [export(index, tmp_path / f"w{i}", fmt="webdataset", buckets=SPEC, shard_size=1, dedup_threshold=0.999)
            for i in (1, 2)]
    assert [Path(f).name for f in runs[0].files] == [Path(f).name for f in runs[1].files]
    assert [Path(f).read_bytes() for f in runs[0].files] == [Path(f).read_bytes() for f in runs[1].files]
    report, folder, view = runs[0], tmp_path / "w1", _view(curated)
    # shards in bucket order; still and dark share a bucket: two shards of one sample each
    assert [Path(f).name for f in report.files] == [
        "ar0-0.87_dur10-inf-00000.tar", "ar0.87-1.15_dur3-10-00000.tar", "ar1.15-1.54_dur0-3-00000.tar",
        "ar1.15-1.54_dur0-3-00001.tar", "ar1.54-2.04_dur0-3-00000.tar", "shards.json", "left_out.jsonl"]
    assert report.buckets == {"ar0-0.87_dur10-inf": 1, "ar0.87-1.15_dur3-10": 1, "ar1.15-1.54_dur0-3": 2,
                              "ar1.54-2.04_dur0-3": 1}
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        members = _members(shard)
        assert len(members) == 2
        sample = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
        name = Path(sample["uri"]).name
        assert shard.name.startswith(BUCKET[name] + "-") and sample["bucket"] == BUCKET[name]
        assert members[f"{sample['video_id']}.mp4"] == Path(sample["uri"]).read_bytes()
        samples[name] = sample
    assert sorted(samples) == sorted(BUCKET)  # the copies are left out
    for name, s in samples.items():
        row = view[name]
        assert s["caption"] == {"text": row["caption"], "prompt": row["caption_prompt"], "model": row["caption_model"]}
        assert s["answers"] == [{k: a[k] for k in ("question", "answer", "model")} for a in row["answers"]]
        assert [i["question"] for i in s["instructions"]] == [row["caption_prompt"], *(a["question"] for a in
                                                                                       row["answers"])]
        assert s["scores"] == {c.removeprefix("score_"): row[c] for c in row if c.startswith("score_")}
        assert (s["width"], s["height"], s["duration_s"]) == (row["width"], row["height"], row["duration_s"])
    listing = json.loads((folder / "shards.json").read_text())
    assert listing["buckets"] == {"aspect": [0.87, 1.15, 1.54, 2.04], "duration": [3.0, 10.0]}
    assert [(s["file"], s["samples"], s["duration"]) for s in listing["shards"]][:2] == [
        ("ar0-0.87_dur10-inf-00000.tar", 1, [10.0, None]), ("ar0.87-1.15_dur3-10-00000.tar", 1, [3.0, 10.0])]
    left = [json.loads(line) for line in (folder / "left_out.jsonl").read_text().splitlines()]
    wide = str(curated["src"] / "a" / "wide.mp4")
    assert [(Path(x["uri"]).name, x["reason"], x["kept"], x["exact_copy"]) for x in left] == [
        ("wide_copy.mp4", "duplicate", wide, True), ("wide_near.mp4", "duplicate", wide, False)]
    assert left[1]["similarity"] >= 0.999


def test_the_left_out_manifest_names_the_filter_or_the_kept_duplicate(curated, tmp_path: Path, capfd) -> None:
    """Through the CLI, default buckets: b/ only, bright enough. a/ fails the prefix, dark the brightness; of the
    two copies of wide in b/ the first by uri is kept."""
    index, src, target = str(curated["lancedb"]), curated["src"], tmp_path / "shards"
    code, out, err = _cli(capfd, "export", index, "--to", str(target), "--format", "webdataset", "--dedup", "0.999",
                          "--prefix", f"{src / 'b'}/", "--where", "score_brightness >= 0.2")
    assert code == 0, err
    assert "left out: 1 duplicate, 4 filter" in out
    left = {Path(x["uri"]).name: x for x in map(json.loads, (target / "left_out.jsonl").read_text().splitlines())}
    assert {n: (x["reason"], x.get("filters")) for n, x in left.items() if x["reason"] == "filter"} == {
        "wide.mp4": ("filter", [f"prefix {src / 'b'}/"]), "square.mp4": ("filter", [f"prefix {src / 'b'}/"]),
        "portrait.mp4": ("filter", [f"prefix {src / 'b'}/"]),
        "dark.mp4": ("filter", ["where score_brightness >= 0.2"])}
    assert (left["wide_near.mp4"]["reason"], Path(left["wide_near.mp4"]["kept"]).name) == ("duplicate",
                                                                                          "wide_copy.mp4")
    shards = sorted(p.name for p in target.glob("*.tar"))
    assert shards == sorted(f"{DEFAULT_BUCKET[n]}-00000.tar" for n in ("still.mp4", "wide_copy.mp4"))


def test_export_takes_a_models_results_from_the_history(curated, tmp_path: Path) -> None:
    from pipeline.catalog.export import export

    index = str(curated["lancedb"])
    model = _view(curated)["wide.mp4"]["caption_model"]
    shown = export(index, tmp_path / "view", fmt="jsonl", dedup_threshold=0.999)
    history = export(index, tmp_path / "history", fmt="jsonl", dedup_threshold=0.999, model=model)
    # one model on this index: its history holds exactly what the view shows
    assert Path(shown.files[0]).read_bytes() == Path(history.files[0]).read_bytes()
    with pytest.raises(ValueError, match=f"no results of model 'other' in this index \\(models: {model}\\)"):
        export(index, tmp_path / "none", fmt="jsonl", model="other")
    assert not (tmp_path / "none").exists()


def test_bucket_specs() -> None:
    from pipeline.catalog.buckets import Buckets

    default = Buckets.parse(None)
    assert default.of(1920, 1080, 30.0).name == "ar1.54-2.04_dur15-60"
    assert default.of(1080, 1920, 75.0).name == "ar0-0.87_dur60-inf"
    assert default.of(None, None, None).name == "arNA_durNA"
    spec = Buckets.parse("aspect=;duration=10;res=480,720")
    assert [spec.of(1280, 720, d).name for d in (9.9, 10.0)] == ["dur0-10_res720-inf", "dur10-inf_res720-inf"]
    assert Buckets.parse("aspect=;duration=").of(64, 64, 1.0).name == "all"
    for bad, message in (("fps=30", "DIMENSION=EDGES"), ("duration=5,1", "increasing"), ("aspect=x", "numbers")):
        with pytest.raises(ValueError, match=message):
            Buckets.parse(bad)


def test_the_page_filters_on_scores_and_draws_their_histograms(curated, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chrome, served

    with served(curated["lancedb"], "--manifest-dir", str(curated["runs"])) as base, chrome(tmp_path / "c") as b:
        def shown() -> list[str]:
            return sorted(Path(e.text).name for e in b.find_elements(By.CSS_SELECTOR, ".hit .uri"))

        def until(test) -> None:  # the new page is there (elements of the old one may go stale meanwhile)
            # Chrome at times says "Node with given id does not belong to the document" instead of stale
            WebDriverWait(b, 60, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                                     WebDriverException)).until(test)

        def count_says(text: str) -> None:
            until(lambda d: text in d.find_element(By.ID, "count").text)

        def bounds(**values: str) -> None:
            for name, value in values.items():
                box = b.find_element(By.NAME, name)
                box.clear()
                box.send_keys(value)

        b.get(base + "/")
        panel = b.find_element(By.ID, "scores")
        assert panel.get_attribute("open") is None  # closed until a bound is set
        panel.find_element(By.TAG_NAME, "summary").click()
        rows = b.find_elements(By.CSS_SELECTOR, "#scores tr")
        assert [r.get_attribute("id") for r in rows] == [
            "score-motion", "score-sharpness", "score-brightness", "score-contrast", "score-static_fraction",
            "score-blank_fraction", "score-cuts", "score-text_fraction"]
        static = b.find_element(By.ID, "score-static_fraction")
        bars = static.find_elements(By.CSS_SELECTOR, "svg.hist rect")
        assert len(bars) == 20 and sum(int(r.get_attribute("data-count")) for r in bars) == 7
        assert "7 without a value" in b.find_element(By.ID, "score-cuts").text  # no shot detector: nulls apart
        bounds(static_fraction_min="0.5")
        b.find_element(By.ID, "apply").click()
        count_says("of 1,")
        assert shown() == ["still.mp4"]
        static = b.find_element(By.ID, "score-static_fraction")  # the bars the bound keeps are drawn dark
        kept = static.find_elements(By.CSS_SELECTOR, "svg.hist rect:not(.out)")
        assert sum(int(r.get_attribute("data-count")) for r in kept) == 1
        assert "static_fraction 1" in b.find_element(By.CSS_SELECTOR, ".hit .score-line").text
        b.save_screenshot(str(tmp_path / "scores.png"))
        bounds(static_fraction_min="", brightness_max="0.2", q="a video")  # a search, with a bound
        b.find_element(By.ID, "go").click()
        count_says("result(s)")
        assert shown() == ["dark.mp4"] and b.find_element(By.ID, "scores").get_attribute("open") is not None
        bounds(brightness_max="", motion_min="0.001", blank_fraction_max="0.1")
        b.find_element(By.ID, "moments").click()  # moments of long recordings, by their own scores
        b.find_element(By.ID, "go").click()
        until(lambda d: "#t=" in d.find_element(By.CSS_SELECTOR, ".hit .uri").text)
        names = [Path(e.text).name for e in b.find_elements(By.CSS_SELECTOR, ".hit .uri")]
        assert len(names) == 7 and "still.mp4#t=0,2" not in names and "dark.mp4#t=0,2" not in names
        b.get(base + "/?static_fraction_min=x")
        assert "is not a number" in b.find_element(By.ID, "error").text
