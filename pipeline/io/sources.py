"""Where videos come from: a local folder or an `s3://bucket/prefix`, listed as small rows (uri, size, etag,
mtime). Rows travel through Ray; the decode actor fetches the bytes itself with `read_bytes`.

ETag choice for local files: `stat:` + sha256(size, mtime_ns)[:32] — free to compute (no read), changes
whenever the file is rewritten; a plain copy that keeps mtime keeps it. Pass `local_etag="sha256"` for a
true content hash (reads every byte at listing time). S3 ETags are the server's, quotes stripped; note that
multipart uploads have ETags that depend on the part size, so the same bytes uploaded twice may differ.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, SecretStr

DEFAULT_EXTENSIONS: tuple[str, ...] = ("mp4", "mkv", "webm", "mov", "avi", "m4v")


class S3Options(BaseModel):
    """How to reach S3 or an S3-compatible store. Unset fields fall back to the standard AWS chain
    (env vars such as AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL, ~/.aws/config, instance roles)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None  # masked in dumps, so manifests never hold it

    def resolved(self) -> S3Options:
        """Fill the endpoint from AWS_ENDPOINT_URL(_S3) so boto3, pyarrow and LanceDB all agree on it."""
        env = os.environ
        endpoint = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return self.model_copy(update={"endpoint_url": endpoint}) if endpoint != self.endpoint_url else self

    @property
    def secret(self) -> str | None:
        return self.secret_access_key.get_secret_value() if self.secret_access_key else None

    def client(self) -> Any:
        """A boto3 S3 client (cached per options: creating one costs tens of ms)."""
        return _client(self.resolved())

    def pyarrow_fs(self) -> Any:
        import pyarrow.fs as pafs

        o = self.resolved()
        kwargs: dict[str, Any] = {}
        if o.endpoint_url:
            scheme, _, host = o.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        if o.access_key_id:
            kwargs.update(access_key=o.access_key_id, secret_key=o.secret)
        return pafs.S3FileSystem(region=o.region or "us-east-1", **kwargs)

    def lance_storage_options(self) -> dict[str, str]:
        """LanceDB / object_store `storage_options` (it reads AWS_* env vars for anything unset)."""
        o = self.resolved()
        opts: dict[str, str] = {}
        if o.endpoint_url:
            opts["aws_endpoint"] = o.endpoint_url
            if o.endpoint_url.startswith("http://"):
                opts["allow_http"] = "true"
        if o.region:
            opts["aws_region"] = o.region
        elif o.endpoint_url:
            opts["aws_region"] = "us-east-1"  # S3-compatible servers ignore it, object_store wants one
        if o.access_key_id:
            opts["aws_access_key_id"] = o.access_key_id
            opts["aws_secret_access_key"] = o.secret or ""
        return opts


@functools.lru_cache(maxsize=16)
def _client(o: S3Options) -> Any:
    # Path-style addressing: S3-compatible servers (SeaweedFS, MinIO) rarely serve bucket subdomains.
    config = Config(s3={"addressing_style": "path"} if o.endpoint_url else {}, retries={"mode": "standard"})
    session = boto3.session.Session()  # sessions are not thread-safe; clients are
    return session.client(
        "s3", endpoint_url=o.endpoint_url, region_name=o.region, aws_access_key_id=o.access_key_id,
        aws_secret_access_key=o.secret, config=config,
    )


@dataclass(frozen=True, slots=True)
class VideoSource:
    """One listed video. `mtime` is seconds since the epoch (UTC)."""

    uri: str
    size: int
    etag: str
    mtime: float

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b.mp4` → ("bucket", "a/b.mp4")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// uri: {uri}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri}")
    return bucket, key


def _normalise_extensions(extensions: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(e.lower().lstrip(".") for e in (extensions or DEFAULT_EXTENSIONS))


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.rsplit(".", 1)[-1].lower() in exts if "." in name else False


def _local_path(uri: str) -> Path:
    return Path(uri[7:] if uri.startswith("file://") else uri).expanduser().absolute()


def local_fingerprint(path: Path, stat: os.stat_result | None = None, mode: str = "stat") -> str:
    """The local stand-in for an ETag (see the module docstring)."""
    if mode == "sha256":
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    st = stat or path.stat()
    return "stat:" + hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]


def _iter_local(uri: str, exts: tuple[str, ...], local_etag: str) -> Iterator[VideoSource]:
    root = _local_path(uri)
    if root.is_file():  # one explicit file is taken whatever its extension
        files: Iterator[Path] = iter([root])
    elif root.is_dir():
        files = _walk(root, exts)
    else:
        raise ValueError(f"video folder not found: {uri}")
    for path in files:
        st = path.stat()
        yield VideoSource(str(path), st.st_size, local_fingerprint(path, st, local_etag), st.st_mtime)


def _walk(root: Path, exts: tuple[str, ...]) -> Iterator[Path]:
    # Sorted, recursive, hidden entries skipped (.DS_Store, partial downloads): same order every run.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and _has_ext(name, exts):
                yield Path(dirpath) / name


def _iter_s3(uri: str, exts: tuple[str, ...], s3: S3Options, page_size: int) -> Iterator[VideoSource]:
    bucket, prefix = split_s3_uri(uri)
    client = s3.client()
    if prefix and not prefix.endswith("/") and _has_ext(prefix, exts):
        try:  # one object named explicitly
            head = client.head_object(Bucket=bucket, Key=prefix)
        except ClientError as e:
            raise _s3_error(e, uri) from e
        yield VideoSource(uri, head["ContentLength"], head["ETag"].strip('"'),
                          head["LastModified"].timestamp())
        return
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a prefix names a folder: s3://b/videos must not list videos2/
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or not _has_ext(key, exts):
                    continue
                yield VideoSource(f"s3://{bucket}/{key}", obj["Size"], obj["ETag"].strip('"'),
                                  obj["LastModified"].timestamp())
    except ClientError as e:
        raise _s3_error(e, uri) from e


def _s3_error(e: ClientError, uri: str) -> Exception:
    code = e.response.get("Error", {}).get("Code", "")
    if code == "NoSuchKey":
        return FileNotFoundError(f"S3 object not found: {uri}")
    if code in ("NoSuchBucket", "404", "NotFound"):  # HEAD answers a bare 404 for bucket or key
        return ValueError(f"S3 bucket or object not found: {uri} ({code})")
    return OSError(f"S3 request for {uri} failed: {code}: {e}")


def list_videos(
    uri: str,
    *,
    extensions: Sequence[str] | None = None,
    s3: S3Options | None = None,
    limit: int | None = None,
    local_etag: Literal["stat", "sha256"] = "stat",
    page_size: int = 1000,
) -> list[VideoSource]:
    """The videos under `uri` (local folder or file, `s3://bucket/prefix` or one object), filtered by
    extension (case-insensitive), in a stable order, at most `limit`. Raises ValueError naming `uri` when the
    folder or bucket does not exist."""
    exts = _normalise_extensions(extensions)
    if is_s3(uri):
        found = _iter_s3(uri, exts, s3 or S3Options(), page_size)
    else:
        found = _iter_local(uri, exts, local_etag)
    return list(itertools.islice(found, limit))


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """The whole object or file. Raises FileNotFoundError naming `uri` when it is missing."""
    if not is_s3(uri):
        path = _local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"video file not found: {uri}") from None
    bucket, key = split_s3_uri(uri)
    try:
        return (s3 or S3Options()).client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        raise _s3_error(e, uri) from e
