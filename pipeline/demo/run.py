"""`make demo`: synthetic-world clips → the demo job with the shipped world model (CPU) → each caption beside the
truth, and a search for one clip's description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.paths import index_home

DEMO_CODECS = ("h264", "hevc", "vp9", "av1")
DEMO_SCENES = 2  # clips per codec
DEMO_SEED = 7  # held-out scenes (their own seed stream): clips the shipped model never saw


def make_demo_videos(folder: Path) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """World clips in four codecs (AV1 needs the PyAV fallback) plus one corrupt file; and each clip's truth."""
    from pipeline.demo.clips import encode_frames, make_corrupt_video
    from stllm.world.render import render
    from stllm.world.scenes import sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for i, codec in enumerate(c for c in DEMO_CODECS for _ in range(DEMO_SCENES)):
        scene = sample_scene(DEMO_SEED, "heldout", i)
        path = folder / f"{codec}_{i % DEMO_SCENES}.{'webm' if codec == 'vp9' else 'mp4'}"
        if not path.exists():
            encode_frames(path, codec, render(scene), (scene.width, scene.height), scene.fps)
        paths.append(path)
        truth[path.name] = {"caption": scene.caption(), **scene.answers()}
    bad = folder / "corrupt.mp4"
    if not bad.exists():
        make_corrupt_video(bad, "random")
    paths.append(bad)
    (folder.parent / "truth.json").write_text(json.dumps(truth, indent=2))
    return paths, truth


def demo_overrides(root: Path) -> list[str]:
    """The demo job (jobs/demo.yaml) pointed at the world model and asked the world's questions."""
    from stllm.world.scenes import CAPTION_PROMPT, QUESTIONS

    return [
        f"source.uri={root / 'videos'}",
        f"output.parquet={root / 'index' / 'parquet'}",
        f"output.lancedb={root / 'index' / 'lancedb'}",
        f"output.manifest_dir={root / 'index' / 'runs'}",
        "model.path=world",
        "prompt.preset=qa",
        f"caption_prompt={CAPTION_PROMPT}",
        "questions=" + json.dumps([QUESTIONS[q] for q in ("colour", "shape", "direction")]),
    ]


def run_demo(workdir: Path | None = None) -> int:
    from pipeline.catalog.search import search
    from pipeline.jobs import load_job
    from pipeline.report import console as user_console
    from pipeline.runner import run_job
    from stllm.world.scoring import answer_is_right

    console = user_console()
    root = Path(workdir or index_home() / "demo-world")
    videos, truth = make_demo_videos(root / "videos")
    console.print(f"[bold]stllm-index demo[/bold]: {len(videos)} synthetic-world clips in {root / 'videos'} "
                  "(one corrupt), truth in truth.json")
    console.print("model: the shipped synthetic-world ST-LLM (stllm/world/demo_model; docs/world-model.md: how it "
                  "was made)")
    job = load_job(None, demo_overrides(root))
    manifest = run_job(job, progress=True)
    counts = manifest["counts"]
    if counts["indexed"] + counts["copies"] + counts["errors"] == 0:
        console.print(f"nothing new: all {counts['skipped']} clips were already indexed with this model and "
                      f"these questions, {counts['known_bad']} known-bad file(s) skipped (index: {root / 'index'})")
    import lancedb

    rows = lancedb.connect(job.output.lancedb).open_table(job.output.table).to_arrow().to_pylist()
    right = 0
    console.print("\n[bold]captions[/bold] (model → truth)")
    for row in sorted(rows, key=lambda r: r["uri"]):
        want = truth.get(Path(row["uri"]).name)
        if want is None:
            continue
        ok = answer_is_right("caption", row["caption"], want["caption"])
        right += ok
        answers = ", ".join(a["answer"] for a in row["answers"])
        console.print(f"{'✓' if ok else '✗'} {Path(row['uri']).name:12} {row['caption']!r}  answers: {answers}"
                      + ("" if ok else f"  (truth: {want['caption']!r})"))
    console.print(f"{right}/{len(truth)} captions exactly right")
    name, want = next(iter(truth.items()))
    query = f"{want['colour']} {want['shape']}"
    console.print(f"\n[bold]search[/bold] (full text: {query!r})")
    hits = search(job.output.lancedb, job.output.table, text=query, k=1)
    for hit in hits:
        console.print({k: hit[k] for k in ("uri", "caption", "decoder", "codec") if k in hit})
    return 0 if counts["indexed"] + counts["copies"] + counts["skipped"] > 0 else 1
