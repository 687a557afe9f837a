"""What a change to a job costs: `add_question_cost`.

N generated clips (distinct frames) are indexed from scratch with a caption and 4 questions (the baseline),
then, into a second index, with a caption and 3 questions followed by the 4th added — the product's `run_job`,
hf engine, tiny model, CPU, one process, Ray started once before either is timed. The figure: the wall time of
adding the question over the wall time of indexing from scratch; the detail: the exact generations count of the
added run (must be N answers, 0 captions), and the engine's own speed on the same clips (videos/s of one
`generate` call with the 5 prompts, warm) so the ratio can be read against what the model costs here.

    python -m benchmarks.evolve [--quick]      (the same as python -m benchmarks.run --only evolve)
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, from_reps

QUESTIONS = ["What is the main object?", "Which direction does it move?", "What colour is it?", "Is it large?"]


def _overrides(src: Path, out: Path, questions: list[str]) -> list[str]:
    return [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
            f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0",
            "model.max_new_tokens=16", "questions=" + json.dumps(questions)]


def bench_evolve(quick: bool = False, videos: int | None = None, repeats: int = 3) -> list[Result]:
    videos = videos or (24 if quick else 120)
    import ray

    from pipeline.demo.clips import make_test_video
    from pipeline.jobs import load_job
    from pipeline.runner import init_ray, run_job

    root = Path(tempfile.mkdtemp(prefix="bench-evolve-", dir="/tmp"))
    try:
        src = root / "src"
        for i in range(videos):
            make_test_video(src / f"clip{i:04d}.mp4", "h264", n_frames=24, size=(96, 64), seed=1000 + i)
        init_ray(None, load_job(None, _overrides(src, root / "warm", QUESTIONS)))
        ratios, scratch_s, added_s, counts = [], [], [], []
        for k in range(repeats):
            t0 = time.perf_counter()
            run_job(load_job(None, _overrides(src, root / f"scratch{k}", QUESTIONS)), progress=False)
            scratch = time.perf_counter() - t0
            run_job(load_job(None, _overrides(src, root / f"grown{k}", QUESTIONS[:3])), progress=False)
            t0 = time.perf_counter()
            m = run_job(load_job(None, _overrides(src, root / f"grown{k}", QUESTIONS)), progress=False)
            added = time.perf_counter() - t0
            counts.append(m["counts"]["generations"])
            scratch_s.append(scratch)
            added_s.append(added)
            ratios.append(added / scratch)
        engine_vps = _engine_speed(src, videos)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    detail = {"videos": videos, "repeats": repeats, "ratios": [round(r, 3) for r in ratios],
              "scratch_s": [round(s, 1) for s in scratch_s], "add_question_s": [round(s, 1) for s in added_s],
              "generations_of_added_runs": counts, "engine_alone_videos_per_s_5_prompts": round(engine_vps, 2)}
    exact = all(c == {"caption": 0, "answer": videos} for c in counts)
    return [from_reps("add_question_cost", ratios, "<= 0.5", detail=detail, baseline={
                "what": "indexing the same clips from scratch (caption + 4 questions)",
                "seconds": round(statistics.median(scratch_s), 1)}),
            Result("add_question_generations_exact", 1.0 if exact else 0.0, "== 1", "bool", {"counts": counts})]


def _engine_speed(src: Path, videos: int) -> float:
    """The hf engine alone on the decoded clips: one warm `generate` with the caption + 4 questions."""
    from pipeline.decode import decode_video
    from pipeline.paths import ensure_tiny_model
    from stllm import GenerationOptions, VideoRequest, load_engine
    from stllm.configuration_stllm import STLLMConfig

    model = ensure_tiny_model()
    config = STLLMConfig.from_pretrained(model)
    engine = load_engine("hf", str(model), dtype="float32", device="cpu")
    clips = sorted(src.glob("*.mp4"))[:videos]
    frames = [decode_video(p.read_bytes(), num_frames=config.num_frames, size=config.image_size).frames
              for p in clips]
    prompts = ["Describe the video in detail.", *QUESTIONS]
    opts = GenerationOptions(max_new_tokens=16)
    engine.generate([VideoRequest("warm", frames[0], prompts, sampled=True)], opts)
    t0 = time.perf_counter()
    for i in range(0, len(frames), 4):
        engine.generate([VideoRequest(str(j), f, prompts, sampled=True) for j, f in enumerate(frames[i:i + 4])], opts)
    return len(frames) / (time.perf_counter() - t0)


if __name__ == "__main__":
    import sys

    from benchmarks.run import main

    sys.exit(main(["--only", "evolve", *sys.argv[1:]]))
