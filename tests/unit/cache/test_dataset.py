"""Opening a teacher cache or an aligned set: what is not one, an unfinished one and another format version are
refused with a message that names the folder and the command that makes or finishes it. Writing one: an output
folder made with another identity is refused with the differences listed; shards round-trip through the
dataset base (alm_pipeline.cache.dataset)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from alm_pipeline.cache import store
from alm_pipeline.cache.aligned import (
    ALIGNED_FORMAT_VERSION,
    ALIGNED_KIND,
    ALIGNED_SCHEMA,
    TOKENIZER_DIR,
    AlignedSet,
    open_aligned_set,
)
from alm_pipeline.cache.arrow import ragged_list_array
from alm_pipeline.cache.dataset import OutputRefusedError, diff_identity
from alm_pipeline.cache.store import CacheIntegrityError
from alm_pipeline.cache.teacher import CACHE_KIND, FORMAT_VERSION, TeacherCache, open_cache
from alm_pipeline.storage import StorageError, location

OPENERS = {
    "cache": (open_cache, CACHE_KIND, FORMAT_VERSION, "teacher cache", "alm-pipeline teacher-cache"),
    "aligned": (open_aligned_set, ALIGNED_KIND, ALIGNED_FORMAT_VERSION, "aligned set", "alm-pipeline align"),
}


def _manifest(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(fields))
    return folder


@pytest.mark.parametrize("which", sorted(OPENERS))
def test_refusals_name_the_folder_and_the_command(tmp_path, which):
    opener, kind, version, what, command = OPENERS[which]
    with pytest.raises(CacheIntegrityError, match=rf"{tmp_path}: not an? {what} \(no manifest.json\)"):
        opener(tmp_path)
    other = "alm-aligned-set" if which == "cache" else "alm-teacher-cache"
    folder = _manifest(tmp_path / "other", kind=other, format_version=version, state="complete")
    with pytest.raises(CacheIntegrityError, match=rf"not an? {what} \(kind='{other}'\)"):
        opener(folder)
    folder = _manifest(tmp_path / "old", kind=kind, format_version=version + 98, state="complete")
    with pytest.raises(CacheIntegrityError, match=rf"format version {version + 98}.*`{command}`"):
        opener(folder)
    folder = _manifest(tmp_path / "half", kind=kind, format_version=version, state="in_progress")
    with pytest.raises(CacheIntegrityError, match=rf"{folder}: the {what} is incomplete.*same `{command}`"):
        opener(folder)


def test_diff_identity_lists_every_differing_leaf():
    old = {"format_version": 1, "settings": {"gamma": 0.1, "debias": True}, "corpus": {"rows": 3}}
    new = {"format_version": 1, "settings": {"gamma": 0.5, "debias": True}, "teacher": "t"}
    assert diff_identity(old, new) == [
        ("corpus", {"rows": 3}, None),
        ("settings.gamma", 0.1, 0.5),
        ("teacher", None, "t"),
    ]
    assert diff_identity(old, old) == []


@pytest.mark.parametrize("dataset, noun", [(TeacherCache, "cache"), (AlignedSet, "set")])
def test_prepare_output_resumes_refuses_or_replaces(tmp_path, dataset, noun):
    root = tmp_path / "out"
    identity = {"format_version": 1, "settings": {"max_length": 128}}
    assert dataset.prepare_output(root, identity, overwrite=False) is None  # nothing there yet
    manifest = dataset.new_manifest("in_progress", identity, 2, [])
    dataset.write_manifest(root, manifest)
    (root / store.SHARD_DIR).mkdir()
    (root / store.SHARD_DIR / "shard-00000.parquet").write_bytes(b"x")
    (root / TOKENIZER_DIR).mkdir()
    assert dataset.prepare_output(root, identity, overwrite=False)["state"] == "in_progress"  # resume

    other = {"format_version": 1, "settings": {"max_length": 64}}
    with pytest.raises(
        OutputRefusedError, match=rf"settings\.max_length: {noun} has 128, this run has 64"
    ) as err:
        dataset.prepare_output(root, other, overwrite=False)
    assert err.value.differences == [("settings.max_length", 128, 64)]
    assert (root / store.SHARD_DIR / "shard-00000.parquet").exists()  # a refusal removes nothing

    assert dataset.prepare_output(root, other, overwrite=True) is None
    assert not (root / store.MANIFEST).exists() and not (root / store.SHARD_DIR).exists()
    assert (root / TOKENIZER_DIR).exists() == (dataset is TeacherCache)  # the set's tokenizer goes with it


def test_prepare_output_refuses_another_kind_and_orphan_shards(tmp_path):
    root = _manifest(tmp_path / "cache", kind=CACHE_KIND, format_version=FORMAT_VERSION, identity={})
    with pytest.raises(
        OutputRefusedError, match=r"exists and is not an aligned set \(kind='alm-teacher-cache'\)"
    ):
        AlignedSet.prepare_output(root, {}, overwrite=True)
    orphan = tmp_path / "orphan"
    (orphan / store.SHARD_DIR).mkdir(parents=True)
    (orphan / store.SHARD_DIR / "shard-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputRefusedError, match="has shards but no manifest"):
        TeacherCache.prepare_output(orphan, {}, overwrite=False)
    assert TeacherCache.prepare_output(orphan, {}, overwrite=True) is None
    assert not (orphan / store.SHARD_DIR).exists()


def _aligned_rows(n_docs: int, rng) -> pa.Table:
    lengths = rng.integers(0, 6, size=n_docs)
    groups = rng.integers(0, 3, size=n_docs)
    ids = [rng.integers(0, 259, size=k).astype(np.int32) for k in lengths]
    ends = [np.sort(rng.integers(0, 9, size=g)).astype(np.int32) for g in groups]
    lp = [-rng.random(g).astype(np.float32) for g in groups]
    columns = {
        "doc_id": pa.array([f"d{i}" for i in range(n_docs)]),
        "input_ids": ragged_list_array(ids, pa.int32()),
        "chunk_start": ragged_list_array(ends, pa.int32()),
        "chunk_end": ragged_list_array(ends, pa.int32()),
        "teacher_chunk_logprob": ragged_list_array(lp, pa.float32()),
        "teacher_chunk_boundary_logprob": ragged_list_array(lp, pa.float32()),
        "text_bytes": pa.array(lengths, type=pa.int32()),
        "covered_bytes": pa.array(lengths, type=pa.int32()),
        "num_tokens": pa.array(lengths, type=pa.int32()),
        "num_chunks": pa.array(groups, type=pa.int32()),
    }
    return pa.Table.from_arrays([columns[n] for n in ALIGNED_SCHEMA.names], schema=ALIGNED_SCHEMA)


def test_written_shards_verify_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    tables = [_aligned_rows(5, rng), _aligned_rows(0, rng), _aligned_rows(7, rng)]
    identity = {"format_version": ALIGNED_FORMAT_VERSION}
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("in_progress", identity, len(tables), []))
    assert AlignedSet.pending_shards(root, len(tables)) == [0, 1, 2]
    infos = [AlignedSet.write_shard(root, k, t, stats={"k": k}) for k, t in enumerate(tables)]
    assert [i.tokens for i in infos] == [sum(len(x) for x in t["input_ids"].to_pylist()) for t in tables]
    assert AlignedSet.pending_shards(root, len(tables)) == []
    assert AlignedSet.finished_shards(root, len(tables)) == infos
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("complete", identity, len(tables), infos))
    aligned = open_aligned_set(root)  # checks every shard's presence and size
    assert [t.equals(w) for t, w in zip(aligned.iter_tables(), tables, strict=True)] == [True] * 3
    assert aligned.shards == infos and aligned.shard_info(2) == dataclasses.replace(infos[2], stats={})
    assert aligned.shard_location(1).uri == f"{root}/shards/shard-00000001.parquet"

    store.shard_path(root, 1).write_bytes(b"corrupt")
    assert AlignedSet.pending_shards(root, len(tables)) == [1]
    with pytest.raises(CacheIntegrityError, match="shard-00000001.parquet: shard missing or unverified"):
        AlignedSet.finished_shards(root, len(tables))
    with pytest.raises(CacheIntegrityError, match=r"shard-00000001.parquet: 7 bytes, the manifest says \d+"):
        open_aligned_set(root)


@pytest.mark.parametrize("entry", ["../outside.parquet", "ABSOLUTE", "shards/../../outside.parquet"])
def test_index_entries_that_leave_the_dataset_are_refused(tmp_path, entry):
    """A shard index whose entry points outside the dataset folder (to a file with the right checksum, so
    nothing else would notice; the manifest names the crafted index with its checksum) is refused by name:
    readers never open files the dataset does not hold."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data" / "set"
    table = _aligned_rows(4, rng)
    identity = {"format_version": ALIGNED_FORMAT_VERSION}
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("in_progress", identity, 1, []))
    info = AlignedSet.write_shard(root, 0, table, stats={})
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("complete", identity, 1, [info]))
    assert open_aligned_set(root).iter_tables().__next__().equals(table)

    outside = tmp_path / "data" / "outside.parquet"
    outside.write_bytes(store.shard_path(root, 0).read_bytes())  # same bytes: the checksum would match
    name = str(outside) if entry == "ABSOLUTE" else entry
    manifest = json.loads((root / store.MANIFEST).read_text())
    manifest["shard_index"] = store.write_shard_index(root, [dataclasses.replace(info, file=name)])
    (root / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheIntegrityError, match=r"shard entry .* leaves the dataset folder"):
        open_aligned_set(root)


