"""Training data per worker: the index of an aligned set, the block-wise batch plan, and the reader that fetches
only the row groups holding a worker's documents (local and on a real S3 server)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alm_pipeline.cache.aligned import INDEX_COLUMNS, open_aligned_set
from alm_pipeline.trainer.data import BatchPlan
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.index import index_aligned_set
from alm_pipeline.trainer.reader import BlockReader, Prefetcher
from alm_pipeline.trainer.runtime import read_aligned_rows
from tests import factories

ROW_GROUP = 3  # documents per row group of the test set: 24 documents → 8 row groups over 2 shards


@pytest.fixture(scope="module")
def grouped_aligned(tmp_path_factory, gpt2_bl_model, teacher_table, tokenizer_dirs):
    return factories.write_aligned_set(
        tmp_path_factory.mktemp("aligned_groups"),
        gpt2_bl_model,
        str(tokenizer_dirs["byte_level_small"]),
        teacher_table,
        row_group_size=ROW_GROUP,
    )


def _files(root) -> list[str]:
    return [str(f) for f in open_aligned_set(root).shard_files()]


def test_index_holds_the_trainable_documents_with_their_sizes(grouped_aligned, tmp_path):
    files = _files(grouped_aligned)
    assert pq.ParquetFile(files[0]).metadata.num_row_groups > 1  # the case under test: several row groups
    index = index_aligned_set(files, need_groups=True)
    rows, dropped = read_aligned_rows(files).select_trainable(need_groups=True)
    assert index.num_docs == rows.num_docs and index.dropped == dropped
    np.testing.assert_array_equal(index.length, rows.lengths)
    np.testing.assert_array_equal(index.chunks, rows.num_groups)
    assert index.nbytes == 16 * index.num_docs
    assert index.num_blocks == sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    # a set written before the per-document columns existed: the same index from the list lengths
    old = []
    for k, f in enumerate(files):
        table = pq.read_table(f)
        old.append(str(tmp_path / f"old-{k}.parquet"))
        pq.write_table(table.drop_columns(INDEX_COLUMNS), old[-1], row_group_size=ROW_GROUP)
    again = index_aligned_set(old, need_groups=True)
    np.testing.assert_array_equal(again.length, index.length)
    np.testing.assert_array_equal(again.block, index.block)
    # the documents filtered on the index: fewer than 2 tokens, or no chunk when the ALM loss is alone
    short = pq.read_table(files[0])
    cut = short.set_column(
        short.schema.get_field_index("num_tokens"), "num_tokens", pa.array([1] * short.num_rows, pa.int32())
    )
    pq.write_table(cut, tmp_path / "short.parquet")
    few = index_aligned_set([str(tmp_path / "short.parquet"), files[1]], need_groups=False)
    assert few.dropped["too_short"] == short.num_rows and few.num_docs == pq.read_metadata(files[1]).num_rows


def test_block_plan_is_exact_on_resume_and_reads_few_blocks():
    blocks = np.repeat(np.arange(50), 20)  # 1000 documents in 50 row groups of 20
    plan = BatchPlan(1000, batch_size=16, seed=7, blocks=blocks, window=40)
    steps = [plan.global_batch(s) for s in range(130)]  # a bit more than two epochs
    first, second = np.concatenate(steps)[:1000], np.concatenate(steps)[1000:2000]
    assert sorted(first.tolist()) == list(range(1000)) and sorted(second.tolist()) == list(range(1000))
    assert not np.array_equal(first, second)
    # a fresh plan (a resumed run) gives the same batches from any step on
    again = BatchPlan(1000, batch_size=16, seed=7, blocks=blocks, window=40)
    for s in (129, 3, 64):
        assert np.array_equal(again.global_batch(s), steps[s])
    # a window of 40 documents spans at most 3 row groups of 20: so does a step of 16 within one window
    per_step = [len(np.unique(blocks[b])) for b in steps[:62]]
    assert max(per_step) <= 4 and np.mean(per_step) < 3
    # a plain permutation touches almost every block per step
    plain = BatchPlan(1000, batch_size=16, seed=7)
    assert np.mean([len(np.unique(blocks[plain.global_batch(s)])) for s in range(62)]) > 10
    # the documents are shuffled inside row groups too, and the seed matters
    assert not np.array_equal(np.sort(steps[0]), steps[0])
    other = BatchPlan(1000, batch_size=16, seed=8, blocks=blocks, window=40)
    assert not np.array_equal(other.global_batch(0), steps[0])
    with pytest.raises(ValueError, match="grouped by block"):
        BatchPlan(3, 1, blocks=np.array([1, 0, 1]))


def test_a_worker_reads_only_the_row_groups_of_its_documents(grouped_aligned):
    files = _files(grouped_aligned)
    index = index_aligned_set(files, need_groups=True)
    everything, _ = read_aligned_rows(files).select_trainable(need_groups=True)
    plan = BatchPlan(index.num_docs, batch_size=4, seed=0, blocks=index.block, window=4)
    for rank in range(2):
        reader = BlockReader(index, cache_bytes=1)  # keeps almost nothing beyond the step's own blocks
        for step in range(3):
            mine = plan.worker_slices(plan.global_batch(step), 2)[rank]
            rows = reader.rows(mine)
            got = everything.take(mine)
            assert rows.doc_ids.tolist() == got.doc_ids.tolist()
            np.testing.assert_array_equal(rows.ids, got.ids)
            np.testing.assert_array_equal(rows.grp_logprob, got.grp_logprob)
        # (file, row group) of every read: only those holding this worker's documents
        wanted = {
            (int(index.block_file[b]), int(index.block_rg[b]))
            for step in range(3)
            for b in index.block[plan.worker_slices(plan.global_batch(step), 2)[rank]]
        }
        assert set(reader.reads) == wanted
        assert len(wanted) < index.num_blocks  # the case under test: the worker leaves most row groups alone
        reader.close()
    # with room for them, a block read once is kept (no second read for the next step's documents)
    reader = BlockReader(index)
    reader.rows(np.arange(index.num_docs))
    reader.rows(np.arange(index.num_docs)[::-1])
    assert len(reader.reads) == index.num_blocks


def test_reader_refuses_a_shard_that_changed_and_names_it(grouped_aligned, tmp_path):
    files = _files(grouped_aligned)
    index = index_aligned_set(files, need_groups=True)
    table = pq.read_table(files[0])
    moved = str(tmp_path / "changed.parquet")
    pq.write_table(table.slice(1), moved, row_group_size=ROW_GROUP)  # one document less: rows shift
    index.files[0] = moved
    with pytest.raises(TrainingError, match="changed while training.*changed.parquet"):
        BlockReader(index).rows(np.arange(3))


def test_index_and_reader_on_s3(grouped_aligned, s3_bucket):
    """The same index and documents from the shards copied to a bucket (pyarrow's S3 filesystem)."""
    from alm_pipeline.storage import location

    files = _files(grouped_aligned)
    uris = []
    for k, f in enumerate(files):
        loc = location(f"{s3_bucket}/set/shards/shard-{k}.parquet")
        with open(f, "rb") as src:
            loc.write_bytes(src.read())
        uris.append(loc.uri)
    local = index_aligned_set(files, need_groups=True)
    remote = index_aligned_set(uris, need_groups=True)
    np.testing.assert_array_equal(remote.length, local.length)
    np.testing.assert_array_equal(remote.block, local.block)
    docs = np.array([5, 0, 17])
    reader = BlockReader(remote)
    assert reader.rows(docs).doc_ids.tolist() == BlockReader(local).rows(docs).doc_ids.tolist()
    assert len(reader.reads) == len(np.unique(remote.block[docs]))


def test_prefetcher_runs_ahead_in_order_and_passes_errors_on():
    fetched: list[int] = []

    def fetch(step: int) -> int:
        fetched.append(step)
        if step == 6:
            raise ValueError("bad block at step 6")
        return step * 10

    pre = Prefetcher(fetch, range(3, 9), ahead=2)
    time.sleep(0.3)
    assert fetched == [3, 4, 5]  # two waiting in the queue, the third blocked on putting it
    assert [pre.get(s) for s in (3, 4, 5)] == [30, 40, 50]
    with pytest.raises(ValueError, match="step 6"):
        pre.get(6)
    pre.close()


def test_stream_reader_aligns_only_the_cache_shards_of_its_documents(
    gpt2_bl_model, teacher_table, tokenizer_dirs, tmp_path
):
    """train --cache: a worker aligns only the cache shards holding its documents; the documents it gets equal
    those of the set aligned ahead of time, and the untrainable ones are skipped and counted."""
    from alm_pipeline.pipeline.align_stage import AlignSettings, align_table
    from alm_pipeline.pipeline.byteview import load_byte_view
    from alm_pipeline.trainer.index import index_cache
    from alm_pipeline.trainer.reader import CacheBlockReader

    teacher = load_byte_view(gpt2_bl_model)
    student = load_byte_view(str(tokenizer_dirs["byte_level_small"]))
    # 4 cache shards of 6 documents; the first document of shard 1 has an empty text (untrainable)
    files = []
    for k in range(4):
        part = teacher_table.slice(6 * k, 6)
        if k == 1:  # an empty document: no token, no chunk
            for c, name in enumerate(part.column_names):
                if name != "doc_id":
                    values = part[name].to_pylist()
                    empty = "" if name == "text" else []
                    part = part.set_column(
                        c, name, pa.array([empty, *values[1:]], part.schema.field(name).type)
                    )
        files.append(str(tmp_path / f"cache-{k}.parquet"))
        pq.write_table(part, files[-1])
    index = index_cache(files, [6, 6, 6, 6])
    assert not index.sizes_known and index.num_blocks == 4

    def align(table):
        return align_table(table, teacher.is_special, student, AlignSettings())

    reader = CacheBlockReader(index, align, need_groups=True)
    rows = reader.rows(np.array([8, 6, 7, 20]))  # shard 1 (document 6: the empty one) and shard 3
    assert sorted(set(reader.reads)) == [(1, 0), (3, 0)]
    assert reader.skipped == 1 and rows.num_docs == 3
    assert rows.doc_ids.tolist() == ["doc0008", "doc0007", "doc0020"]
    ahead = read_aligned_rows([_aligned_file(align(pq.read_table(files[1])), tmp_path / "a1.parquet")])
    np.testing.assert_array_equal(rows.input_ids(0), ahead.input_ids(ahead.doc_ids.tolist().index("doc0008")))


def _aligned_file(table, path) -> str:
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize(
    ("dtype", "derive_text"), [("float16", False), ("bfloat16", False), ("bfloat16", True)]
)
def test_stream_reader_reads_compact_caches_as_full_ones(
    gpt2_bl_model, teacher_table, tokenizer_dirs, tmp_path, dtype, derive_text
):
    """train --cache on a cache written with --logprob-dtype float16/bfloat16 (and --derive-text): the aligned
    chunk log-probs equal those of the same rows rounded to 16 bits and read back as fp32 (bfloat16 is stored as
    its raw uint16 bits, which must never reach the alignment as numbers; a compact cache's text is derived)."""
    from alm_pipeline.cache.teacher import TeacherCache, decode_logprobs, encode_logprobs
    from alm_pipeline.pipeline.align_stage import AlignSettings, align_table
    from alm_pipeline.pipeline.byteview import load_byte_view
    from alm_pipeline.trainer.index import index_cache
    from alm_pipeline.trainer.reader import CacheBlockReader

    teacher = load_byte_view(gpt2_bl_model)
    student = load_byte_view(str(tokenizer_dirs["byte_level_small"]))
    table = teacher_table.slice(0, 6)
    if "truncated" not in table.column_names:
        table = table.append_column("truncated", pa.array([False] * 6))
    if derive_text:
        from alm_pipeline.cache.token_bytes import write_token_bytes

        write_token_bytes(tmp_path, teacher.token_bytes)
    info = TeacherCache.write_shard(
        tmp_path, 0, table, stats={}, logprob_dtype=dtype, derive_text=derive_text
    )
    assert ("text" in pq.read_schema(tmp_path / info.file).names) != derive_text
    stored = pq.read_schema(tmp_path / info.file).field("logprob").type.value_type
    assert not pa.types.is_float32(stored)  # the case under test: 16-bit values on disk

    def align(t):
        return align_table(t, teacher.is_special, student, AlignSettings())

    reader = CacheBlockReader(index_cache([str(tmp_path / info.file)], [6]), align, need_groups=True)
    rows = reader.rows(np.arange(6))
    expected = read_aligned_rows(
        [_aligned_file(align(decode_logprobs(encode_logprobs(table, dtype))), tmp_path / "ref.parquet")]
    )
    assert rows.num_docs == expected.num_docs > 0
    assert rows.doc_ids.tolist() == expected.doc_ids.tolist()
    assert np.all(rows.grp_logprob <= 0) and np.all(rows.grp_boundary <= 0)
    np.testing.assert_allclose(rows.grp_logprob, expected.grp_logprob, rtol=1e-6)
    np.testing.assert_allclose(rows.grp_boundary, expected.grp_boundary, rtol=1e-6)
