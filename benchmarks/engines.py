"""Engine benchmarks: vLLM over hf throughput on the same tiny weights and batch; ViT passes per video.

Both engines stay up and take turns on the same fresh clips (`ROUNDS` rounds, new clips each round, so no
ViT cache hit carries over); a round's ratio is hf's time over vLLM's on its clips, the figure the median over
the rounds (range beside). On a shared 2-core machine single runs swing by 10× or more (other processes' load;
the hf engine's two OpenMP threads suffer most). Each engine runs with its defaults: hf with two torch threads
and batches of 32 pairs (96 pairs in one batch is no faster), vLLM with its CPU defaults (one worker thread,
the other core reserved for its scheduler and our input processing).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from benchmarks.common import Result, from_reps

QUESTIONS = ["Describe the video in detail.", "What is happening?", "Where does it take place?"]
ROUNDS = 3


def _requests(n: int, first: int = 0):
    from stllm.engine import VideoRequest
    from tests.tiny_fixtures import synthetic_frames

    return [VideoRequest(f"v{i}", synthetic_frames(i, t=8, h=224, w=224), QUESTIONS, sampled=True)
            for i in range(first, first + n)]


def _tokens(results) -> list[list[list[int]]]:
    return [[a.token_ids for a in r.answers] for r in results]


def bench_engines(quick: bool = False, videos: int | None = None, max_new_tokens: int = 32,
                  rounds: int = ROUNDS) -> list[Result]:
    videos = videos or (8 if quick else 32)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from stllm.engine import GenerationOptions
    from stllm.hf_engine import HFEngine
    from stllm.tiny import build_tiny
    from stllm.vllm.engine import VLLMEngine

    opts = GenerationOptions(max_new_tokens=max_new_tokens)
    hf_s, vllm_s, same, vit = [], [], [], []
    timings: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny(f"{tmp}/tiny"))
        hf = HFEngine.from_pretrained(path, dtype="float32", device="cpu", max_batch_size=32)
        hf.generate(_requests(2, first=10_000), opts)  # warm-up on other clips
        engine = VLLMEngine.from_pretrained(path, dtype="float32", device="cpu")
        try:
            engine.generate(_requests(2, first=10_000), opts)  # warm-up (other clips: no cache hits)
            for r in range(rounds):
                requests = _requests(videos, first=1_000 * r)
                time.sleep(1.5)  # vLLM's processes busy-poll for 1 s after their last message
                t0 = time.perf_counter()
                hf_out = hf.generate(requests, opts)
                hf_s.append(time.perf_counter() - t0)
                before = engine.vit_forwards
                t0 = time.perf_counter()
                vllm_out = engine.generate(requests, opts)
                vllm_s.append(time.perf_counter() - t0)
                vit.append((engine.vit_forwards - before) / videos)
                same.append(sum(a == b for x, y in zip(_tokens(hf_out), _tokens(vllm_out), strict=True)
                                for a, b in zip(x, y, strict=True)))
                if vllm_s[-1] == min(vllm_s):
                    timings["vllm"] = engine.last_timings
                if hf_s[-1] == min(hf_s):
                    timings["hf"] = hf.last_timings
        finally:
            engine.close()
    pairs = videos * len(QUESTIONS)
    return [
        from_reps("vllm_vs_hf_throughput", [h / v for h, v in zip(hf_s, vllm_s, strict=True)], ">= 3", baseline={
            "what": "the hf engine, same weights, clips and batch", "videos_per_s": round(videos / statistics.median(
                hf_s), 3)}, detail={
            "videos": videos, "questions": len(QUESTIONS), "max_new_tokens": max_new_tokens, "rounds": rounds,
            "vllm_videos_per_s": round(videos / statistics.median(vllm_s), 3),
            "hf_s": [round(x, 2) for x in hf_s], "vllm_s": [round(x, 2) for x in vllm_s],
            "identical_answers": f"{min(same)}/{pairs}",
            **{f"{e}_{k}": round(v, 2) for e, t in timings.items() for k, v in t.items()}}),
        Result("vit_forwards_per_video", float(max(vit)), "== 1", unit="passes",
               detail={"questions_per_video": len(QUESTIONS), "engine": "vllm", "rounds": rounds}),
    ]