def test_an_altered_shard_index_is_refused(tmp_path):
    root = tmp_path / "set"
    identity = {"format_version": ALIGNED_FORMAT_VERSION}
    info = AlignedSet.write_shard(root, 0, _aligned_rows(3, np.random.default_rng(1)), stats={})
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("complete", identity, 1, [info]))
    store.write_shard_index(root, [info, dataclasses.replace(info, index=1)])  # not what the manifest names
    with pytest.raises(CacheIntegrityError, match=r"shards.parquet: does not match manifest.json"):
        open_aligned_set(root)
    (root / store.SHARD_INDEX).unlink()
    with pytest.raises(
        CacheIntegrityError, match=r"shards.parquet: the shard index named in manifest.json is missing"
    ):
        open_aligned_set(root)


def test_an_old_format_version_is_refused_with_the_rerun_message(tmp_path):
    """Format version 1 (5-digit shard names, shards listed in manifest.json) is not read by this version."""
    folder = _manifest(tmp_path / "v1", kind=CACHE_KIND, format_version=1, state="complete", shards=[])
    with pytest.raises(
        CacheIntegrityError,
        match=rf"format version 1, this alm-pipeline reads version {FORMAT_VERSION}; re-run "
        "`alm-pipeline teacher-cache` with this version",
    ):
        open_cache(folder)
    assert FORMAT_VERSION == 2 and ALIGNED_FORMAT_VERSION == 2


