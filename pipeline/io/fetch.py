"""Fetch one object for decoding with bounded memory: a local file is used where it lies; an S3 object is
streamed in chunks to a spool file on local disk (never one bytes value), under a size cap and a deadline.
The decoders then read the file themselves, seeking as they need."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from pipeline.io.sources import S3Options, is_s3, s3_error, split_s3_uri

CHUNK = 4 << 20


class FetchError(OSError):
    """The object could not be fetched: missing, too large, too slow, or the store failed."""


def local_path(uri: str) -> Path:
    return Path(uri[7:] if uri.startswith("file://") else uri).expanduser().absolute()


# Failures of the store or the network, not of the object: retried here, and never make an object "known bad".
TRANSIENT = (ReadTimeoutError, ConnectTimeoutError, EndpointConnectionError, ConnectionClosedError,
             ResponseStreamingError, IncompleteReadError, ConnectionError, TimeoutError)


class TransientFetchError(FetchError):
    """The store did not answer in time or the connection broke, on every attempt."""


def _retryable_client_error(e: ClientError) -> bool:
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or e.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")


@contextlib.contextmanager
def fetched(uri: str, s3: S3Options | None = None, *, max_bytes: int | None = None,
            deadline_s: float | None = None, spool_dir: str | None = None) -> Iterator[Path]:
    """`with fetched(uri) as path:` — a local path to the object's bytes while inside (a spool file for S3,
    removed afterwards). A download that breaks off resumes where it stopped (a Range request), up to the
    options' `max_attempts`. Raises FetchError naming the uri (TransientFetchError when the store failed)."""
    if not is_s3(uri):
        path = local_path(uri)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FetchError(f"video file not found: {uri}") from None
        if max_bytes is not None and size > max_bytes:
            raise FetchError(f"{uri} is {size} bytes, over the job's limit of {max_bytes} (source.max_bytes)")
        yield path
        return
    opts = s3 or S3Options()
    bucket, key = split_s3_uri(uri)
    fd, name = tempfile.mkstemp(prefix="stllm-fetch-", suffix=Path(key).suffix, dir=spool_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(opts, uri, bucket, key, out, max_bytes, deadline_s)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _download(opts: S3Options, uri: str, bucket: str, key: str, out: BinaryIO, max_bytes: int | None,
              deadline_s: float | None) -> None:
    client = opts.client()
    t0, offset, size, attempt = time.monotonic(), 0, None, 0
    while size is None or offset < size:
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            raise FetchError(f"fetching {uri} took longer than {deadline_s:g}s (source.fetch_timeout_s)")
        try:
            obj = client.get_object(Bucket=bucket, Key=key, **({"Range": f"bytes={offset}-"} if offset else {}))
            if size is None:
                size = obj["ContentLength"]
                if max_bytes is not None and size > max_bytes:
                    obj["Body"].close()
                    raise FetchError(f"{uri} is {size} bytes, over the job's limit of {max_bytes} "
                                     "(source.max_bytes)")
            try:
                for chunk in obj["Body"].iter_chunks(CHUNK):
                    out.write(chunk)
                    offset += len(chunk)
                    if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                        raise FetchError(f"fetching {uri} took longer than {deadline_s:g}s "
                                         "(source.fetch_timeout_s)")
            finally:
                obj["Body"].close()
            if offset < size:
                raise IncompleteReadError(actual_bytes=offset, expected_bytes=size)
        except ClientError as e:
            if not _retryable_client_error(e) or attempt + 1 >= opts.max_attempts:
                error = s3_error(e, uri)
                raise (TransientFetchError if _retryable_client_error(e) else FetchError)(str(error)) from None
            attempt += 1
        except TRANSIENT as e:
            attempt += 1
            if attempt >= opts.max_attempts:
                raise TransientFetchError(f"fetching {uri} failed {attempt} times: {type(e).__name__}: {e}") \
                    from None
        else:
            continue
        time.sleep(min(2.0 ** attempt * 0.25, 10.0))  # the store is struggling: back off, then resume


__all__ = ["FetchError", "TransientFetchError", "fetched", "local_path"]
