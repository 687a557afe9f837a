"""GPU throughput of the `vllm` engine on the real-size ST-LLM architecture with dummy weights.

Real sizes (STLLMConfig() defaults: EVA ViT-g 39 blocks, BERT-base Q-Former, LLaMA-7B with vocab 32001),
64 frames, global-local input (16 local frames → 512 visual tokens), one caption + 3 answers of up to
128 new tokens per video. Weights are random (`load_format="dummy"`), so the text is noise; the work per
token is the real one. The tokenizers are the tiny builder's (401 pieces): sampling is restricted to those
ids so that detokenization and the "###" stop check stay valid while the LM head still computes 32001
logits.

    python benchmarks/gpu_vllm.py --videos 64            # on a GPU machine (vllm installed)
    python benchmarks/gpu_vllm.py --smoke                 # tiny sizes on CPU: checks the script itself

Prints one JSON line (videos/s, new tokens/s, ViT forwards per video, timings, the engine's stats). Exits 0 with
a note when no GPU is present and --smoke is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CAPTION = "Describe the video in detail."
QUESTIONS = ["What is happening in the video?", "How many people are there?", "Where does the video take place?"]


def write_config_folder(dst: Path, smoke: bool) -> Path:
    """config.json (+ both tokenizers) of the real-size architecture; no weights (vLLM draws dummy ones)."""
    from transformers import LlamaConfig

    from stllm.configuration_stllm import STLLMConfig
    from stllm.processing_stllm import QFORMER_TOKENIZER_DIR
    from stllm.tiny import tiny_config, train_tiny_sentencepiece
    from stllm.tokenizers import build_qformer_tokenizer, load_llama_tokenizer, write_sentencepiece_tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_sentencepiece_tokenizer(tmp, train_tiny_sentencepiece())
        tokenizer = load_llama_tokenizer(tmp)
    if smoke:
        config = tiny_config(len(tokenizer), video_input="residual")
    else:
        # The placeholder is the pad id; it must be the tokenizer's [PAD] (400 here, 32000 in the release).
        text = LlamaConfig(vocab_size=32001, pad_token_id=tokenizer.pad_token_id, bos_token_id=2, eos_token_id=2)
        config = STLLMConfig(text_config=text, num_frames=64, video_input="residual", residual_size=16)
    config.architectures = ["STLLMForConditionalGeneration"]
    config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    build_qformer_tokenizer().save_pretrained(dst / QFORMER_TOKENIZER_DIR)
    return dst


def synthetic_videos(n: int, frames: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct decoded clips, already resized to the model's size as the pipeline's decode stage does."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=256, help="vLLM max_num_seqs")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script")
    args = ap.parse_args()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no GPU (use --smoke to exercise the script on CPU)"}))
        return 0
    if args.smoke:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args.videos = min(args.videos, 4)
        args.max_new_tokens = min(args.max_new_tokens, 16)

    from stllm.engine import GenerationOptions, VideoRequest
    from stllm.vllm.engine import VLLMEngine

    class BenchEngine(VLLMEngine):
        def sampling_params(self, options):
            params = super().sampling_params(options)
            params.allowed_token_ids = list(range(len(self.processor.tokenizer)))  # see module docstring
            return params

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stllm_gpu_bench_"))
    model_dir = write_config_folder(workdir / "model", args.smoke)
    t0 = time.perf_counter()
    kwargs = {} if args.smoke else {"gpu_memory_utilization": args.gpu_memory_utilization}
    engine = BenchEngine.from_pretrained(
        str(model_dir), load_format="dummy", max_batch_size=args.max_batch_size, max_model_len=1024, **kwargs
    )
    start_s = time.perf_counter() - t0
    cfg = engine.config
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)

    def requests(videos: list[np.ndarray], tag: str) -> list[VideoRequest]:
        return [VideoRequest(f"{tag}{i}", v, [CAPTION, *QUESTIONS], sampled=True) for i, v in enumerate(videos)]

    engine.generate(requests(synthetic_videos(2, cfg.num_frames, cfg.image_size, seed=1), "warm"), options)
    videos = synthetic_videos(args.videos, cfg.num_frames, cfg.image_size, seed=2)
    vit_before = engine.vit_forwards
    engine.reset_stats()  # vLLM's metrics of the timed part only
    t1 = time.perf_counter()
    # As the pipeline feeds it: batches of 16 videos submitted at once, joining the running batch.
    reqs = requests(videos, "v")
    futures = [engine.submit(reqs[i:i + 16], options) for i in range(0, len(reqs), 16)]
    results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - t1
    stats = engine.stats()
    vit = engine.vit_forwards - vit_before
    errors = [r.error for r in results if not r.ok]
    new_tokens = sum(len(a.token_ids) for r in results for a in r.answers)
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "smoke": args.smoke,
        "videos": args.videos,
        "frames": cfg.num_frames,
        "visual_tokens": cfg.num_visual_tokens(),
        "prompts_per_video": 1 + len(QUESTIONS),
        "max_new_tokens": args.max_new_tokens,
        "engine_start_s": round(start_s, 1),
        "wall_s": round(wall, 2),
        "videos_per_s": round(args.videos / wall, 3),
        "new_tokens_per_s": round(new_tokens / wall, 1),
        "mean_new_tokens": round(new_tokens / max(1, sum(len(r.answers) for r in results)), 1),
        "vit_forwards_per_video": vit / args.videos,
        "engine_busy_fraction": stats["busy_fraction"],
        # the engine's stats (vLLM's own metrics, docs/engine.md): requests running/waiting, tokens/s, KV cache
        "engine": stats,
        "errors": errors[:3],
    }
    print(json.dumps(report))
    engine.close()
    return 1 if errors or vit != args.videos else 0


if __name__ == "__main__":
    sys.exit(main())
