"""`stllm-index train`: the recipe's freezing, a loss that falls on generated clips, resume on the same curve,
bad samples skipped and counted, an output that loads, configs rejected before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.training.train import load_samples, load_train_config
from stllm.training.augment import crop_box, rand_indices
from stllm.training.trainer import Trainer, group_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.training.world import synth

    root = tmp_path_factory.mktemp("world")
    synth(root, 8, seed=3, splits=["train"])
    return root


def _config(tiny_dir, world, out, *sets: str):
    return load_train_config(None, [f"model={tiny_dir}", f"manifest={world}", f"output={out}", "lr=1e-3",
                                    "batch_size=4", "log_every=1", "warmup_ratio=0", *sets])


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_augmentation_draws() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = rand_indices(32, 8, rng)
        assert [i // 4 for i in idx] == list(range(8))  # one frame in each interval, in order
        top, left, h, w = crop_box(64, 80, (0.5, 1.0), rng)
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 80
        assert 0.5 * 64 * 80 * 0.9 <= h * w <= 64 * 80
    assert max(rand_indices(3, 8, rng)) <= 2


def test_frozen_groups_stay_and_trained_ones_move(tiny_dir, world, tmp_path) -> None:
    config = _config(tiny_dir, world, tmp_path / "out", "max_steps=2", "freeze=[vision, qformer]")
    samples, skipped = load_samples(config)
    assert len(samples) == 8 * 5 and not skipped
    trainer = Trainer(config, samples)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train(progress=False)
    for name, p in trainer.model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        group = group_of(name)
        if group in ("vision", "qformer"):
            assert not moved and not p.requires_grad, name
    moved_groups = {group_of(n) for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert {"llm", "projection", "global_local", "mvm_decoder"} <= moved_groups
    assert set(trainer.trainable) == {"llm", "projection", "global_local", "mvm_decoder"}


def test_a_short_run_lowers_the_loss_and_loads_in_the_engine(tiny_dir, world, tmp_path) -> None:
    from stllm.engine import GenerationOptions, VideoRequest
    from stllm.hf_engine import HFEngine
    from stllm.training.trainer import TRAIN_PROMPT

    out = tmp_path / "out"
    config = _config(tiny_dir, world, out, "max_steps=30", "save_every=10")
    samples, _ = load_samples(config)
    Trainer(config, samples).train(progress=False)
    losses = [m["lm_loss"] for m in _metrics(out)]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert (out / "final" / "weights_hash.json").exists()
    assert len(list(out.glob("checkpoint-*"))) == 2  # 10, 20 (the last two kept)
    engine = HFEngine.from_pretrained(str(out / "final"), dtype="float32", device="cpu")
    frames = samples[0].frames[:8]
    [res] = engine.generate([VideoRequest("v", frames, ["What colour is the object?"], sampled=True)],
                            GenerationOptions(max_new_tokens=4, prompt=TRAIN_PROMPT))
    assert res.ok and res.answers[0].token_ids


def test_resume_continues_the_same_loss_curve(tiny_dir, world, tmp_path) -> None:
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    samples, _ = load_samples(_config(tiny_dir, world, straight))
    Trainer(_config(tiny_dir, world, straight, "max_steps=6", "save_every=3"), samples).train(progress=False)
    first = Trainer(_config(tiny_dir, world, cut, "max_steps=6", "save_every=3"), samples)
    first.train(stop_after=4, progress=False)  # checkpoint at 3, then step 4 is lost with the "crash"
    assert (cut / "checkpoint-0000004").exists() and (cut / "checkpoint-0000003").exists()
    import shutil

    shutil.rmtree(cut / "checkpoint-0000004")  # the crash came before step 4's checkpoint
    resumed = Trainer(_config(tiny_dir, world, cut, "max_steps=6", "save_every=3"), samples)
    resumed.train(resume=True, progress=False)
    a, b = _metrics(straight), _metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # step 4's first try is dropped from the metrics
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-4)


def test_a_corrupt_clip_is_skipped_and_counted(tiny_dir, world, tmp_path) -> None:
    from pipeline.cli import main
    from pipeline.demo.clips import make_corrupt_video

    rows = [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()][:10]
    bad = make_corrupt_video(tmp_path / "bad.mp4", "truncated")
    rows.append({**rows[0], "uri": str(bad)})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["train", "--set", f"model={tiny_dir}", "--set", f"manifest={manifest}", "--set",
                 f"output={out}", "--set", "max_steps=2", "--no-progress"]) == 0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["uri"] for s in skipped] == [str(bad)] and "DecodeError" in skipped[0]["error"]
    assert (out / "final").is_dir()


def test_invalid_configs_are_rejected_before_any_work(tiny_dir, tmp_path) -> None:
    from pipeline.jobs import JobError

    base = [f"model={tiny_dir}", "manifest=x", f"output={tmp_path}"]
    with pytest.raises(JobError, match="lr"):
        load_train_config(None, [*base, "lr=-1"])
    with pytest.raises(JobError, match="freeze"):
        load_train_config(None, [*base, "freeze=[eyes]"])
    with pytest.raises(JobError, match="lora"):
        load_train_config(None, [*base, "lora={enabled: true}", "freeze=[llm]"])
    with pytest.raises(JobError, match="manifest"):
        load_train_config(None, [f"model={tiny_dir}", f"output={tmp_path}"])
    with pytest.raises(JobError, match="repeat.direction must be >= 1"):
        load_train_config(None, [*base, "repeat={direction: 0}"])


def test_question_types_can_be_chosen_and_repeated(tiny_dir, world, tmp_path) -> None:
    every, _ = load_samples(_config(tiny_dir, world, tmp_path))
    some, _ = load_samples(_config(tiny_dir, world, tmp_path, "qtypes=[direction, colour]", "repeat={direction: 3}"))
    n_clips = len({s.uri for s in every})
    assert len(every) == 5 * n_clips  # caption + 4 questions per clip
    questions = [s.question for s in some]
    assert len(some) == 4 * n_clips and questions.count("Which way does the object move?") == 3 * n_clips


def test_lora_trains_adapters_only_and_merges_into_the_plain_layout(tiny_dir, world, tmp_path) -> None:
    from safetensors.torch import load_file

    from stllm.hf_engine import HFEngine

    out = tmp_path / "lora"
    config = _config(tiny_dir, world, out, "max_steps=3", "lora={enabled: true, target_modules: [q_proj, v_proj]}")
    samples, _ = load_samples(config)
    trainer = Trainer(config, samples)
    llm_trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad and group_of(n) == "llm"]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    trainer.train(progress=False)
    base = {k: v for f in sorted(tiny_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    tuned = {k: v for f in sorted((out / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert tuned.keys() == base.keys()  # no adapter keys left
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    k = "language_model.model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(tuned[q], base[q]) and torch.equal(tuned[k], base[k])  # merged where adapted only
    HFEngine.from_pretrained(str(out / "final"), dtype="float32", device="cpu")


def test_the_example_config_parses() -> None:
    from pathlib import Path

    config = load_train_config(Path(__file__).parent.parent / "jobs" / "training" / "world.yaml", ["max_steps=5"])
    assert Path(config.model, "config.json").is_file()  # `tiny`: the demo's model, built when missing
    assert config.freeze == ["vision", "qformer"] and config.max_steps == 5
    assert config.masking and config.repeat == {"direction": 4}  # the seed's objective, direction 4×


def test_a_small_frame_tiny_model_builds_trains_and_answers(tmp_path) -> None:
    """64×64 frames with 8-pixel patches (the world's own size): ViT and processor agree, the loop runs."""
    from pipeline.training.world import synth
    from stllm.engine import GenerationOptions, VideoRequest
    from stllm.hf_engine import HFEngine
    from stllm.tiny import build_tiny

    small = build_tiny(tmp_path / "small", image_size=64, patch_size=8)
    world = synth(tmp_path / "w", 2, splits=["train"])["manifest"]
    config = load_train_config(None, [f"model={small}", f"manifest={world}", f"output={tmp_path / 'out'}",
                                      "max_steps=2", "batch_size=2"])
    samples, _ = load_samples(config)
    assert samples[0].frames.shape[1:] == (64, 64, 3)  # decoded at the model's size, not 224
    Trainer(config, samples).train(progress=False)
    engine = HFEngine.from_pretrained(str(tmp_path / "out" / "final"), dtype="float32", device="cpu")
    [res] = engine.generate([VideoRequest("v", samples[0].frames[:8], ["What shape is the object?"], sampled=True)],
                            GenerationOptions(max_new_tokens=3))
    assert res.ok
    from stllm.tiny import tiny_config

    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_config(400, image_size=60, patch_size=8)


def test_a_fresh_run_refuses_an_output_holding_another_run(tiny_dir, world, tmp_path) -> None:
    out = tmp_path / "out"
    config = _config(tiny_dir, world, out, "max_steps=1")
    samples, _ = load_samples(config)
    Trainer(config, samples).train(progress=False)
    with pytest.raises(ValueError, match="earlier run"):
        Trainer(config, samples).train(progress=False)
    other = _config(tiny_dir, world, tmp_path / "o2", "max_steps=4", "save_every=2")
    Trainer(other, samples).train(stop_after=2, progress=False)
    with pytest.raises(ValueError, match="data order would differ"):
        Trainer(_config(tiny_dir, world, tmp_path / "o2", "max_steps=4", "batch_size=2"), samples).train(resume=True)


def test_the_batched_video_tokens_equal_one_clip_at_a_time(tiny_dir, world, tmp_path) -> None:
    config = _config(tiny_dir, world, tmp_path / "out", "max_steps=1")
    samples, _ = load_samples(config)
    trainer = Trainer(config, samples)
    trainer.model.eval()
    rng = np.random.default_rng(0)
    picked = [samples[i] for i in (0, 1, 5, 9)]  # different clips and questions (Q-Former texts of other lengths)
    pvs = [trainer._pixel_values(s, rng) for s in picked]
    q_inputs = [trainer.processor.qformer_inputs(s.question) for s in picked]
    assert len({ids.shape[1] for ids, _ in q_inputs}) > 1
    with torch.no_grad():
        batched = trainer._video_tokens(pvs, q_inputs)
        single = [trainer.model.embed_video(pv, ids, m) for pv, (ids, m) in zip(pvs, q_inputs, strict=True)]
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-4)


