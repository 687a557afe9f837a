"""Sampling, resize/crop, every codec (decord or the PyAV fallback), corrupt files, the killable timeout."""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import (
    DecodeError,
    DecodeTimeout,
    DecodeWorker,
    decode_video,
    decode_video_inline,
)
from pipeline.demo.clips import SQUARE, square_x
from stllm.frame_sampling import midpoint_indices, original_indices
from stllm.transforms import resize_crop
from tests.faults import StallAt

CODECS = ["h264", "hevc", "vp9", "av1"]


def _hand_resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("shape", [(2, 30, 50, 3), (2, 50, 30, 3), (1, 32, 50, 3), (1, 16, 16, 3)])
def test_resize_crop_is_pil_bicubic_then_centre_crop(shape: tuple[int, ...]) -> None:
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = resize_crop(frames, 16)
    assert out.shape == (shape[0], 16, 16, 3) and out.dtype == np.uint8
    for i in range(shape[0]):
        np.testing.assert_array_equal(out[i], _hand_resize_crop(frames[i], 16))
    if shape == (1, 32, 50, 3):  # 50→25 wide: left = round(4.5) = 4 (half to even), not 5
        img = Image.fromarray(frames[0]).resize((25, 16), Image.BICUBIC)
        np.testing.assert_array_equal(out[0], np.asarray(img)[:, 4:20])
    with pytest.raises(ValueError):
        resize_crop(frames.astype(np.float32), 16)


def test_two_pass_resize_is_pixel_exact() -> None:
    # The fast path (our own two passes with a crop between) must equal one PIL resize + crop on this Pillow,
    # for both pass orders Pillow picks (landscape, portrait, tall, upscale, near-square) and real video sizes.
    from stllm.transforms import resize_crop_image, resize_crop_reference, resize_crop_two_pass, two_pass_is_exact

    assert two_pass_is_exact()
    rng = np.random.default_rng(3)
    sizes = [(320, 240), (640, 360), (1920, 1080), (240, 320), (225, 500), (500, 225), (279, 1223), (176, 144),
             (100, 80), (224, 300), (999, 1000), (223, 223)]
    sizes += [tuple(int(x) for x in rng.integers(17, 900, 2)) for _ in range(40)]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = resize_crop_reference(img, 224)
        np.testing.assert_array_equal(resize_crop_two_pass(img, 224), ref, err_msg=f"{w}x{h}")
        np.testing.assert_array_equal(resize_crop_image(img, 224), ref, err_msg=f"{w}x{h}")


