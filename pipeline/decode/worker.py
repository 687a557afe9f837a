"""Decode a video's bytes into the frames ST-LLM sees — bounded in time, in a process that can be killed.

`decode_video` runs `decoders.decode_inline` (sampling, decord → PyAV fallback, resize + crop) in a
separate *process* that is killed on timeout: a stuck decoder (decord hangs forever on containers that
over-report their frame count, decord #373) ignores threads and signals. The process is reused across calls
(start-up ~0.3 s) and recycled every `max_tasks` videos (decord leaks on some files). A decord hang is retried
once with PyAV. The frames cross a socket once, straight into the caller's array (no pickling of frames).
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from pipeline.decode.decoders import DecodedVideo, Decoder, decode_inline
from pipeline.decode.frames import DecodeError, DecodeTimeout, Source, short_message
from stllm.frame_sampling import FrameSampling

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
# glibc serves each video's big buffers (decoded chunks, the output array) with fresh mmaps by default, and
# first-touch page faults cost ~10% of a short clip's decode on a VM. Keep them on the worker's heap instead:
# it is recycled every `max_tasks` videos, so what it holds is bounded. (Environment wins if set.)
_WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
                  "MALLOC_TOP_PAD_": str(16 << 20)}


def decode_video_inline(data: Source, num_frames: int, size: int | None = 224, *, decoder: Decoder = "auto",
                        sampling: FrameSampling = "original", native: int = 0) -> DecodedVideo:
    """`decode_video` in the calling process: no timeout, no process overhead (benchmarks, debugging)."""
    return decode_inline(data, num_frames, size, decoder, sampling, native=native)


class _Channel:
    """Pickled, length-prefixed messages and raw byte payloads over a stream socket. Payloads land
    straight in the caller's buffer (recv_into): multiprocessing's Connection buffers and copies, ~7×
    slower for a 10 MB frame array."""

    _LEN = struct.Struct("!Q")

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, obj: object) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(self._LEN.pack(len(payload)) + payload)

    def send_raw(self, buf: Any) -> None:
        self.sock.sendall(memoryview(buf).cast("B"))

    def recv(self) -> Any:
        (n,) = self._LEN.unpack(self._exact(self._LEN.size))
        return pickle.loads(self._exact(n))

    def recv_into(self, buf: Any) -> None:
        view, got = memoryview(buf).cast("B"), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("decode channel closed")
            got += n

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self.recv_into(buf)
        return buf

    def poll(self, timeout: float) -> bool:
        return bool(wait([self.sock], timeout))

    def close(self) -> None:
        self.sock.close()


def _report_stage(chan: _Channel, hook: Callable[[str], object] | None, stage: str) -> None:
    chan.send(("stage", stage))  # the parent names the stage a timeout hit
    if hook is not None:
        hook(stage)


def worker_main(fd: int) -> None:
    """Child loop: a request, then the video bytes (or a path) → stage messages, then ("ok", info) + the frames."""
    chan = _Channel(socket.socket(fileno=fd))
    chan.send(("ready", os.getpid()))
    while True:
        try:
            req = chan.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        if req.get("path") is not None:
            data: Source = req["path"]  # read by the decoders from the file: nothing of it crosses the socket
        else:
            buf = bytearray(req["nbytes"])
            chan.recv_into(buf)
            data = bytes(buf)  # BytesIO shares a bytes object's buffer; a bytearray would be copied per open
            del buf

        progress = functools.partial(_report_stage, chan, req.get("stage_hook"))
        try:
            video = decode_inline(data, req["num_frames"], req["size"], req["decoder"], req["sampling"], progress,
                                  req.get("native", 0))
        except DecodeError as e:
            chan.send(("error", type(e).__name__, e.stage, e.message))
            continue
        except Exception as e:  # noqa: BLE001 — report, keep the worker alive
            chan.send(("error", "DecodeError", "internal", f"{type(e).__name__}: {short_message(e)}"))
            continue
        info = video.info()
        frames = np.ascontiguousarray(video.frames)
        info["shape"] = frames.shape
        native = video.native_frames
        info["native_shape"] = native.shape if native is not None else None
        chan.send(("ok", info))
        chan.send_raw(frames.reshape(-1))
        if native is not None:
            chan.send_raw(np.ascontiguousarray(native).reshape(-1))


class DecodeWorker:
    """One decode process, reused across calls; killed (and later restarted) when a decode overruns.

    Not thread-safe: use one per thread, or the module-level `decode_video` (which serialises calls).
    """

    def __init__(self, max_tasks: int = 200, start_timeout_s: float = 120.0):
        self.max_tasks = max_tasks
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: _Channel | None = None
        self._tasks = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        self.kill()
        # A fresh interpreter via subprocess, not multiprocessing: no fork of a threaded parent (Ray
        # workers), and no re-import of the caller's __main__ (spawn's), so scripts need no main guard.
        ours, theirs = socket.socketpair()
        env = {**_WORKER_MALLOC, **os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from pipeline.decode.worker import worker_main; "
                 "worker_main(int(sys.argv[1]))", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        chan = _Channel(ours)
        try:
            if not chan.poll(self.start_timeout_s):
                raise DecodeError("worker", f"decode process did not start within {self.start_timeout_s:g}s")
            chan.recv()  # ("ready", pid)
        except (EOFError, OSError, DecodeError) as e:
            proc.kill()
            code = proc.wait(5)
            chan.close()
            if isinstance(e, DecodeError):
                raise
            raise DecodeError("worker", f"decode process failed to start (exit code {code})") from None
        self._proc, self._chan, self._tasks = proc, chan, 0

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        if self._chan is not None:
            self._chan.close()
        self._proc, self._chan = None, None

    def close(self) -> None:
        """Ask the process to exit; kill it if it does not within 2 s."""
        if self.alive() and self._chan is not None and self._proc is not None:
            try:
                self._chan.send(None)
                self._proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def __enter__(self) -> DecodeWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, data: Source, num_frames: int, size: int | None = 224, timeout_s: float = 60.0, *,
               decoder: Decoder = "auto", sampling: FrameSampling = "original",
               stage_hook: Callable[[str], object] | None = None, native: int = 0) -> DecodedVideo:
        """Decode in the worker; raise DecodeTimeout (after killing it) if it takes over `timeout_s`.
        `native`: also bring back that many frames at the source's aspect ratio (`native_frames`).

        `stage_hook(stage)` (picklable, e.g. `tests.faults.StallAt("decord.read", 60)`) is called in the
        worker as each stage starts: tests use it to simulate a stuck or crashing decoder.
        """
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if self._tasks >= self.max_tasks:
            self.close()  # recycle: bounds what a leaking decoder can accumulate
        self.start()
        assert self._chan is not None
        chan = self._chan
        self._tasks += 1
        req = {"num_frames": num_frames, "size": size, "decoder": decoder, "sampling": sampling,
               "stage_hook": stage_hook, "native": native}
        if isinstance(data, (bytes, bytearray, memoryview)):
            req["nbytes"] = len(data)
        else:
            req["path"] = os.fspath(data)
        deadline = time.monotonic() + timeout_s
        stage = "send"
        try:
            chan.send(req)
            if "nbytes" in req:
                chan.send_raw(data)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not chan.poll(remaining):
                    self.kill()
                    raise DecodeTimeout(stage, f"decoding took longer than {timeout_s:g}s (stuck in "
                                               f"{stage}); the decode process was killed")
                msg = chan.recv()
                if msg[0] == "stage":
                    stage = msg[1]
                elif msg[0] == "error":
                    cls = DecodeTimeout if msg[1] == "DecodeTimeout" else DecodeError
                    raise cls(msg[2], msg[3])
                else:
                    info = msg[1]
                    frames = np.empty(info.pop("shape"), dtype=np.uint8)
                    chan.recv_into(frames)
                    native_shape = info.pop("native_shape")
                    if native_shape is not None:
                        info["native_frames"] = np.empty(native_shape, dtype=np.uint8)
                        chan.recv_into(info["native_frames"])
                    return DecodedVideo(frames=frames, **info)
        except (EOFError, OSError):
            code = None
            try:  # the socket closes a moment before the process is reaped
                code = self._proc.wait(2) if self._proc is not None else None
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            raise DecodeError("worker", f"the decode process died in {stage} (exit code {code})") from None


_shared: DecodeWorker | None = None
_shared_lock = threading.Lock()


def shared_worker_pid() -> int | None:
    """The pid of this process's shared decode worker (None before the first `decode_video`)."""
    return _shared.pid if _shared is not None else None