def test_two_ray_train_workers_take_the_one_process_step(tiny_dir, world, tmp_path) -> None:
    """Data parallel through Ray Train (2 CPU workers, gloo): each rank takes half of every batch and the
    gradients are averaged, so with deterministic inputs (no masking, the evaluation frames, answers of equal
    length) the weights after 3 steps equal one process's; rank 0 alone writes, and the folder loads."""
    from pathlib import Path

    import ray

    from pipeline.training.train import train
    from stllm.hf_engine import HFEngine

    sets = ("max_steps=3", "masking=false", "frame_sampling=original", "crop_scale=null", "qtypes=[colour]",
            "save_every=2")
    one = train(_config(tiny_dir, world, tmp_path / "one", *sets), progress=False)
    try:
        two = train(_config(tiny_dir, world, tmp_path / "two", *sets, "workers=2"), progress=False)
    finally:
        ray.shutdown()
    assert one["steps"] == two["steps"] == 3 and two["samples"] == one["samples"] == 8
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two"))
    start = load_file(Path(tiny_dir) / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a if k.startswith("language_model."))  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    lines = _metrics(tmp_path / "two")
    assert [m["step"] for m in lines] == [1, 2, 3]  # one writer
    assert [round(m["loss"], 4) for m in lines] == [round(m["loss"], 4) for m in _metrics(tmp_path / "one")]
    assert [p.name for p in (tmp_path / "two").glob("checkpoint-*")] == ["checkpoint-0000002"]
    HFEngine.from_pretrained(str(tmp_path / "two" / "final"), dtype="float32", device="cpu")
    with pytest.raises(Exception, match="multiple of workers"):
        _config(tiny_dir, world, tmp_path / "three", "batch_size=3", "workers=2")
