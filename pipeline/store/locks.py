"""One writer at a time per index: an exclusive lock that two runs (or two machines) on the same index take
around every commit.

- Local folders: `fcntl.flock` on `<root>/_lock` — the kernel drops it when the holder dies, even by SIGKILL.
- `s3://` prefixes: an object `<prefix>/_lock` created with a conditional PUT (`If-None-Match: *`) holding an
  expiry; a holder that died leaves it, and the next writer takes it over once it has expired, or at once when
  the holder was a process of this host that is gone (`If-Match` on the stale object's ETag, so two writers
  can never both take it). Released with a conditional DELETE.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipeline.io.sources import S3Options, is_s3, split_s3_uri

LOCK_NAME = "_lock"


class LockTimeout(TimeoutError):
    """Another writer held the index lock for longer than we were willing to wait."""


def _precondition_failed(e: ClientError) -> bool:
    return e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _dead_here(info: dict[str, Any], host: str) -> bool:
    """The lock's holder was a process on this host that no longer exists (it crashed: no need to wait)."""
    if info.get("host") != host or not info.get("pid"):
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class IndexLock:
    """`with IndexLock(root, s3):` — exclusive while inside. Re-entrant within one object."""

    def __init__(self, root: str, s3: S3Options | None = None, *, timeout_s: float = 600.0, lease_s: float = 300.0):
        self.root, self.s3 = root, s3
        self.timeout_s, self.lease_s = timeout_s, lease_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._depth = 0
        self._fd: int | None = None
        self._etag: str | None = None

    # ---- local -----------------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        path = Path(self.root).expanduser() / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LockTimeout(f"index {self.root} stayed locked by another run for {self.timeout_s:g}s") \
                        from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, self.owner.encode())
        self._fd = fd

    def _release_local(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # ---- S3 --------------------------------------------------------------------------------------------

    def _key(self) -> tuple[Any, str, str]:
        bucket, prefix = split_s3_uri(self.root)
        return (self.s3 or S3Options()).client(), bucket, f"{prefix.rstrip('/')}/{LOCK_NAME}".lstrip("/")

    def _acquire_s3(self) -> None:
        client, bucket, key = self._key()
        deadline = time.monotonic() + self.timeout_s
        while True:
            body = json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid,
                               "expires_at": time.time() + self.lease_s}).encode()
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
                return
            except ClientError as e:
                if not _precondition_failed(e):
                    raise
            try:  # held: take it over if its holder let it expire
                held = client.get_object(Bucket=bucket, Key=key)
                info = json.loads(held["Body"].read() or b"{}")
                if float(info.get("expires_at", 0)) < time.time() or _dead_here(info, self.host):
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=held["ETag"])["ETag"]
                    return
            except ClientError as e:
                if not (_precondition_failed(e) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")):
                    raise
            if time.monotonic() > deadline:
                raise LockTimeout(f"index {self.root} stayed locked by another run for {self.timeout_s:g}s")
            time.sleep(0.2)

    def _release_s3(self) -> None:
        if self._etag is None:
            return
        client, bucket, key = self._key()
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
        except ClientError as e:
            if not _precondition_failed(e):  # taken over after our lease expired: nothing of ours to remove
                raise
        self._etag = None

    # ---- both ------------------------------------------------------------------------------------------

    def __enter__(self) -> IndexLock:
        if self._depth == 0:
            (self._acquire_s3 if is_s3(self.root) else self._acquire_local)()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            (self._release_s3 if is_s3(self.root) else self._release_local)()


__all__ = ["IndexLock", "LockTimeout", "LOCK_NAME"]
