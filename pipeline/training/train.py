"""`stllm-index train CONFIG.yaml`: a manifest's clips through the pipeline's own decoders → `stllm.training`.

Each clip is decoded once (the killable decode worker, its timeout; `decode_frames` frames, centre-cropped to the
model's input size) and kept in memory for the run; its rows (question, answer) become samples. A clip that
cannot be fetched or decoded is skipped and counted (`skipped.jsonl`), never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from pipeline.job_overrides import JobError, apply_overrides
from pipeline.training.world import read_manifest

if TYPE_CHECKING:
    from stllm.training.config import TrainConfig
    from stllm.training.trainer import Sample


def load_train_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    from stllm.training.config import TrainConfig

    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise JobError(f"training config not found: {path}") from None
        except yaml.YAMLError as e:
            raise JobError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise JobError(f"{path}: a training config must be a YAML mapping")
    data = apply_overrides(data, overrides)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as e:
        raise JobError("\n".join(f"{'.'.join(str(x) for x in err['loc']) or '(config)'}: {err['msg']}"
                                 for err in e.errors())) from None
    from pipeline.paths import resolve_model_path

    config.model = resolve_model_path(config.model)  # tiny: the random test model; world: the shipped one
    for name in ("model", "manifest", "output"):
        setattr(config, name, os.path.expanduser(getattr(config, name)))
    return config


def load_samples(config: TrainConfig, timeout_s: float = 120.0) -> tuple[list[Sample], list[dict[str, str]]]:
    """(samples, skipped clips) of the manifest rows of `config.split`."""
    from pipeline.decode import DecodeError, decode_video
    from pipeline.io.fetch import FetchError, fetched
    from stllm.configuration_stllm import STLLMConfig
    from stllm.training.trainer import Sample

    size = STLLMConfig.from_pretrained(config.model).image_size
    rows = [r for r in read_manifest(config.manifest)
            if (config.split is None or r.get("split") in (None, config.split))
            and (config.qtypes is None or r.get("qtype") in config.qtypes)]
    frames: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    samples = []
    for r in rows:
        uri = r["uri"]
        if uri not in frames:
            try:
                with fetched(uri, None) as path:
                    frames[uri] = decode_video(path, num_frames=config.decode_frames, size=size,
                                               timeout_s=timeout_s).frames
            except (DecodeError, FetchError, OSError, ValueError) as e:
                frames[uri] = None
                skipped.append({"uri": uri, "error": f"{type(e).__name__}: {e}"})
        if frames[uri] is not None and r.get("answer"):
            times = config.repeat.get(r.get("qtype") or "", 1)
            samples.extend(Sample(frames[uri], r["question"], r["answer"], uri) for _ in range(times))
    return samples, skipped


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train in this process, or with `config.workers` > 1 in that many Ray Train workers (`train_worker`)."""
    if config.workers > 1:
        return _train_with_ray(config, resume)
    return train_worker(config, resume, progress)


def train_worker(config: TrainConfig, resume: bool = False, progress: bool = True, rank: int = 0,
                 world_size: int = 1) -> dict[str, Any]:
    """One training process: every rank decodes the manifest (samples are indexed the same way on all)."""
    from stllm.training.trainer import Trainer

    samples, skipped = load_samples(config)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        with open(out / "skipped.jsonl", "w") as f:
            for s in skipped:
                f.write(json.dumps(s) + "\n")
    trainer = Trainer(config, samples, rank=rank, world_size=world_size)
    last = trainer.train(resume=resume, progress=progress)
    report = {"samples": len(samples), "skipped": len(skipped), "steps": trainer.step,
              "total_steps": trainer.total_steps, "trainable": trainer.trainable, "last": last,
              "model": str(out / "final") if trainer.step >= trainer.total_steps else None}
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _ray_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from stllm.training.config import TrainConfig

    ctx = ray.train.get_context()
    train_worker(TrainConfig.model_validate(loop_config["config"]), loop_config["resume"], progress=False,
                 rank=ctx.get_world_rank(), world_size=ctx.get_world_size())


def _train_with_ray(config: TrainConfig, resume: bool) -> dict[str, Any]:
    """Ray Train's TorchTrainer starts the workers and their process group (gloo on CPU, NCCL on GPUs); the
    cluster is `RAY_ADDRESS` or a local one."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    use_gpu = config.device == "cuda" or (config.device == "auto" and bool(ray.cluster_resources().get("GPU")))
    # workers start in folders of their own: local paths go to them absolute
    config = config.model_copy(update={k: os.path.abspath(getattr(config, k)) for k in ("model", "manifest", "output")
                                       if "://" not in getattr(config, k)})
    out = Path(config.output)
    trainer = TorchTrainer(_ray_worker_loop, train_loop_config={"config": config.model_dump(), "resume": resume},
                           scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu),
                           run_config=RunConfig(name="train", storage_path=str(out / "ray")))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads((out / "report.json").read_text())  # rank 0's


__all__ = ["load_samples", "load_train_config", "train", "train_worker"]
