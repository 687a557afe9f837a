"""Engine benchmarks: vLLM over hf throughput on the same tiny weights and batch; ViT passes per video."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.common import Result

QUESTIONS = ["Describe the video in detail.", "What is happening?", "Where does it take place?"]


def _requests(n: int, first: int = 0):
    from stllm.engine import VideoRequest
    from tests.tiny_fixtures import synthetic_frames

    return [VideoRequest(f"v{i}", synthetic_frames(i, t=8, h=224, w=224), QUESTIONS) for i in range(first, first + n)]


def bench_engines(videos: int = 32, max_new_tokens: int = 32) -> list[Result]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from stllm.engine import GenerationOptions
    from stllm.hf_engine import HFEngine
    from stllm.tiny import build_tiny
    from stllm.vllm.engine import VLLMEngine

    opts = GenerationOptions(max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny(f"{tmp}/tiny"))
        hf = HFEngine.from_pretrained(path, dtype="float32", device="cpu", max_batch_size=32)
        hf.generate(_requests(2, first=10_000), opts)  # warm-up on other clips
        t0 = time.perf_counter()
        hf_out = hf.generate(_requests(videos), opts)
        hf_s = time.perf_counter() - t0
        del hf
        engine = VLLMEngine.from_pretrained(path, dtype="float32", device="cpu")
        try:
            engine.generate(_requests(2, first=10_000), opts)  # warm-up (other clips: no cache hits)
            before = engine.vit_forwards
            t0 = time.perf_counter()
            vllm_out = engine.generate(_requests(videos), opts)
            vllm_s = time.perf_counter() - t0
            vit = (engine.vit_forwards - before) / videos
        finally:
            engine.close()
    same = sum(
        a.token_ids == b.token_ids for x, y in zip(hf_out, vllm_out, strict=True)
        for a, b in zip(x.answers, y.answers, strict=True)
    )
    ratio = (videos / vllm_s) / (videos / hf_s)
    return [
        Result("vllm_vs_hf_throughput", ratio, ">= 3", detail={
            "videos": videos, "questions": len(QUESTIONS), "max_new_tokens": max_new_tokens,
            "hf_videos_per_s": round(videos / hf_s, 3), "vllm_videos_per_s": round(videos / vllm_s, 3),
            "identical_answers": f"{same}/{videos * len(QUESTIONS)}", **{f"vllm_{k}": round(v, 2) for k, v in
                                                                        engine.last_timings.items()}}),
        Result("vit_forwards_per_video", float(vit), "== 1", unit="passes",
               detail={"questions_per_video": len(QUESTIONS), "engine": "vllm"}),
    ]


if __name__ == "__main__":
    from benchmarks.common import print_table

    print_table(bench_engines())
    np.set_printoptions()
