"""Atomic shard and JSON writes (alm_pipeline.cache.store): files get the user's umask."""

from __future__ import annotations

import os
import stat

import pyarrow as pa

from alm_pipeline.cache import store


def test_shards_markers_and_manifests_get_the_users_umask(tmp_path):
    """Before: every atomically written file was 0600 (``mkstemp``), while checkpoints were 0644."""
    old = os.umask(0o022)
    try:
        info = store.write_shard(tmp_path, 0, pa.table({"x": [1, 2, 3]}), tokens=3, stats={})
        store.atomic_write_json(tmp_path / store.MANIFEST, {"ok": True})
        os.umask(0o027)
        store.atomic_write_json(tmp_path / "group.json", {"ok": True})
    finally:
        os.umask(old)
    for path, mode in (
        (tmp_path / info.file, 0o644),
        (store.marker_path(tmp_path, 0).local_path, 0o644),
        (tmp_path / store.MANIFEST, 0o644),
        (tmp_path / "group.json", 0o640),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []  # no temporary files left


def test_shard_names_sort_in_shard_order_past_a_million_shards():
    """Before: 5 digits, so shard-100000 sorted before shard-99999 (listings, ``ls``, object-store keys)."""
    indices = [0, 5, 99_999, 100_000, 999_999, 1_000_000, 12_345_678]
    names = [store.shard_name(k) for k in indices]
    assert sorted(names) == names
    assert sorted(store.marker_name(k) for k in indices) == [store.marker_name(k) for k in indices]
    assert store.shard_name(1_000_000) == "shard-01000000.parquet"


def test_list_columns_get_their_compact_encodings(tmp_path):
    """Before: the encodings were keyed by the list column's name, which Parquet ignores (its values are the
    column ``NAME.list.element``), so every column was written PLAIN."""
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "offsets": pa.array([[1, 3, 6], [2]], type=pa.list_(pa.int32())),
            "token_ids": pa.array([[5, 7, 9], [1]], type=pa.list_(pa.int32())),
            "logprob": pa.array([[-1.0, -2.0, -0.5], [-3.0]], type=pa.list_(pa.float32())),
        }
    )
    info = store.write_shard(tmp_path, 0, table, tokens=4, stats={})
    meta = pq.ParquetFile(tmp_path / info.file).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["offsets.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["token_ids.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["logprob.list.element"]
