"""Listing local folders and S3 prefixes (real SeaweedFS), reading bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.io.sources import S3Options, VideoSource, list_videos, read_bytes


def _tree(root: Path) -> None:
    for rel, body in {
        "a.mp4": b"aaaa", "b.MKV": b"bb", "sub/c.webm": b"c", "notes.txt": b"x", ".hidden.mp4": b"h",
        ".cache/d.mp4": b"d", "sub/deeper/e.mov": b"eeeee",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def test_local_listing_filters_sorts_and_fingerprints(tmp_path: Path) -> None:
    _tree(tmp_path)
    found = list_videos(str(tmp_path))
    assert [Path(v.uri).relative_to(tmp_path).as_posix() for v in found] == [
        "a.mp4", "b.MKV", "sub/c.webm", "sub/deeper/e.mov"]  # case-insensitive, recursive, hidden skipped
    assert all(Path(v.uri).is_absolute() for v in found)
    assert [v.size for v in found] == [4, 2, 1, 5]
    assert isinstance(found[0], VideoSource) and found[0].etag.startswith("stat:")
    assert list_videos(str(tmp_path)) == found  # stable
    some = list_videos(str(tmp_path), extensions=[".WEBM", "mov"])
    assert [Path(v.uri).name for v in some] == ["c.webm", "e.mov"]
    assert len(list_videos(str(tmp_path), limit=2)) == 2

    a = tmp_path / "a.mp4"
    before = found[0].etag
    st = a.stat()
    a.write_bytes(b"AAAA")  # same size, new content and mtime
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert list_videos(str(a))[0].etag != before  # an explicit file is listed whatever its extension

    sha = list_videos(str(a), local_etag="sha256")[0].etag
    assert sha == "sha256:" + hashlib.sha256(b"AAAA").hexdigest()


def test_local_errors_name_the_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        list_videos(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_bytes(missing)
    (tmp_path / "v.mp4").write_bytes(b"123")
    assert read_bytes(str(tmp_path / "v.mp4")) == b"123"
    assert read_bytes("file://" + str(tmp_path / "v.mp4")) == b"123"


def test_s3_listing_paginates_and_filters(s3_server) -> None:
    bucket = s3_server.bucket("list")
    client = s3_server.client()
    bodies = {f"videos/clip{i:02d}.mp4": bytes([i]) * (i + 1) for i in range(7)}
    bodies |= {"videos/sub/x.WEBM": b"w", "videos/readme.txt": b"t", "videos2/other.mp4": b"o"}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.put_object(Bucket=bucket, Key="videos/empty-dir/", Body=b"")

    calls = []
    handler = lambda **kw: calls.append(kw)  # noqa: E731 — count ListObjectsV2 requests
    client.meta.events.register("before-call.s3.ListObjectsV2", handler)
    try:
        found = list_videos(f"s3://{bucket}/videos", s3=s3_server.options(), page_size=2)
    finally:
        client.meta.events.unregister("before-call.s3.ListObjectsV2", handler)
    assert len(calls) >= 5  # 10 keys under the prefix, 2 per page
    keys = [v.uri.removeprefix(f"s3://{bucket}/") for v in found]
    assert keys == [f"videos/clip{i:02d}.mp4" for i in range(7)] + ["videos/sub/x.WEBM"]  # not videos2/
    first = found[0]
    assert first.size == 1 and first.etag == hashlib.md5(bodies[keys[0]]).hexdigest() and first.mtime > 0

    assert len(list_videos(f"s3://{bucket}/", s3=s3_server.options(), limit=3)) == 3
    assert [v.uri for v in list_videos(f"s3://{bucket}", s3=s3_server.options(), extensions=["webm"])] == [
        f"s3://{bucket}/videos/sub/x.WEBM"]
    [one] = list_videos(f"s3://{bucket}/videos/clip03.mp4", s3=s3_server.options())
    assert one.size == 4

    assert read_bytes(f"s3://{bucket}/videos/clip05.mp4", s3_server.options()) == bytes([5]) * 6


def test_s3_errors_name_the_uri(s3_server) -> None:
    opts = s3_server.options()
    with pytest.raises(ValueError, match="s3://no-such-bucket-xyz/videos"):
        list_videos("s3://no-such-bucket-xyz/videos", s3=opts)
    bucket = s3_server.bucket("err")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/missing.mp4"):
        read_bytes(f"s3://{bucket}/missing.mp4", opts)
    assert list_videos(f"s3://{bucket}/nothing-here/", s3=opts) == []


def test_s3_options_follow_the_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    opts = S3Options(access_key_id="k", secret_access_key="topsecret123")
    assert opts.resolved().endpoint_url == "http://127.0.0.1:9"
    lance = opts.lance_storage_options()
    assert lance["aws_endpoint"] == "http://127.0.0.1:9" and lance["allow_http"] == "true"
    assert "topsecret123" not in opts.model_dump_json()  # masked in dumps (manifests)
    assert lance["aws_secret_access_key"] == "topsecret123"
    with pytest.raises(ValueError):
        S3Options(endpoint="x")  # unknown field
