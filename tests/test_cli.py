"""The command line as a user runs it: ask (one video), run (job validation), search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.demo_clips import make_test_video


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_test_video(tmp_path_factory.mktemp("clip") / "clip.mp4", "h264", n_frames=30, seed=4)


def test_ask_json(tiny_dir, clip):
    out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--json", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["question"] == "What moves?" and isinstance(data["answer"], str)
    assert 1 <= len(data["token_ids"]) <= 6
    # seg = 30/8 = 3.75: int(1.875 + round(3.75·i)), half to even (round(7.5) = 8, round(22.5) = 22)
    assert data["frame_indices"] == [1, 5, 9, 12, 16, 20, 23, 27]
    assert data["decoder"] == "decord" and set(data["timings_s"]) == {"load", "decode", "generate"}


def test_ask_plain_matches_engine(tiny_dir, clip, hf_engine):
    from pipeline.decode import decode_video
    from stllm.engine import GenerationOptions, VideoRequest

    out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--max-new-tokens", "6", "--frames", "8")
    assert out.returncode == 0, out.stderr
    frames = decode_video(clip.read_bytes(), num_frames=8).frames
    [res] = hf_engine.generate([VideoRequest("c", frames, ["What moves?"])], GenerationOptions(max_new_tokens=6))
    assert out.stdout.strip() == res.answers[0].text


def test_ask_bad_video_is_a_clear_error(tmp_path, tiny_dir):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    out = _cli("ask", str(bad), "What?", "--model", str(tiny_dir))
    assert out.returncode != 0 and "bad.mp4" not in out.stdout and "error" in out.stderr.lower()


def test_run_rejects_invalid_job_before_any_work(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nsource: {uri: /nowhere}\nmodel: {engine: onnx, path: tiny}\n")
    out = _cli("run", str(job), timeout=120)
    assert out.returncode == 2
    assert "model.engine" in out.stderr and "'hf' or 'vllm'" in out.stderr
    out = _cli("run", "jobs/demo.yaml", "--set", "runtime.batch_size=0", timeout=120)
    assert out.returncode == 2 and "runtime.batch_size" in out.stderr


def test_convert_missing_source_is_a_clear_error(tmp_path):
    out = _cli("convert", str(tmp_path / "nope"), str(tmp_path / "dst"), timeout=120)
    assert out.returncode == 2 and "error:" in out.stderr