def test_a_dataset_on_s3_is_written_resumed_read_and_replaced(s3_bucket, tmp_path, monkeypatch):
    """Every step of the dataset API on s3://: shards and markers, pending/finished, manifest + index, open and
    read (also from a shard entry alone), overwrite; nothing named ``s3:`` appears on the local disk."""
    monkeypatch.chdir(tmp_path)
    root = f"{s3_bucket}/sets/bytes"
    rng = np.random.default_rng(0)
    tables = [_aligned_rows(5, rng), _aligned_rows(3, rng), _aligned_rows(4, rng)]
    identity = {"format_version": ALIGNED_FORMAT_VERSION, "settings": {"gamma": 0.1}}
    assert AlignedSet.prepare_output(root, identity, overwrite=False) is None
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("in_progress", identity, 3, []))
    infos = [AlignedSet.write_shard(root, k, tables[k], stats={"k": k}) for k in (0, 2)]
    assert AlignedSet.pending_shards(root, 3) == [1]  # resume: only the missing shard
    infos.insert(1, AlignedSet.write_shard(root, 1, tables[1], stats={"k": 1}))
    assert AlignedSet.finished_shards(root, 3) == infos
    AlignedSet.write_manifest(root, AlignedSet.new_manifest("complete", identity, 3, infos))

    aligned = open_aligned_set(root)
    assert aligned.root.uri == root and aligned.num_shards == 3
    assert aligned.shard_location(2).uri == f"{root}/shards/shard-00000002.parquet"
    assert all(t.equals(w) for t, w in zip(aligned.iter_tables(), tables, strict=True))
    assert AlignedSet.read_shard_entry(root, infos[1].to_json()).equals(tables[1])  # no manifest needed
    assert AlignedSet.prepare_output(root, identity, overwrite=False)["state"] == "complete"

    store.shard_path(root, 1).write_bytes(b"short")  # a replaced shard: refused at open, by its URI
    with pytest.raises(CacheIntegrityError, match=rf"{root}/shards/shard-00000001.parquet: 5 bytes"):
        open_aligned_set(root)
    store.shard_path(root, 1).remove()
    with pytest.raises(CacheIntegrityError, match=rf"{root}/shards/shard-00000001.parquet: shard listed"):
        open_aligned_set(root)

    other = {**identity, "settings": {"gamma": 0.5}}
    assert AlignedSet.prepare_output(root, other, overwrite=True) is None  # overwrite removes on s3 too
    assert [i.path for i in location(root).list(recursive=True)] == []
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_a_missing_bucket_is_refused_before_anything_is_written(s3_bucket):
    with pytest.raises(
        StorageError, match=r"s3://no-such-bucket-h1/set: bucket s3://no-such-bucket-h1 does not"
    ):
        AlignedSet.prepare_output("s3://no-such-bucket-h1/set", {}, overwrite=False)
    assert not location("s3://no-such-bucket-h1").exists()


def test_unreachable_storage_is_refused_naming_the_uri(monkeypatch):
    from alm_pipeline import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(
            StorageError, match=r"s3://bucket/cache/manifest.json: cannot read .*cannot reach 127\.0\.0\.1:9"
        ):
            open_cache("s3://bucket/cache")
        with pytest.raises(StorageError, match=r"s3://bucket/set: cannot .*cannot reach 127\.0\.0\.1:9"):
            AlignedSet.prepare_output("s3://bucket/set", {}, overwrite=False)
    finally:
        storage._filesystem.cache_clear()
