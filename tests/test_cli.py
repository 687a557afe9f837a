"""The command line as a user runs it: ask (one video), run (job validation), search."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from pipeline.demo.clips import make_test_video


def _cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


LIBRARY_NOTICES = ("Token authentication", "core_worker", "Started a local Ray instance", "Progress bars disabled",
                   "INFO ", "WARNING ")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_test_video(tmp_path_factory.mktemp("clip") / "clip.mp4", "h264", n_frames=30, seed=4)


def test_ask_json(tiny_dir, clip):
    out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--json", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["question"] == "What moves?" and isinstance(data["answer"], str)
    assert 1 <= len(data["token_ids"]) <= 6
    # the original's rule: seg = 29/8 = 3.625, ends 0 4 7 11 14 (14.5, half to even) 18 22 25 29, midpoints
    assert data["frame_indices"] == [2, 5, 9, 12, 16, 20, 23, 27] and data["frame_sampling"] == "original"
    assert data["decoder"] == "decord" and set(data["timings_s"]) == {"load", "decode", "generate"}


def test_ask_plain_matches_engine(tiny_dir, clip, hf_engine):
    from pipeline.decode import decode_video
    from stllm.engine import GenerationOptions, VideoRequest

    out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--max-new-tokens", "6", "--frames", "8")
    assert out.returncode == 0, out.stderr
    frames = decode_video(clip.read_bytes(), num_frames=8).frames
    [res] = hf_engine.generate([VideoRequest("c", frames, ["What moves?"])], GenerationOptions(max_new_tokens=6))
    assert out.stdout.strip() == res.answers[0].text


def test_ask_with_the_originals_decoding(tiny_dir, clip):
    out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--json", "--decoding", "original",
               "--max-new-tokens", "8", "--prompt", "qa")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["num_beams"] == 5 and data["prompt"] == "qa" and 1 <= len(data["token_ids"]) <= 8


def test_ask_vllm_starts_with_memory_held_elsewhere(tiny_dir, clip, tmp_path):
    """vLLM's CPU worker would reserve 92% of the node; the engine sizes its KV cache from what it needs."""
    import os

    from tests.memory_hog import gib_to_hold, hold_memory, node_memory

    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["STLLM_INDEX_HOME"] = str(tmp_path)
    with hold_memory(min(gib_to_hold(0.8), 6.0)):
        total, available = node_memory()
        assert available < 0.92 * total
        out = _cli("ask", str(clip), "What moves?", "--model", str(tiny_dir), "--engine", "vllm", "--json",
                   "--max-new-tokens", "6", timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)  # nothing but the JSON on stdout: vLLM's logs went to the log file
    assert data["engine"] == "vllm" and 1 <= len(data["token_ids"]) <= 6
    assert not any(n in out.stderr for n in LIBRARY_NOTICES), out.stderr
    assert list((tmp_path / "logs").glob("ask-*.log"))


def test_demo_twice_succeeds_and_says_nothing_was_new(tmp_path):
    import os

    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path)}
    first = _cli("demo", timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert "indexed" in first.stdout and "nothing new" not in first.stdout
    # the shipped world model describes its clips: captions graded against the truth, a search finds what it asks
    import re

    text = " ".join(first.stdout.split())
    right = re.search(r"(\d+)/8 captions exactly right", text)
    assert right and int(right.group(1)) >= 6, text
    query = re.search(r"search \(full text: '([a-z]+) ([a-z]+)'\) (\{.*?\})", text)
    assert query and f"{query.group(1)} {query.group(2)}" in query.group(3), text
    again = _cli("demo", timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing new: all 8 clips were already indexed" in " ".join(again.stdout.split())
    for out in (first, again):  # Ray's notices are in the log file, not on the user's screen
        assert not any(n in out.stderr for n in LIBRARY_NOTICES), out.stderr


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


def test_ask_without_model_uses_the_world_model_with_its_prompt(tmp_path, capsys):
    """A new user's first `ask`: the shipped world model, in the prompt it was trained with, answers right."""
    import os

    from pipeline.demo.clips import encode_frames
    from stllm.world.render import render
    from stllm.world.scenes import QUESTIONS, sample_scene

    scene = sample_scene(7, "heldout", 0)
    clip = encode_frames(tmp_path / "world.mp4", "h264", render(scene), (scene.width, scene.height), scene.fps)
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path / "home")}
    out = _cli("ask", str(clip), QUESTIONS["colour"], "--json", "--max-new-tokens", "8", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"].endswith("demo_model") and data["prompt"] == "qa"
    assert data["answer"].strip() == scene.colour, data
    assert "synthetic-world" in out.stderr and "warning" not in out.stderr
    out = _cli("ask", str(clip), QUESTIONS["colour"], "--prompt", "conversation", "--max-new-tokens", "2", env=env)
    assert out.returncode == 0 and "trained with the 'qa' prompt preset" in out.stderr  # the user's choice, warned
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "--help"])
    model_help = " ".join(capsys.readouterr().out.split("--model MODEL")[-1].split("--engine")[0].split())
    assert "'world'" in model_help and "(the default)" in model_help and "RANDOM" in model_help