def _shutdown_shared() -> None:
    if _shared is not None:
        _shared.close()


atexit.register(_shutdown_shared)


def decode_video(data: Source, num_frames: int, size: int | None = 224, timeout_s: float = 60.0, *,
                 decoder: Decoder = "auto", sampling: FrameSampling = "original",
                 stage_hook: Callable[[str], object] | None = None, native: int = 0) -> DecodedVideo:
    """Sample `num_frames` frames of a video (its bytes, or a local file path the decoders read themselves),
    resized and centre-cropped to size×size (size=None: native frames, no resize — to measure the sampling).
    `native`: also keep that many of them, spread evenly, at the source's aspect ratio (`native_frames`: OCR).

    Runs in this process's shared decode worker, bounded by `timeout_s`. With `decoder="auto"`, decord is
    tried first and PyAV takes over when decord fails; if decord *hangs* (killed at the timeout), the
    video is retried once with PyAV under a fresh `timeout_s`, so the worst case is 2×timeout_s.
    Raises DecodeError (corrupt/undecodable input) or DecodeTimeout.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DecodeWorker()
        kwargs = dict(decoder=decoder, sampling=sampling, stage_hook=stage_hook, native=native)
        try:
            return _shared.decode(data, num_frames, size, timeout_s, **kwargs)
        except DecodeTimeout as e:
            if decoder != "auto" or not e.stage.startswith("decord"):
                raise
            kwargs["decoder"] = "pyav"
            return _shared.decode(data, num_frames, size, timeout_s, **kwargs)


__all__ = ["DecodeWorker", "decode_video", "decode_video_inline", "shared_worker_pid", "worker_main"]
