"""alm_pipeline.storage against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import pytest

from alm_pipeline.storage import StorageError, location


def test_local_paths_and_file_uris_are_the_same_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("out/x").uri == str(tmp_path / "out" / "x")
    assert location(f"file://{tmp_path}/out/x").uri == str(tmp_path / "out" / "x")
    assert location("out/x").is_local


@pytest.mark.parametrize("uri", ["hdfs://nn/path", "ftp://host/x", "http://host/x"])
def test_unknown_scheme_refused_naming_the_uri(uri):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        location(uri)


def test_files_named_gz_are_bytes_as_they_are_on_every_backend(tmp_path, s3_bucket):
    """pyarrow guesses a compression from a ``.gz`` name unless told not to: reads, writes and checksums of
    such files must see the stored bytes (a downloaded ``.tar.gz``'s digest; a ``.jsonl.gz`` corpus is unzipped
    by its reader, once)."""
    import gzip
    import hashlib

    from alm_pipeline.cache.store import sha256_file

    data = gzip.compress(b"some text\n" * 100)
    (tmp_path / "a.tar.gz").write_bytes(data)
    for root in (location(str(tmp_path)), location(f"{s3_bucket}/gz")):
        (root / "b.tar.gz").write_bytes(data)
        assert (root / "b.tar.gz").size() == len(data)
        assert (root / "b.tar.gz").read_bytes() == data
        assert sha256_file(root / "b.tar.gz") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "a.tar.gz") == hashlib.sha256(data).hexdigest()


def test_s3_round_trip_and_no_local_folder(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = location(f"{s3_bucket}/data/set")
    assert root.uri == f"{s3_bucket}/data/set" and not root.is_local
    (root / "manifest.json").write_json({"a": 1})
    (root / "shards" / "x.bin").write_bytes(b"\x00" * 10)
    assert (root / "manifest.json").read_json() == {"a": 1}
    assert (root / "shards" / "x.bin").size() == 10
    assert [root.child(i).uri for i in root.list(recursive=True) if i.is_file] == [
        f"{s3_bucket}/data/set/manifest.json",
        f"{s3_bucket}/data/set/shards/x.bin",
    ]
    root.remove_tree()
    assert not (root / "manifest.json").exists()
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    from alm_pipeline import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage._filesystem.cache_clear()
    with pytest.raises(StorageError, match=r"s3://bucket/x: cannot .*cannot reach 127\.0\.0\.1:9"):
        location("s3://bucket/x").exists()
    storage._filesystem.cache_clear()


@pytest.mark.parametrize("credentials", ["wrong", "none"])
def test_refused_or_missing_credentials_are_a_clear_error(s3_bucket, monkeypatch, tmp_path, credentials):
    """The real server refuses a wrong secret and an unsigned request: both name the URI and say what to set."""
    from alm_pipeline import storage

    (location(s3_bucket) / "x.json").write_json({"a": 1})  # with the right key: the object is there
    if credentials == "wrong":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(StorageError, match=rf"{s3_bucket}/x.json: cannot .*AWS_ACCESS_KEY_ID"):
            (location(s3_bucket) / "x.json").read_json()
    finally:
        storage._filesystem.cache_clear()


def test_local_copy_and_upload_round_trip(s3_bucket, tmp_path):
    from alm_pipeline.storage import local_copy, upload_folder

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\x01" * 1000)
    remote = upload_folder(src, f"{s3_bucket}/runs/r1/final")
    assert (remote / "sub" / "w.bin").size() == 1000
    copy = local_copy(remote, tmp_path / "cache")
    assert (copy / "config.json").read_text() == '{"a": 1}'
    assert (copy / "sub" / "w.bin").read_bytes() == b"\x01" * 1000
    mtime = (copy / "config.json").stat().st_mtime_ns
    assert local_copy(remote, tmp_path / "cache") == copy  # unchanged listing: reused, not downloaded again
    assert (copy / "config.json").stat().st_mtime_ns == mtime
    (remote / "config.json").write_bytes(b'{"a": 22}')  # changed remote: downloaded again
    assert (local_copy(remote, tmp_path / "cache") / "config.json").read_text() == '{"a": 22}'
    single = local_copy(remote / "config.json", tmp_path / "cache")
    assert single.is_file() and single.read_text() == '{"a": 22}'
    assert local_copy(str(src)) == src  # a local path is itself
