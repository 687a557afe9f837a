"""`make demo-model`: the synthetic world's model rebuilt from scratch with the recorded recipe and seeds.

1. `synth` the clips: a training set, and held-out + unseen-combination sets from their own seed streams;
2. stage 1 (`stllm.world.pretrain`): the vision tower (ViT, ln_vision, Q-Former, projection) on rendered frames;
3. stage 2 (`stllm-index train`), ViT and Q-Former frozen as in the original, the LLM + projection +
   global-local MLP + MVM decoder trained: 2a the temporal question alone (`jobs/training/world-temporal.yaml`,
   which says why), then 2b every question with the seed's dynamic masking + MVM loss (`world.yaml`);
4. `eval` on the held-out and unseen clips in the hf engine; the folder, `recipe.json` and `eval.json` go to
   `dst` (the shipped copy is `stllm/world/demo_model/`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stllm.world.pretrain import PretrainConfig

_CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "training"
TEMPORAL_CONFIG, STAGE2_CONFIG = _CONFIGS / "world-temporal.yaml", _CONFIGS / "world.yaml"


class WorldRecipe(BaseModel):
    """Every number that fixes the demo model (recorded in its `recipe.json`)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    video_input: str = "residual"
    train_clips: int = Field(default=600, ge=1, description="training scenes (each also played backwards)")
    reversed_pairs: bool = True
    eval_clips: int = Field(default=100, ge=1, description="per evaluation split (heldout, unseen)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    temporal_overrides: list[str] = Field(default_factory=list, description="--set overrides of stage 2a")
    stage2_overrides: list[str] = Field(default_factory=list, description="--set overrides of world.yaml")


def build_demo_model(workdir: str | Path, dst: str | Path, recipe: WorldRecipe | None = None,
                     progress: bool = True, stage1: str | Path | None = None, fresh_llm: bool = False
                     ) -> dict[str, Any]:
    """Run the recipe in `workdir`; the trained folder lands in `dst`. `stage1`: reuse the pretrained vision
    tower of a folder (stage 1's, or a trained model: stage 2 leaves it as it was) instead of running stage 1;
    `fresh_llm`: with it, the LLM, global-local MLP and MVM decoder start from the recipe's random init again
    (the projection is kept: stage 1 trains it)."""
    from pipeline.train import load_train_config, train
    from pipeline.world import evaluate, synth
    from stllm.modeling_stllm import STLLMForConditionalGeneration
    from stllm.processing_stllm import STLLMProcessor
    from stllm.world.model import build_world_model, save_world_model
    from stllm.world.pretrain import VisionPretrainer

    recipe = recipe or WorldRecipe()
    work, dst = Path(workdir), Path(dst)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    synth(work / "data" / "train", recipe.train_clips, seed=recipe.seed, splits=["train"],
          reversed_pairs=recipe.reversed_pairs)
    synth(work / "data" / "eval", recipe.eval_clips, seed=recipe.seed, splits=["heldout", "unseen"])
    times["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage1_report: dict[str, Any] = {}
    if stage1 is None:
        model, processor = build_world_model(seed=recipe.seed, video_input=recipe.video_input)
        pretrainer = VisionPretrainer(model, processor, recipe.pretrain)
        (work / "pretrain.jsonl").unlink(missing_ok=True)
        stage1_report["last"] = pretrainer.train(log=work / "pretrain.jsonl", progress=progress)
        stage1_report["heldout_frames"] = pretrainer.evaluate(split="heldout")
        stage1_report["unseen_frames"] = pretrainer.evaluate(split="unseen")
        stage1 = save_world_model(model, processor, work / "stage1")
        (work / "stage1.json").write_text(json.dumps(stage1_report, indent=2))
    else:  # the frozen vision tower of another run, with this recipe's video-input mode
        model = STLLMForConditionalGeneration.from_pretrained(stage1)
        model.config.video_input = recipe.video_input
        if fresh_llm:
            init, _ = build_world_model(seed=recipe.seed, video_input=recipe.video_input)
            fresh = {k: v for k, v in init.state_dict().items()
                     if k.startswith(("language_model.", "global_", "mvm_decoder."))}
            model.load_state_dict(fresh, strict=False)
        stage1 = save_world_model(model, STLLMProcessor.from_pretrained(stage1), work / "stage1")
    times["stage1_s"] = time.perf_counter() - t

    start = stage1
    reports: dict[str, Any] = {}
    for name, yaml_file, extra in (("stage2a", TEMPORAL_CONFIG, recipe.temporal_overrides),
                                   ("stage2b", STAGE2_CONFIG, recipe.stage2_overrides)):
        t = time.perf_counter()
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        config = load_train_config(yaml_file, [f"model={start}", f"manifest={work / 'data' / 'train'}",
                                               f"output={out}", f"seed={recipe.seed}", *extra])
        rep = train(config, progress=progress)
        reports[name] = {"config": config.model_dump(), **{k: rep[k] for k in ("samples", "skipped", "steps")}}
        start = out / "final"
        times[f"{name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    t = time.perf_counter()
    report = evaluate(str(start), work / "data" / "eval")
    times["eval_s"] = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(start, dst)
    (dst / "recipe.json").write_text(json.dumps({"recipe": recipe.model_dump(), "stage1": recipe.pretrain.model_dump(),
                                                 **{k: v["config"] for k, v in reports.items()}}, indent=2))
    result = {"stage1": stage1_report, **{k: {x: v[x] for x in ("samples", "skipped", "steps")}
                                          for k, v in reports.items()},
              "eval": report["splits"], "times": {k: round(v, 1) for k, v in times.items()}}
    (dst / "eval.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["STAGE2_CONFIG", "TEMPORAL_CONFIG", "WorldRecipe", "build_demo_model"]