# ---- bad or empty sources: caught before any work, nothing written -------------------------------------------


def _run_cli(tmp_path, source: str, *sets: str) -> subprocess.CompletedProcess[str]:
    """`stllm-index run` of the demo job on `source`, its outputs under tmp_path/out, its own home."""
    import os
    from pathlib import Path

    out = tmp_path / "out"
    flags = [f"source.uri={source}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
             f"output.manifest_dir={out}/runs", *sets]
    job = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path / "home")}
    return _cli("run", str(job), "--no-progress", *(a for f in flags for a in ("--set", f)), timeout=120, env=env)


def _nothing_written(tmp_path) -> None:
    assert not (tmp_path / "out").exists()  # no index folders, no lock, no run record
    assert not list((tmp_path / "home").glob("tiny-model-*"))  # not even the model was built


def test_run_with_a_missing_source_fails_before_any_work(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = _run_cli(tmp_path, str(missing), "model.path=world", "prompt.preset=conversation")
    assert out.returncode == 2, out.stderr
    assert f"source.uri: {missing} does not exist" in out.stderr
    assert "trained with the 'qa' prompt preset" in out.stderr  # the job's warnings come first
    _nothing_written(tmp_path)
    with socket.socket() as s:  # a port nothing listens on: the store cannot be reached
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    s3 = f"{{endpoint_url: 'http://127.0.0.1:{port}', access_key_id: k, secret_access_key: s, max_attempts: 1}}"
    out = _run_cli(tmp_path, "s3://videos/in", f"source.s3={s3}")
    assert out.returncode == 2 and "source.uri: cannot list s3://videos/in" in out.stderr, out.stderr
    _nothing_written(tmp_path)


def test_run_on_s3_missing_bucket_and_empty_prefix(s3_server, tmp_path):
    s3 = (f"{{endpoint_url: '{s3_server.endpoint}', access_key_id: '{s3_server.access_key}', "
          f"secret_access_key: '{s3_server.secret_key}', max_attempts: 2}}")
    out = _run_cli(tmp_path, "s3://no-such-bucket-here/in", f"source.s3={s3}")
    assert out.returncode == 2 and "no-such-bucket-here" in out.stderr and "error" in out.stderr, out.stderr
    _nothing_written(tmp_path)
    bucket = s3_server.bucket("novideos")
    s3_server.client().put_object(Bucket=bucket, Key="in/readme.txt", Body=b"not a video")
    out = _run_cli(tmp_path, f"s3://{bucket}/in", f"source.s3={s3}")
    assert out.returncode == 3, out.stderr
    assert f"no videos in s3://{bucket}/in" in out.stderr and ".txt (1)" in out.stderr
    _nothing_written(tmp_path)


def test_run_with_no_matching_videos_warns_and_exits_3(tmp_path, clip, capsys):
    import shutil

    from pipeline.cli import build_parser
    from pipeline.jobs import load_job
    from pipeline.preflight import NoVideos, check_source

    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(NoVideos, match="no files at all"):
        check_source(load_job(None, [f"source.uri={src}"]).source)
    for name in ("a.MPG", "b.mpg", "notes.txt", ".hidden.mp4"):
        (src / name).write_bytes(b"x")
    out = _run_cli(tmp_path, str(src))
    assert out.returncode == 3, out.stderr
    assert f"warning: no videos in {src}" in out.stderr
    assert ".mp4, .mkv, .webm, .mov, .avi, .m4v" in out.stderr  # what was searched
    assert ".mpg (2), .txt (1)" in out.stderr and "source.extensions" in out.stderr  # what is there instead
    _nothing_written(tmp_path)
    (src / "sub").mkdir()
    shutil.copyfile(clip, src / "sub" / "clip.mp4")
    out = _run_cli(tmp_path, str(src), "source.extensions=[mkv]")  # a wrong extensions field
    assert out.returncode == 3 and "no file ends with .mkv" in out.stderr and ".mp4 (1)" in out.stderr
    _nothing_written(tmp_path)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "exit status:" in usage and "3 the source holds no file with one of source.extensions" in usage
