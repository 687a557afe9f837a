"""`make demo-model`: the synthetic world's model rebuilt from scratch with the recorded recipe and seeds.

1. `synth` the clips: a training set, and held-out + unseen-combination sets from their own seed streams;
2. stage 1, the vision tower (`stllm.world.pretrain`: ViT, ln_vision, Q-Former, projection on rendered frames —
   the stand-in for EVA-CLIP/BLIP-2 pretraining);
3. stage 2 (`stllm-index train` with `jobs/training/world.yaml`): ST-LLM fine-tuning on the clips, ViT and
   Q-Former frozen as in the original, the LLM + projection + global-local MLP + MVM decoder trained: 2a the
   direction question alone (`TEMPORAL_OVERRIDES` say why), then the language stage (`stllm.world.language`: a
   fresh LLM around 2a's projection learns the world's language from its transcripts, without video — the
   stand-in for Vicuna's pretraining), then 2b every question with the seed's objective (masking + MVM);
4. `eval` on the held-out and unseen clips in the hf engine; the folder, `recipe.json` and `eval.json` go to
   `dst` (the shipped copy is `stllm/world/demo_model/`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stllm.world.language import LanguageConfig
from stllm.world.pretrain import PretrainConfig

PRETRAINED_PREFIXES = ("vision_model.", "qformer.", "query_tokens", "language_projection.")
_CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "training"


class Stage2Step(BaseModel):
    """One `train` run of stage 2: a config of jobs/training, its overrides; it starts from the previous one."""

    model_config = ConfigDict(extra="forbid")

    name: str
    config: str = Field(description="a YAML file of jobs/training")
    overrides: list[str] = Field(default_factory=list)


# Stage 2a: the direction question alone, without masking, from a fresh LLM. A clip and its reverse hold the same
# frames, so while attention is spread evenly there is no gradient towards temporal order: mixed with the other
# questions the LLM stayed on that plateau (ln 2) for 1,000–1,500 steps, and so did an LLM that had learned the
# language first; a fresh one, alone, leaves it after 300–450 steps, or later: the same run on one thread
# instead of two was still on it at 500 — hence 1,500 steps (measured). What 2b keeps of 2a is the
# projection it trained: the language stage starts a fresh LLM around it — on 2a's own LLM it wiped the direction
# skill (held-out 0.93 → 0.17) and 2b then stayed on a plateau; around 2a's projection, 2b learns every question.
TEMPORAL_OVERRIDES = ["qtypes=[direction]", "repeat={}", "lr=3e-3", "lr_schedule=constant", "warmup_ratio=0",
                      "masking=false", "max_steps=1500"]


def _default_stage2() -> list[Stage2Step]:
    return [Stage2Step(name="stage2a", config="world.yaml", overrides=TEMPORAL_OVERRIDES),
            Stage2Step(name="stage2b", config="world.yaml")]


class WorldRecipe(BaseModel):
    """Every number that fixes the demo model (recorded in its `recipe.json`)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    video_input: str = "residual"
    train_clips: int = Field(default=600, ge=1, description="training scenes (each also played backwards)")
    reversed_pairs: bool = True
    eval_clips: int = Field(default=100, ge=1, description="per evaluation split (heldout, unseen)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    stage2: list[Stage2Step] = Field(default_factory=_default_stage2)
    language_after: str | None = Field(default="stage2a", description="the stage-2 step after which the LLM "
                                       "learns the world's language (null: right after stage 1)")
    stage2_overrides: list[str] = Field(default_factory=list,
                                        description="--set overrides of every stage-2 step (after its own)")

    @model_validator(mode="after")
    def _language_after_a_step(self) -> WorldRecipe:
        names = [s.name for s in self.stage2]
        if self.language_after is not None and self.language_after not in names:
            raise ValueError(f"language_after={self.language_after!r} names no stage-2 step (steps: {names})")
        return self


def fresh_llm_around(folder: str | Path, recipe: WorldRecipe) -> tuple[Any, Any]:
    """The recipe's untrained model with the vision tower, Q-Former and projection of `folder`."""
    from stllm.modeling_stllm import STLLMForConditionalGeneration
    from stllm.world.model import build_world_model

    model, processor = build_world_model(seed=recipe.seed, video_input=recipe.video_input)
    trained = STLLMForConditionalGeneration.from_pretrained(folder).state_dict()
    model.load_state_dict({k: v for k, v in trained.items() if k.startswith(PRETRAINED_PREFIXES)}, strict=False)
    return model, processor


def build_demo_model(workdir: str | Path, dst: str | Path, recipe: WorldRecipe | None = None,
                     progress: bool = True, stage1: str | Path | None = None) -> dict[str, Any]:
    """Run the recipe in `workdir`; the trained folder lands in `dst`. `stage1`: reuse the pretrained vision
    tower (ViT, Q-Former, projection) of a folder — stage 1's, or a trained model's (stage 2 keeps the ViT and
    Q-Former as they were) — instead of running stage 1; the rest starts from the recipe's init."""
    from pipeline.training.train import load_train_config, train
    from pipeline.training.world import evaluate, synth
    from stllm.loading import save_model_folder
    from stllm.world.language import answer_type_mass, pretrain_language
    from stllm.world.model import build_world_model
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
        stage1 = save_model_folder(model, processor, work / "stage1")
        (work / "stage1.json").write_text(json.dumps(stage1_report, indent=2))
    else:  # the vision tower of another run (stage 1's, or a trained model's: stage 2 keeps it) + a fresh LLM
        reused = Path(stage1).parent / "stage1.json"  # that run's stage-1 report, where it left one
        stage1_report.update(json.loads(reused.read_text()) if reused.is_file() else {})
        model, processor = fresh_llm_around(stage1, recipe)
        stage1 = save_model_folder(model, processor, work / "stage1")
    times["stage1_s"] = time.perf_counter() - t

    def language(start: Path) -> Path:
        """The language stage (stllm/world/language.py): a fresh LLM around `start`'s vision tower and projection
        learns the world's language, without video."""
        t = time.perf_counter()
        model, processor = fresh_llm_around(start, recipe)
        (work / "language.jsonl").unlink(missing_ok=True)
        stage1_report["language"] = pretrain_language(model, processor, recipe.language, log=work / "language.jsonl")
        stage1_report["language_answer_type_mass"] = answer_type_mass(model, processor)
        times["language_s"] = time.perf_counter() - t
        return save_model_folder(model, processor, work / "language")

    start, stage2 = Path(stage1), {}
    if recipe.language_after is None:
        start = language(start)
    for step in recipe.stage2:
        name, yaml_file = step.name, _CONFIGS / step.config
        extra = [*step.overrides, *recipe.stage2_overrides]
        t = time.perf_counter()
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        config = load_train_config(yaml_file, [f"model={start}", f"manifest={work / 'data' / 'train'}",
                                               f"output={out}", f"seed={recipe.seed}", *extra])
        rep = train(config, progress=progress)
        stage2[name] = {"config": config.model_dump(), **{k: rep[k] for k in ("samples", "skipped", "steps")}}
        start = out / "final"
        times[f"{name}_s"] = time.perf_counter() - t
        if name == recipe.language_after:
            start = language(start)

    t = time.perf_counter()
    report = evaluate(str(start), work / "data" / "eval")
    times["eval_s"] = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(start, dst)
    (dst / "recipe.json").write_text(json.dumps({"recipe": recipe.model_dump(),
                                                **{k: v["config"] for k, v in stage2.items()}}, indent=2))
    result = {"stage1": stage1_report,
              **{k: {x: v[x] for x in ("samples", "skipped", "steps")} for k, v in stage2.items()},
              "eval": report["splits"], "times": {k: round(v, 1) for k, v in times.items()}}
    (dst / "eval.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["TEMPORAL_OVERRIDES", "Stage2Step", "WorldRecipe", "build_demo_model"]
