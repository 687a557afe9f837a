"""The paper's claims on a toy scale, with the synthetic world's ground truth — compared runs trained alike.

Every compared run uses ONE recipe (`pipeline.training.world_model.WorldRecipe`) but for what is compared: the same
stage 1 (trained once, cached, loaded by every run the same way), the same stage-2 steps (2a, the language stage,
2b), data, seeds and steps; a run differs only in `video_input` or in 2b's masking. Each run's result is cached
under the hash of its full recipe (`benchmarks/world-runs/<run>-<hash>.json`): a changed recipe is a new run,
never a stale one. Accuracy is graded per held-out clip and question (the hf engine), so effects come with a 95%
paired bootstrap interval over the clips.

- `temporal_accuracy_all_vs_mean`: direction accuracy of `all` (every frame's tokens in the LLM) minus `mean`
  (mean pooling: time-reversal invariant, at best the axis of motion, ≤ 0.55 on four directions), 8 frames.
- `mvm_masking_effect`: residual with vs without dynamic masking + MVM in 2b: the accuracy difference over EVERY
  question kind (captions included) and the frame counts 4, 8 and 16 (trained at 8), with its interval; per kind
  in the details.

Scales: `recipe` (the shipped model's steps; ~15–30 min per run on one core, 4 runs + stage 1), `reduced`
(`WORLD_BENCH_SCALE=reduced`: ~1/8 of every stage's steps — NOT the product's figures, a check of the method),
`quick` (`--quick`: a few steps, 60 training scenes: the method runs end to end, the figures mean nothing).
`python -m benchmarks.world RUN...` trains runs ahead (e.g. side by side in several shells).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Result

CACHE = Path(os.environ.get("WORLD_BENCH_CACHE", Path(__file__).parent / "world-runs"))
RUNS = {"residual": ("residual", True), "all": ("all", True), "mean": ("mean", True),  # the recipe: masking + MVM
        "residual-no-masking": ("residual", False)}
# (train clips, eval clips, stage-1 steps, 2a steps, language steps, 2b steps); None: the recipe's own
SCALES: dict[str, tuple[int, int, int | None, int | None, int | None, int | None]] = {
    "recipe": (600, 100, None, None, None, None),
    "reduced": (600, 100, 250, 200, 50, 250),
    "quick": (60, 30, 20, 20, 10, 30),
}
BOOTSTRAP = 2000


def scale_name(quick: bool) -> str:
    return "quick" if quick else os.environ.get("WORLD_BENCH_SCALE", "recipe")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def recipe_for(name: str, scale: str) -> Any:
    """The run's full recipe: the shipped one at `scale`, with its `video_input` and 2b's masking."""
    from pipeline.training.world_model import WorldRecipe

    mode, masking = RUNS[name]
    train, evals, s1, s2a, lang, s2b = SCALES[scale]
    base = WorldRecipe()
    pretrain = base.pretrain.model_copy(update={"steps": s1}) if s1 else base.pretrain
    language = base.language.model_copy(update={"steps": lang}) if lang else base.language
    a, b = base.stage2
    if s2a:
        a = a.model_copy(update={"overrides": [*a.overrides, f"max_steps={s2a}"]})
    b = b.model_copy(update={"overrides": [*b.overrides, f"masking={str(masking).lower()}",
                                           *([f"max_steps={s2b}"] if s2b else [])]})
    return WorldRecipe(video_input=mode, train_clips=train, eval_clips=evals, pretrain=pretrain, language=language,
                       stage2=[a, b], stage2_overrides=["save_every=100000"])


def _stage1(recipe: Any) -> Path:
    """Stage 1 (the vision tower), trained once per (seed, stage-1 config) and shared by every compared run."""
    from stllm.loading import save_model_folder
    from stllm.world.model import build_world_model
    from stllm.world.pretrain import VisionPretrainer

    folder = CACHE / f"stage1-{_digest([recipe.seed, recipe.pretrain.model_dump()])}"
    if (folder / "config.json").exists():
        return folder
    model, processor = build_world_model(seed=recipe.seed, video_input=recipe.video_input)
    pretrainer = VisionPretrainer(model, processor, recipe.pretrain)
    report = {"last": pretrainer.train(progress=False), "heldout_frames": pretrainer.evaluate(split="heldout")}
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(model, processor, tmp)
    (tmp / "stage1.json").write_text(json.dumps(report, indent=2, default=str))
    tmp.rename(folder)
    return folder


def _graded(model: Path, eval_data: Path, frames: int) -> list[dict[str, Any]]:
    """Every held-out (clip, question) graded, the model's clips sampled at `frames` frames (trained at 8)."""
    from pipeline.training.world import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "model"
        shutil.copytree(model, variant)
        cfg = json.loads((variant / "config.json").read_text())
        cfg["num_frames"] = frames
        (variant / "config.json").write_text(json.dumps(cfg))
        out = Path(tmp) / "graded.jsonl"
        evaluate(str(variant), eval_data, answers_out=out)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return [{"uri": Path(r["uri"]).name, "qtype": r["qtype"], "right": bool(r["right"])} for r in rows
            if r["split"] == "heldout"]


