"""The `vllm` engine against the `hf` reference on the same tiny checkpoints (fp32, CPU).

Three engine starts in all (≈30–60 s each on 2 cores): the shared residual-mode checkpoint, a mean-mode one, and an
`all`-mode checkpoint with a BT-Adapter whose LM head is edited so that greedy decoding also ends on the
stop string "###" and on EOS. The engines are class-scoped so only one is alive at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import vllm  # noqa: F401 — a missing vLLM fails the suite instead of skipping these tests
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stllm.configuration_stllm import STLLMConfig
from stllm.engine import GenerationOptions, VideoRequest
from stllm.tiny import build_tiny
from tests.tiny_fixtures import synthetic_frames

QUESTIONS = ["Describe the video in detail.", "What is happening in the video?", "How many people are there?"]
STOP_ID, EOS_ID = 269, 2  # "###" and "</s>" in the tiny tokenizer


def _requests(seeds: range, short: bool = False) -> list[VideoRequest]:
    """Raw clips of 10+ frames (the engines sample 8); `short` adds a 5-frame clip, which the original rule
    keeps at 5 frames (fewer visual tokens in `all` mode)."""
    out = [VideoRequest(f"v{s}", synthetic_frames(s, t=10 + s), QUESTIONS) for s in seeds]
    return out + [VideoRequest("short", synthetic_frames(99, t=5), QUESTIONS)] if short else out


def _tokens(results) -> list[list[list[int]]]:
    return [[a.token_ids for a in r.answers] for r in results]


def _start(model_dir) -> object:
    """An engine sized by `cpu_kv_cache_bytes` (no VLLM_CPU_KVCACHE_SPACE), started while another process holds
    memory: vLLM's default would reserve 92% of the node and refuse."""
    from stllm.vllm.engine import VLLMEngine
    from tests.memory_hog import gib_to_hold, hold_memory, node_memory

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with hold_memory(min(gib_to_hold(0.8), 6.0)):
        total, available = node_memory()
        assert available < 0.92 * total  # the condition vLLM's own sizing refuses to start under
        return VLLMEngine.from_pretrained(str(model_dir), dtype="float32", device="cpu")


def _assert_parity(hf_results, vllm_results) -> None:
    assert [r.ok for r in vllm_results] == [r.ok for r in hf_results]
    assert _tokens(vllm_results) == _tokens(hf_results)
    for h, v in zip(hf_results, vllm_results, strict=True):
        assert [a.text for a in v.answers] == [a.text for a in h.answers]
        if h.ok:
            np.testing.assert_allclose(v.visual_embedding, h.visual_embedding, atol=1e-5)


# ---- no engine ----------------------------------------------------------------------------------------


def test_plugin_registers_through_the_entry_point():
    # A fresh interpreter: only vLLM's own plugin loading may register the architecture and the config.
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        "from transformers import AutoConfig\n"
        "assert 'STLLMForConditionalGeneration' in ModelRegistry.get_supported_archs()\n"
        "print(type(AutoConfig.for_model('stllm')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("STLLMConfig")


def test_checkpoint_keys_match_the_converted_format(tiny_dir):
    from stllm.vllm.model import checkpoint_keys, weight_mismatch

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    expected = checkpoint_keys(STLLMConfig.from_pretrained(tiny_dir))
    assert expected == on_disk
    assert weight_mismatch(expected, on_disk, set()) is None
    report = weight_mismatch(expected, (on_disk - {"query_tokens"}) | {"vision_model.extra.weight"},
                             {"language_model.lm_head.weight"})
    assert "unexpected keys (1): vision_model.extra.weight" in report
    assert "missing keys (1): query_tokens" in report
    assert "parameters not loaded (1): language_model.lm_head.weight" in report


# ---- residual (global-local) checkpoint ---------------------------------------------------------------


