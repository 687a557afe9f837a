"""Where videos come from: a local folder or an `s3://bucket/prefix`, listed page by page as small rows (uri,
size, etag, mtime). Rows travel through Ray; the decode actor fetches the object itself (`pipeline.io.fetch`).

Identity (a row per object, copies grouped by content):
- `object_id(uri)`: the object — every copy under another key or path is its own row.
- etag: what tells that the object changed. S3: the server's ETag (quotes stripped). Local: `stat:` + a hash
  of (size, mtime_ns, ctime_ns, inode) — free to compute; a rewrite changes ctime even when `cp -p` or
  `touch -d` restores the mtime.
- `content_id`: the bytes — exact copies share it. S3: `etag:<ETag>:<size>` (multipart ETags depend on the
  part size, so the same bytes uploaded twice with other part sizes count as different content). Local:
  `sha256:<hex>:<size>`, computed when an object is new or changed (`local_content_id`).
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
from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEFAULT_EXTENSIONS: tuple[str, ...] = ("mp4", "mkv", "webm", "mov", "avi", "m4v")


class S3Options(BaseModel):
    """How to reach S3 or an S3-compatible store. Unset fields fall back to the standard AWS chain
    (env vars such as AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL, ~/.aws/config, instance roles)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None  # masked in dumps, so manifests never hold it
    # Retries of every client (boto3, pyarrow, LanceDB): a store that pauses for a minute is waited out.
    max_attempts: int = Field(default=10, ge=1, le=100, description="attempts per request, retries included")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0, description="a request that waits longer is retried")

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
        return pafs.S3FileSystem(region=o.region or "us-east-1", connect_timeout=o.connect_timeout_s,
                                 request_timeout=o.read_timeout_s,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=o.max_attempts),
                                 **kwargs)

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
        # object_store's client: per-request timeouts, then retries with backoff for up to this long
        opts.update(timeout=f"{o.read_timeout_s:g}s", connect_timeout=f"{o.connect_timeout_s:g}s",
                    client_max_retries=str(o.max_attempts),
                    client_retry_timeout=f"{o.max_attempts * (o.read_timeout_s + 10):g}s")
        return opts


@functools.lru_cache(maxsize=16)
def _client(o: S3Options) -> Any:
    # Path-style addressing: S3-compatible servers (SeaweedFS, MinIO) rarely serve bucket subdomains.
    config = Config(s3={"addressing_style": "path"} if o.endpoint_url else {},
                    retries={"mode": "standard", "total_max_attempts": o.max_attempts},
                    connect_timeout=o.connect_timeout_s, read_timeout=o.read_timeout_s)
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


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def local_fingerprint(path: Path, stat: os.stat_result | None = None, mode: str = "stat") -> str:
    """The local stand-in for an ETag (see the module docstring)."""
    if mode == "sha256":
        return "sha256:" + _sha256_file(path)
    st = stat or path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    return "stat:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def object_id(uri: str) -> str:
    """The identity of an object (its key or path): one index row per object."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def s3_content_id(etag: str, size: int) -> str:
    return f"etag:{etag}:{size}"


def local_content_id(uri: str) -> str:
    """sha256 of the file's bytes + its size (reads the whole file)."""
    path = _local_path(uri)
    return f"sha256:{_sha256_file(path)}:{path.stat().st_size}"


def content_id(src: VideoSource) -> str:
    """The bytes' identity of a listed object (reads a local file whole; free on S3)."""
    return s3_content_id(src.etag, src.size) if is_s3(src.uri) else local_content_id(src.uri)


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
            raise s3_error(e, uri) from e
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
        raise s3_error(e, uri) from e


def s3_error(e: ClientError, uri: str) -> Exception:
    code = e.response.get("Error", {}).get("Code", "")
    if code == "NoSuchKey":
        return FileNotFoundError(f"S3 object not found: {uri}")
    if code in ("NoSuchBucket", "404", "NotFound"):  # HEAD answers a bare 404 for bucket or key
        return ValueError(f"S3 bucket or object not found: {uri} ({code})")
    return OSError(f"S3 request for {uri} failed: {code}: {e}")


def iter_videos(
    uri: str,
    *,
    extensions: Sequence[str] | None = None,
    s3: S3Options | None = None,
    local_etag: Literal["stat", "sha256"] = "stat",
    page_size: int = 1000,
) -> Iterator[VideoSource]:
    """The videos under `uri` (local folder or file, `s3://bucket/prefix` or one object), filtered by
    extension (case-insensitive), in a stable order, one listing page at a time (nothing is held). Raises
    ValueError naming `uri` when the folder or bucket does not exist."""
    exts = _normalise_extensions(extensions)
    if is_s3(uri):
        return _iter_s3(uri, exts, s3 or S3Options(), page_size)
    return _iter_local(uri, exts, local_etag)


def iter_pages(uri: str, *, page_size: int = 1000, **kwargs: Any) -> Iterator[list[VideoSource]]:
    """`iter_videos` in lists of up to `page_size`."""
    found = iter_videos(uri, page_size=page_size, **kwargs)
    while page := list(itertools.islice(found, page_size)):
        yield page


def list_videos(uri: str, *, limit: int | None = None, **kwargs: Any) -> list[VideoSource]:
    """`iter_videos` as a list, at most `limit` (for small listings: tests, `ask`)."""
    return list(itertools.islice(iter_videos(uri, **kwargs), limit))


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
        raise s3_error(e, uri) from e