def run_one(name: str, scale: str) -> dict[str, Any]:
    """Train and grade one run (or take it from the cache: same recipe hash)."""
    from pipeline.training.world_model import build_demo_model

    recipe = recipe_for(name, scale)
    frame_counts = (4, 8, 16) if RUNS[name][0] == "residual" else (8,)
    stage1 = _stage1(recipe)
    key = _digest({"recipe": recipe.model_dump(), "stage1": stage1.name, "frames": frame_counts})
    path = CACHE / f"{name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = build_demo_model(work, work / "model", recipe, progress=False, stage1=stage1)
        graded = {str(n): _graded(work / "model", work / "data" / "eval", n) for n in frame_counts}
    result = {"run": name, "scale": scale, "recipe_hash": key, "recipe": recipe.model_dump(), "stage1": stage1.name,
              "graded": graded, "times": report["times"]}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _per_clip(run: dict[str, Any], frames: tuple[int, ...], kinds: tuple[str, ...] | None = None
              ) -> dict[str, float]:
    """{clip: share right over its questions of `kinds` (all when None) and the frame counts}."""
    acc: dict[str, list[bool]] = {}
    for n in frames:
        for r in run["graded"][str(n)]:
            if kinds is None or r["qtype"] in kinds:
                acc.setdefault(r["uri"], []).append(r["right"])
    return {u: float(np.mean(v)) for u, v in acc.items()}


def paired_effect(a: dict[str, float], b: dict[str, float], seed: int = 0) -> dict[str, float]:
    """Mean over the clips of a − b, and its 95% percentile bootstrap interval (clips resampled, paired)."""
    clips = sorted(set(a) & set(b))
    d = np.array([a[c] - b[c] for c in clips])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"effect": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "clips": len(clips)}


def _accuracy(run: dict[str, Any], frames: int) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for r in run["graded"][str(frames)]:
        by.setdefault(r["qtype"], []).append(r["right"])
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())}


def bench_world(quick: bool = False) -> list[Result]:
    scale = scale_name(quick)
    runs = {name: run_one(name, scale) for name in RUNS}
    label = {"scale": scale, **({"note": "NOT the product's figures: fewer steps than the recipe"}
                                if scale != "recipe" else {})}
    kinds = sorted({r["qtype"] for r in runs["residual"]["graded"]["8"]})
    direction = paired_effect(_per_clip(runs["all"], (8,), ("direction",)),
                              _per_clip(runs["mean"], (8,), ("direction",)))
    temporal = Result("temporal_accuracy_all_vs_mean", direction["effect"], ">= 0.3", detail={
        **label, "interval": direction, "goal_mean": "mean <= 0.55 on four directions; all not limited",
        "accuracy_8_frames": {m: _accuracy(runs[m], 8) for m in ("all", "residual", "mean")},
        "recipe_hashes": {m: runs[m]["recipe_hash"] for m in runs}, "stage1": runs["all"]["stage1"]})
    frames = (4, 8, 16)
    masked, plain = runs["residual"], runs["residual-no-masking"]
    overall = paired_effect(_per_clip(masked, frames), _per_clip(plain, frames))
    per_kind = {k: paired_effect(_per_clip(masked, frames, (k,)), _per_clip(plain, frames, (k,))) for k in kinds}
    mvm = Result("mvm_masking_effect", overall["effect"], "info", detail={
        **label, "interval": overall, "question_kinds": kinds, "frames": list(frames), "per_kind": per_kind,
        "with_masking_mvm": {n: _accuracy(masked, n) for n in frames},
        "without": {n: _accuracy(plain, n) for n in frames}, "trained_at_frames": 8})
    return [temporal, mvm]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        got = run_one(arg, scale_name(False))
        print(arg, got["recipe_hash"], {n: _accuracy(got, int(n)) for n in got["graded"]})