class TestResidual:
    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, tiny_dir):
        engine = _start(tiny_dir)
        yield engine
        engine.close()

    @pytest.mark.parametrize("penalty", [1.0, 1.5])
    def test_greedy_parity(self, engine, hf_engine, penalty):
        opts = GenerationOptions(max_new_tokens=20, repetition_penalty=penalty)
        requests = _requests(range(3), short=True)
        hf_results, vllm_results = hf_engine.generate(requests, opts), engine.generate(requests, opts)
        _assert_parity(hf_results, vllm_results)
        assert all(len(r.answers) == 3 for r in vllm_results)

    @pytest.mark.parametrize("preset", ["qa", "mvbench"])
    def test_prompt_presets_parity(self, engine, hf_engine, preset):
        from stllm.prompts import PRESETS

        opts = GenerationOptions(max_new_tokens=12, prompt=PRESETS[preset])
        requests = _requests(range(2))
        _assert_parity(hf_engine.generate(requests, opts), engine.generate(requests, opts))

    def test_four_batches_in_flight_answer_as_one_synchronous_hf_call(self, engine, hf_engine):
        """Four batches submitted at once join one running batch; each gets exactly the answers of one
        synchronous `hf` call over all their videos (greedy), and a bad request fails alone while the others in
        flight complete. The engine's stats are vLLM's own counts of this work."""
        opts = GenerationOptions(max_new_tokens=12)
        batches = [_requests(range(30 + 3 * b, 33 + 3 * b)) for b in range(4)]
        batches[1].insert(1, VideoRequest("bad", np.zeros((0, 48, 64, 3), np.uint8), QUESTIONS))
        reference = iter(hf_engine.generate([r for b in batches for r in b], opts))
        alone = [[next(reference) for _ in b] for b in batches]
        before = engine.stats()
        futures = [engine.submit(b, opts) for b in batches]
        together = [f.result(timeout=300) for f in futures]
        for a, t in zip(alone, together, strict=True):
            _assert_parity(a, t)
        assert not together[1][1].ok and "zero frames" in together[1][1].error
        assert all(r.ok for b in together for r in b if r.video_id != "bad")
        stats = engine.stats()
        assert stats["steps"] > before["steps"] and stats["batches"] == before["batches"] + 4
        assert stats["requests_running_max"] > 3 * 3  # more than one batch's sequences at once
        assert 0 < stats["busy_fraction"] <= 1 and 0 < stats["busy_s"] <= stats["wall_s"]
        assert stats["requests_running_mean"] > 0 and 0 < stats["kv_cache_usage_max"] <= 1
        # vLLM's token counts: every prompt (visual tokens + text) and every generated token of these batches
        ok = [r for b in batches for r in b if r.video_id != "bad"]
        prompts = sum(engine.config.num_visual_tokens(min(r.frames.shape[0], engine.num_frames))
                      + len(engine.processor.prompt_ids(q, opts.prompt)) for r in ok for q in r.questions)
        generated = sum(len(a.token_ids) for b in together for r in b for a in r.answers)
        assert stats["prompt_tokens"] - before["prompt_tokens"] == prompts
        assert stats["generation_tokens"] - before["generation_tokens"] == generated
        assert stats["generation_tokens_per_s"] > 0 and stats["metrics_enabled"]

    def test_videos_arriving_together_share_one_vit_pass(self, engine):
        before_f, before_p = engine.vit_forwards, engine.vit_passes
        results = engine.generate(_requests(range(50, 54)), GenerationOptions(max_new_tokens=2))
        assert all(r.ok for r in results)
        assert engine.vit_forwards - before_f == 4 and engine.vit_passes - before_p == 1  # 4 videos, one ViT call

    def test_one_vit_forward_per_video(self, engine):
        before = engine.vit_forwards
        results = engine.generate(_requests(range(20, 22)), GenerationOptions(max_new_tokens=2))
        assert all(r.ok and len(r.answers) == 3 for r in results)
        assert engine.vit_forwards - before == 2  # 2 videos × 3 questions → 2 ViT passes
        engine.generate(_requests(range(20, 22)), GenerationOptions(max_new_tokens=2))
        assert engine.vit_forwards - before == 2  # same clips again: served from the feature cache

    def test_bad_requests_fail_alone(self, engine, hf_engine):
        good = _requests(range(2))
        requests = [
            good[0],
            VideoRequest("empty", np.zeros((0, 48, 64, 3), np.uint8), QUESTIONS),
            VideoRequest("floats", synthetic_frames(3).astype(np.float32), QUESTIONS),
            VideoRequest("long", synthetic_frames(4), ["word " * 2100]),
            VideoRequest("no-questions", synthetic_frames(5), []),
            good[1],
        ]
        opts = GenerationOptions(max_new_tokens=8)
        results = engine.generate(requests, opts)
        assert [r.ok for r in results] == [True, False, False, False, False, True]
        assert "zero frames" in results[1].error
        assert "uint8" in results[2].error
        assert "exceeds" in results[3].error
        assert "no questions" in results[4].error
        assert all(r.answers == [] and r.visual_embedding is None for r in results[1:5])
        _assert_parity(hf_engine.generate(requests, opts), results)

    def test_sampling_is_seeded_and_beams_are_refused(self, engine):
        opts = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=7)
        first, again = engine.generate(_requests(range(1)), opts), engine.generate(_requests(range(1)), opts)
        assert _tokens(first) == _tokens(again)
        with pytest.raises(ValueError, match="num_beams"):
            engine.generate(_requests(range(1)), GenerationOptions(num_beams=2))

    def test_a_cancelled_batch_leaves_the_engine(self, engine):
        """A caller that gives up (the model stage's Ray task cancelled) cancels its future: its requests are
        aborted in vLLM instead of running to the end, and the engine goes on."""
        before = engine.stats()
        pending = engine.submit(_requests(range(70, 78)), GenerationOptions(max_new_tokens=1000))
        deadline = time.monotonic() + 120
        while engine.stats()["steps"] == before["steps"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pending.cancel()
        while engine.llm.get_num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.llm.get_num_unfinished_requests() == 0
        # 24 requests of up to 1000 tokens (this model runs most of them to the end): cut short
        assert engine.stats()["generation_tokens"] - before["generation_tokens"] < 24 * 1000 // 4
        assert all(r.ok for r in engine.generate(_requests(range(2)), GenerationOptions(max_new_tokens=4)))

    def test_zz_a_killed_engine_core_fails_what_is_in_flight_and_later_calls_at_once(self, engine):
        """Last in this class (it kills the class's engine): vLLM's engine core dies mid-batch (SIGKILL). The
        batches in flight fail with EngineDeadError, the engine says it is unhealthy, a later call fails at once,
        and closing does not hang."""
        import psutil
        from vllm.v1.engine.exceptions import EngineDeadError

        cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
        assert len(cores) == 1, cores
        workers = cores[0].children(recursive=True)
        assert workers and {p.pid for p in [*cores, *workers]} <= {p.pid for p in engine.processes}
        steps = engine.stats()["steps"]
        opts = GenerationOptions(max_new_tokens=200)
        pending = [engine.submit(_requests(range(60 + 8 * b, 68 + 8 * b)), opts) for b in range(3)]
        deadline = time.monotonic() + 120
        while engine.stats()["steps"] == steps and time.monotonic() < deadline:  # until the engine is on them
            time.sleep(0.01)
        cores[0].kill()
        t0 = time.monotonic()
        for future in pending:  # 72 requests of up to 200 tokens: none done one step in
            with pytest.raises(EngineDeadError):
                future.result(timeout=60)
        assert time.monotonic() - t0 < 10
        assert not engine.healthy()
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            engine.submit(_requests(range(1)), GenerationOptions(max_new_tokens=2)).result(timeout=30)
        assert time.monotonic() - t0 < 2
        assert engine.stats()["batches"] > 0  # the figures so far stay readable
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 30
        # the core's worker, left to init when the core died, is stopped by close()
        assert not [p.pid for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# ---- all-mode checkpoint with a BT-Adapter --------------------------------------------------------------


def _stop_pair(answers: list[list[int]]) -> tuple[int, int]:
    """Two generated tokens A, B such that some answer meets A first and another meets B first."""
    def first(ids: list[int], t: int) -> int:
        return ids.index(t) if t in ids else len(ids)

    tokens = sorted({t for ids in answers for t in ids} - {STOP_ID, EOS_ID})
    for a in tokens:
        for b in tokens:
            if a != b and any(first(x, a) < first(x, b) for x in answers) and any(
                first(x, b) < first(x, a) for x in answers
            ):
                return a, b
    raise AssertionError(f"no token pair splits these answers: {answers}")


@pytest.fixture(scope="module")
def all_bt_dir(tmp_path_factory):
    """`all` mode + BT-Adapter; the LM-head rows of "###" and EOS copy (×1.001) the rows of two tokens the
    model really generates, chosen so that some greedy answers end on the stop string and some on EOS."""
    from stllm.hf_engine import HFEngine

    d = build_tiny(tmp_path_factory.mktemp("tiny_all_bt") / "model", video_input="all", btadapter_depth=1)
    hf = HFEngine.from_pretrained(str(d), dtype="float32", device="cpu")
    results = hf.generate(_requests(range(3)), GenerationOptions(max_new_tokens=24, repetition_penalty=1.5))
    a, b = _stop_pair([ans.token_ids for r in results for ans in r.answers])
    sd = load_file(d / "model.safetensors")
    head = sd["language_model.lm_head.weight"]
    head[STOP_ID] = head[a] * 1.001
    head[EOS_ID] = head[b] * 1.001
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


class TestAllModeBTAdapter:
    @pytest.fixture(scope="class")
    @classmethod
    def engines(cls, all_bt_dir):
        from stllm.hf_engine import HFEngine

        engine = _start(all_bt_dir)
        yield HFEngine.from_pretrained(str(all_bt_dir), dtype="float32", device="cpu"), engine
        engine.close()

    @pytest.mark.parametrize("penalty", [1.0, 1.5])
    def test_greedy_parity(self, engines, penalty):
        hf, engine = engines
        opts = GenerationOptions(max_new_tokens=24, repetition_penalty=penalty)
        requests = _requests(range(3), short=True)
        hf_results, vllm_results = hf.generate(requests, opts), engine.generate(requests, opts)
        _assert_parity(hf_results, vllm_results)
        assert len(vllm_results[0].answers[0].token_ids) > 0
        if penalty == 1.5:  # both ways of stopping are exercised
            last = {a.token_ids[-1] for r in vllm_results for a in r.answers}
            assert {STOP_ID, EOS_ID} <= last


# ---- mean mode (the paper's baseline) -------------------------------------------------------------------


def test_mean_mode_parity_and_close_drains_what_is_in_flight(tmp_path_factory):
    import psutil

    from stllm.hf_engine import HFEngine

    d = build_tiny(tmp_path_factory.mktemp("tiny_mean") / "model", video_input="mean")
    hf = HFEngine.from_pretrained(str(d), dtype="float32", device="cpu")
    engine = _start(d)
    closed = False
    try:
        opts = GenerationOptions(max_new_tokens=16)
        requests = _requests(range(2), short=True)
        _assert_parity(hf.generate(requests, opts), engine.generate(requests, opts))
        pending = engine.submit(_requests(range(5, 8)), opts)
        assert engine.processes  # vLLM's engine core and worker
        engine.close()  # shutdown while a batch is in flight: it is finished, not lost
        closed = True
        assert not [p.pid for p in engine.processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert all(r.ok and len(r.answers) == 3 for r in pending.result(timeout=5))
        with pytest.raises(RuntimeError, match="closed"):
            engine.submit(_requests(range(1)), opts).result(timeout=5)
    finally:
        if not closed:
            engine.close()


# ---- output-only repetition penalty, both vLLM runner interfaces, against HF's processor ---------------


def _hf_penalized(logits, outputs, penalties):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rows = []
    for row, out, p in zip(logits, outputs, penalties, strict=True):
        ids = torch.tensor([out], dtype=torch.long).reshape(1, -1)
        rows.append(RepetitionPenaltyLogitsProcessor(float(p))(ids, row[None].clone())[0] if p != 1.0 else row)
    return torch.stack(rows)


def _penalty_case():
    import torch
    from vllm import SamplingParams

    from stllm.vllm.repetition_penalty import PENALTY_ARG

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    prompts = [[1, 2, 3, 7], [4, 5], [9]]
    outputs = [[7, 7, 11, 12], [], [3, 40, 3]]  # row 0 repeats; prompt tokens must stay untouched
    penalties = [1.5, 1.5, 1.0]
    params = [SamplingParams(extra_args={PENALTY_ARG: p}) for p in penalties]
    return logits, prompts, outputs, penalties, params


def test_output_penalty_v1_interface_matches_hf():
    from vllm.v1.sample.logits_processor import BatchUpdate

    from stllm.vllm.repetition_penalty import OutputRepetitionPenalty

    logits, prompts, outputs, penalties, params = _penalty_case()
    proc = OutputRepetitionPenalty(None, "cpu", False)
    added = [(i, params[i], prompts[i], outputs[i]) for i in range(3)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    got = proc.apply(logits.clone())
    assert (got == _hf_penalized(logits, outputs, penalties)).all()
    assert got[0, 1] == logits[0, 1]  # a prompt-only token


def test_output_penalty_v2_interface_matches_hf():
    from types import SimpleNamespace

    import torch
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    from stllm.vllm.repetition_penalty import OutputRepetitionPenalty

    logits, prompts, outputs, penalties, params = _penalty_case()
    slots = [5, 0, 2]  # persistent slots differ from batch rows
    all_ids = torch.zeros(8, 16, dtype=torch.int32)
    prompt_len, total_len = torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    for s, p, o in zip(slots, prompts, outputs, strict=True):
        all_ids[s, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.int32)
        prompt_len[s], total_len[s] = len(p), len(p) + len(o)
    all_ids[5, 8] = 13  # stale data past total_len must be ignored
    state = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=8, vocab_size=50, all_token_ids=SimpleNamespace(gpu=all_ids),
        prompt_len=SimpleNamespace(gpu=prompt_len), prefill_len=SimpleNamespace(gpu=prompt_len),
        total_len=SimpleNamespace(gpu=total_len),
    )
    proc = OutputRepetitionPenalty(None, state)
    assert [proc.add_request(s, p) for s, p in zip(slots, params, strict=True)] == [True, True, False]
    proc.apply_staged_writes()
    idx = torch.tensor(slots)
    ctx = LogitsContext(
        expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx.numpy(), expanded_local_pos=torch.zeros(3),
        input_ids=torch.zeros(3), pos=total_len[idx] - 1, seq_lens_upper_bound_np=total_len[idx].numpy() + 1,
    )
    got = proc.apply(logits.clone(), ctx)
    assert (got == _hf_penalized(logits, outputs, penalties)).all()
