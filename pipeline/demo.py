"""`make demo`: generated sample clips → the embedded demo job (tiny random model, CPU) → summary + a search."""

from __future__ import annotations

from pathlib import Path

from pipeline.paths import index_home

DEMO_CODECS = ("h264", "hevc", "vp9", "av1")
DEMO_SCENES = 2  # clips per codec: different colours/motions so search has something to tell apart


def make_demo_videos(folder: Path) -> list[Path]:
    """Sample clips in four codecs (AV1 needs the PyAV fallback) plus one corrupt file."""
    from pipeline.demo_clips import make_corrupt_video, make_test_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for codec in DEMO_CODECS:
        for scene in range(DEMO_SCENES):
            ext = "webm" if codec == "vp9" else "mp4"
            path = folder / f"{codec}_{scene}.{ext}"
            if not path.exists():
                make_test_video(path, codec, seed=scene)
            paths.append(path)
    bad = folder / "corrupt.mp4"
    if not bad.exists():
        make_corrupt_video(bad, "random")
    paths.append(bad)
    return paths


def run_demo(workdir: Path | None = None) -> int:
    from pipeline.catalog.search import search
    from pipeline.jobs import load_job
    from pipeline.report import console as user_console
    from pipeline.runner import run_job

    console = user_console()
    root = Path(workdir or index_home() / "demo")
    videos = make_demo_videos(root / "videos")
    console.print(f"[bold]stllm-index demo[/bold]: {len(videos)} sample clips in {root / 'videos'}")
    console.print("model: the tiny RANDOM ST-LLM (captions are noise); see README for real weights")
    job = load_job(None, [
        f"source.uri={root / 'videos'}",
        f"output.parquet={root / 'index' / 'parquet'}",
        f"output.lancedb={root / 'index' / 'lancedb'}",
        f"output.manifest_dir={root / 'index' / 'runs'}",
    ])
    manifest = run_job(job, progress=True)
    counts = manifest["counts"]
    if counts["indexed"] + counts["copies"] + counts["errors"] == 0:
        console.print(f"nothing new: all {counts['skipped']} clips were already indexed with this model and "
                      f"these questions, {counts['known_bad']} known-bad file(s) skipped (index: {root / 'index'})")
    console.print("\n[bold]search[/bold] (full text: 'video')")
    hits = search(job.output.lancedb, job.output.table, text="video", k=1)
    for hit in hits:
        console.print({k: hit[k] for k in ("uri", "caption", "answers", "decoder", "codec") if k in hit})
    return 0 if counts["indexed"] + counts["copies"] + counts["skipped"] > 0 else 1
