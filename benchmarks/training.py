"""train_samples_per_s: `stllm-index train`'s throughput on this machine — the tiny model (residual mode, 8
frames) on 64×64 synthetic-world clips, the recipe's defaults (masking + MVM, 'rand' frames + crops), batch 8:
5 warm-up steps, then 3 repetitions of 10 steps (quick: 3 of 3); the median and range of their rates. No goal."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, from_reps


def bench_training(quick: bool = False, steps: int | None = None, batch_size: int = 8, reps: int = 3
                   ) -> list[Result]:
    steps = steps or (3 if quick else 10)
    from pipeline.paths import ensure_tiny_model
    from pipeline.training.train import load_samples, load_train_config
    from pipeline.training.world import synth
    from stllm.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth(tmp / "world", 32, seed=0, splits=["train"])
        config = load_train_config(None, [f"model={ensure_tiny_model()}", f"manifest={tmp / 'world'}",
                                          f"output={tmp / 'out'}", f"batch_size={batch_size}", "lr=1e-3",
                                          f"max_steps={reps * steps + 5}", "save_every=1000", "log_every=1000"])
        samples, _ = load_samples(config)
        trainer = Trainer(config, samples)
        trainer.train(stop_after=5, progress=False)  # warm-up (kernels, allocator)
        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            trainer.train(stop_after=steps, progress=False)
            walls.append(time.perf_counter() - t0)
    return [from_reps("train_samples_per_s", [steps * batch_size / w for w in walls], "info", unit="samples/s",
                      detail={"steps_per_rep": steps, "batch_size": batch_size,
                              "frames": trainer.model.config.num_frames,
                              "video_input": trainer.model.config.video_input,
                              "s_per_step": [round(w / steps, 3) for w in walls],
                              "trainable_params": sum(trainer.trainable.values())})]