def _square_left(frame: np.ndarray) -> int:
    """x of the white square in a native-size frame (the columns that are bright over its rows)."""
    h = frame.shape[0]
    rows = frame[(h - SQUARE) // 2:(h + SQUARE) // 2].astype(int).sum(axis=(0, 2))
    return int(np.argmax(np.convolve(rows, np.ones(SQUARE), mode="valid")))


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_decodes_the_right_frames(video_fixtures, codec: str) -> None:
    data = video_fixtures[codec].read_bytes()
    v = decode_video(data, num_frames=8, size=32, timeout_s=60)
    assert v.decoder == ("pyav" if codec == "av1" else "decord")  # decord cannot open AV1
    assert v.codec == codec and v.n_frames == 24 and v.fps == pytest.approx(12.0)
    assert (v.width, v.height) == (96, 64) and v.duration_s == pytest.approx(2.0, abs=0.1)
    assert v.frame_indices == [1, 4, 7, 10, 13, 15, 18, 21]  # the original's rule, by hand in test_faithful
    assert v.frames.shape == (8, 32, 32, 3) and v.frames.dtype == np.uint8
    thumb = Image.open(io.BytesIO(v.thumbnail_jpeg))
    assert thumb.format == "JPEG" and thumb.size == (96, 64)

    native = decode_video(data, num_frames=8, size=None, timeout_s=60)
    assert native.frames.shape == (8, 64, 96, 3)
    for frame, idx in zip(native.frames, native.frame_indices, strict=True):
        assert abs(_square_left(frame) - square_x(idx, 24, 96)) <= 1, (codec, idx)
    np.testing.assert_array_equal(resize_crop(native.frames, 32), v.frames)


def test_keyframe_runs_cut_only_between_gops() -> None:
    from pipeline.decode.decord_runs import keyframe_runs

    wanted = list(range(1, 200, 8))  # decoding ~200 frames, resizing 25 (≈ 100 frames' worth)
    runs = keyframe_runs(wanted, [0, 50, 100, 150], parts=2)
    assert [i for r in runs for i in r] == wanted and len(runs) == 2
    assert runs[1][0] == 105 and runs[0][-1] == 97  # a keyframe (100) lies between the runs: none decoded twice
    dense_resizes = list(range(1, 200, 2))  # resizing 100 frames outweighs decoding 200: the resize thread
    assert len(keyframe_runs(dense_resizes, [0, 50, 100, 150], parts=2)) == 2  # beside one decoder is slower
    assert keyframe_runs(wanted, [0], parts=2) == [wanted]  # one GOP: one run (a second reader would redo it)
    assert keyframe_runs(wanted, [0, 190], parts=2) == [wanted]  # a cut that does not balance: one run
    four = keyframe_runs(wanted, list(range(0, 200, 10)), parts=4)
    assert len(four) == 4 and max(map(len, four)) - min(map(len, four)) <= 3


def test_runs_decoded_side_by_side_give_the_same_frames(tmp_path, monkeypatch) -> None:
    """A clip with a keyframe every 24 frames is read by two readers at once; the frames are those of one."""
    import decord

    from pipeline.decode import decoders
    from pipeline.demo.clips import make_test_video

    path = make_test_video(tmp_path / "gop.mp4", "h264", n_frames=240, gop=24)
    assert len(decord.VideoReader(str(path)).get_key_indices()) >= 10
    monkeypatch.setattr(decoders, "_PARTS", 2)
    calls: list[int] = []
    monkeypatch.setattr(decoders, "read_runs", lambda *a, _f=decoders.read_runs: (calls.append(len(a[2])), _f(*a)))
    split = decode_video_inline(path.read_bytes(), 16, size=32)
    assert calls == [2]
    monkeypatch.setattr(decoders, "_PARTS", 1)
    one = decode_video_inline(path.read_bytes(), 16, size=32)
    assert split.frame_indices == one.frame_indices
    np.testing.assert_array_equal(split.frames, one.frames)
    assert split.thumbnail_jpeg and split.thumbnail_jpeg == one.thumbnail_jpeg


def test_forced_decoders(video_fixtures) -> None:
    av1 = video_fixtures["av1"].read_bytes()
    with pytest.raises(DecodeError) as e:
        decode_video(av1, 4, 32, decoder="decord")
    assert e.value.stage == "decord.open"
    h264 = video_fixtures["h264"].read_bytes()
    a = decode_video(h264, 8, 32, decoder="pyav")
    b = decode_video_inline(h264, 8, 32, decoder="decord")
    assert a.decoder == "pyav" and b.decoder == "decord" and a.frame_indices == b.frame_indices
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 3  # same frames, own RGB conversion
    np.testing.assert_array_equal(decode_video(h264, 8, 32).frames, b.frames)  # worker == inline


def test_short_clips_give_fewer_frames_or_repeat_them(video_fixtures) -> None:
    data = video_fixtures["vp9"].read_bytes()
    v = decode_video(data, num_frames=40, size=16)  # the original: min(n, T) frames
    assert v.frames.shape[0] == 24 and v.frame_indices == original_indices(24, 40)
    v = decode_video(data, num_frames=40, size=16, sampling="midpoint")  # always T, repeating frames
    assert v.frames.shape[0] == 40 and v.frame_indices == midpoint_indices(24, 40)
    dupes = [i for i in range(39) if v.frame_indices[i] == v.frame_indices[i + 1]]
    assert dupes
    for i in dupes:
        np.testing.assert_array_equal(v.frames[i], v.frames[i + 1])


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_files_raise_decode_error(video_fixtures, kind: str) -> None:
    data = video_fixtures[kind].read_bytes()
    with pytest.raises(DecodeError) as e:
        decode_video(data, 8, 32, timeout_s=60)
    assert not isinstance(e.value, DecodeTimeout)
    if kind == "random":
        assert e.value.stage == "probe" and "not a readable video" in str(e.value)
    else:  # the header promises 48 frames; decord fails, then PyAV runs out of data
        assert e.value.stage == "pyav.read" and "truncated" in str(e.value) and "decord" in str(e.value)
    with pytest.raises(DecodeError):
        decode_video_inline(data, 8, 32)


def test_a_stuck_decode_is_killed_within_the_timeout(video_fixtures) -> None:
    data = video_fixtures["h264"].read_bytes()
    with DecodeWorker() as worker:
        worker.decode(data, 4, 16)
        pid = worker.pid
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout) as e:
            worker.decode(data, 4, 16, timeout_s=1.0, stage_hook=StallAt("probe"))
        assert time.monotonic() - t0 < 4.0
        assert e.value.stage == "probe" and "killed" in str(e.value)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # really gone (and reaped), not just abandoned
        assert worker.decode(data, 4, 16).frames.shape == (4, 16, 16, 3)  # a fresh process takes over
        assert worker.pid != pid

    # The shared worker behind decode_video: same bound, then back to work.
    t0 = time.monotonic()
    with pytest.raises(DecodeTimeout):
        decode_video(data, 4, 16, timeout_s=1.0, stage_hook=StallAt("transform"))
    assert time.monotonic() - t0 < 4.0 + 2.0  # + a possible worker start
    assert decode_video(data, 4, 16).decoder == "decord"


