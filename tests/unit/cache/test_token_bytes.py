"""Compact teacher caches (``--derive-text``): shards stored without ``text`` and ``offsets`` read back exactly
as full ones — byte-level and SentencePiece (dummy prefix) tokenizers, truncated rows, the bad-input documents —
are smaller, and a row or a token-bytes file that does not fit is refused, naming the file or the document."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alm_pipeline.cache import store
from alm_pipeline.cache.arrow import ragged_list_array
from alm_pipeline.cache.teacher import CACHE_SCHEMA, TeacherCache
from alm_pipeline.cache.token_bytes import TOKEN_BYTES_FILE, write_token_bytes
from tests import factories


def _full_rows(view, texts: list[str], max_length: int) -> pa.Table:
    """Cache rows as the teacher-cache stage builds them (ℓ and σ: arbitrary non-positive values)."""
    encoded = []
    for t in texts:
        try:
            encoded.append(view.encode(view.normalize_text(t), max_length=max_length))
        except ValueError:  # a document this tokenizer refuses never reaches a cache
            continue
    rng = np.random.default_rng(0)
    n = [len(e.token_ids) for e in encoded]
    return pa.Table.from_arrays(
        [
            pa.array([f"d{i}" for i in range(len(encoded))]),
            pa.array([e.text for e in encoded]),
            ragged_list_array([e.token_ids for e in encoded], pa.int32()),
            ragged_list_array([e.offsets for e in encoded], pa.int32()),
            ragged_list_array([-rng.random(k).astype(np.float32) for k in n], pa.float32()),
            ragged_list_array([-rng.random(k).astype(np.float32) for k in n], pa.float32()),
            pa.array([e.truncated for e in encoded]),
        ],
        schema=CACHE_SCHEMA,
    )


def _texts() -> list[str]:
    docs = [d["text"] for d in factories.BAD_INPUT_DOCS if len(d["text"]) < 5000]
    return docs + factories.corpus_texts(12, max_chars=400)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_compact_shard_reads_back_exactly_as_the_full_one(views, tmp_path, kind, dtype):
    view = views[kind]
    table = _full_rows(view, _texts(), max_length=48)
    truncated = np.asarray(table["truncated"])
    assert truncated.any() and not truncated.all()  # both cases occur
    joined = [
        int(view.token_lengths[np.asarray(ids, dtype=np.int64)].sum())
        for ids in table["token_ids"].to_pylist()
    ]
    text_bytes = [len(t.encode()) for t in table["text"].to_pylist()]
    if kind == "sentencepiece":  # the dummy-prefix space: in the tokens' bytes, not in the text
        assert any(j == b + 1 for j, b in zip(joined, text_bytes, strict=True))
    else:
        assert any(j == b > 0 for j, b in zip(joined, text_bytes, strict=True))

    full_dir, compact_dir = tmp_path / "full", tmp_path / "compact"
    full = TeacherCache.write_shard(full_dir, 0, table, stats={}, logprob_dtype=dtype)
    write_token_bytes(compact_dir, view.token_bytes)
    compact = TeacherCache.write_shard(compact_dir, 0, table, stats={}, logprob_dtype=dtype, derive_text=True)

    stored = pq.read_schema(compact_dir / compact.file).names
    assert "text" not in stored and "offsets" not in stored and "text_bytes" in stored
    assert compact.bytes < full.bytes and compact.tokens == full.tokens
    want = TeacherCache.read_shard_entry(full_dir, full)
    got = TeacherCache.read_shard_entry(compact_dir, compact)
    assert got.equals(want)
    # a reader asking for some columns gets those, in its order
    part = TeacherCache.read_shard_entry(compact_dir, compact, columns=["offsets", "doc_id", "text"])
    assert part.column_names == ["offsets", "doc_id", "text"]
    assert part.equals(want.select(["offsets", "doc_id", "text"]))
    assert TeacherCache.read_shard_entry(compact_dir, compact, columns=["logprob"]).num_columns == 1


def test_a_row_whose_text_does_not_follow_from_its_tokens_is_refused(views, tmp_path):
    view = views["byte_level"]
    table = _full_rows(view, factories.corpus_texts(4), max_length=64)
    texts = table["text"].to_pylist()
    texts[2] = texts[2].replace("e", "E", 1)  # same length, other bytes
    table = table.set_column(1, "text", pa.array(texts))
    write_token_bytes(tmp_path, view.token_bytes)
    with pytest.raises(ValueError, match=r"document 'd2': its text does not follow from its token ids"):
        TeacherCache.write_shard(tmp_path, 0, table, stats={}, derive_text=True)
    assert not store.shard_path(tmp_path, 0).exists()  # nothing written


def test_token_bytes_of_another_tokenizer_or_none_are_refused_naming_the_file(views, tmp_path):
    view = views["byte_level"]
    table = _full_rows(view, factories.corpus_texts(6), max_length=64)
    write_token_bytes(tmp_path, view.token_bytes)
    info = TeacherCache.write_shard(tmp_path, 0, table, stats={}, derive_text=True)
    shard = str(store.shard_path(tmp_path, 0))
    # another vocabulary: every token one byte longer → the tokens cover more bytes than the text has
    write_token_bytes(tmp_path, [b + b"x" for b in view.token_bytes])
    with pytest.raises(store.CacheIntegrityError, match=rf"{shard}: row 0: its tokens cover"):
        TeacherCache.read_shard_entry(tmp_path, info)
    (tmp_path / TOKEN_BYTES_FILE).unlink()
    with pytest.raises(store.CacheIntegrityError, match=rf"{TOKEN_BYTES_FILE}: missing"):
        TeacherCache.read_shard_entry(tmp_path, info, columns=["text"])
    # columns that need no derivation are read without the token bytes
    assert TeacherCache.read_shard_entry(tmp_path, info, columns=["doc_id", "token_ids"]).num_rows == 6