def test_a_hung_decord_is_retried_with_pyav(video_fixtures) -> None:
    # decord hangs forever on some files (decord #373): killed at the timeout, then PyAV decodes them
    data = video_fixtures["hevc"].read_bytes()
    v = decode_video(data, 4, 16, timeout_s=1.5, stage_hook=StallAt("decord.read"))
    assert v.decoder == "pyav" and v.frame_indices == original_indices(24, 4)
    with pytest.raises(DecodeTimeout) as e:  # forcing decord: no second chance
        decode_video(data, 4, 16, timeout_s=1.0, decoder="decord", stage_hook=StallAt("decord.read"))
    assert e.value.stage == "decord.read"


def test_a_crashing_decoder_is_reported_and_replaced(video_fixtures) -> None:
    data = video_fixtures["hevc"].read_bytes()
    with DecodeWorker() as worker:
        with pytest.raises(DecodeError) as e:
            worker.decode(data, 4, 16, stage_hook=StallAt("decord.read", exit_code=3))
        assert e.value.stage == "worker" and "exit code 3" in str(e.value) and "decord.read" in str(e.value)
        assert worker.decode(data, 4, 16).decoder == "decord"


def test_decode_errors_survive_pickling() -> None:  # Ray ships exceptions between processes
    e = pickle.loads(pickle.dumps(DecodeTimeout("decord.read", "took too long")))
    assert isinstance(e, DecodeTimeout) and e.stage == "decord.read" and e.message == "took too long"


def test_decode_stage_batches_rows_and_yields_the_cpu(video_fixtures) -> None:
    # In a child process (niceness only goes up): the stage lowers its own priority and its decode
    # subprocess inherits it; a batch keeps every row, a corrupt one as an error record.
    import subprocess
    import sys

    code = f"""
import os, pyarrow as pa
from pipeline.decode.worker import shared_worker_pid
from pipeline.stages.decode import DecodeStage
stage = DecodeStage(num_frames=4, image_size=32, timeout_s=60, nice=7)
rows = pa.Table.from_pylist([{{"uri": {str(video_fixtures["h264"])!r}}}, {{"uri": {str(video_fixtures["random"])!r}}},
                            {{"uri": {str(video_fixtures["vp9"])!r}}}])
out = pa.concat_tables(list(stage(rows))).to_pylist()
print([r["uri"][-8:] for r in out], [r["error_stage"] or "-" for r in out], [len(r["frames_shape"] or []) for r in out])
print(os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, shared_worker_pid()))
"""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    uris = [str(video_fixtures[k])[-8:] for k in ("h264", "random", "vp9")]
    assert lines[-2] == f"{uris} ['-', 'decode', '-'] [4, 0, 4]"
    assert lines[-1] == f"{max(before, 7)} {max(before, 7)}"
