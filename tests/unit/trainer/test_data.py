"""Training data (alm_pipeline.trainer.data): the batch plan and packed micro-batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alm_pipeline.trainer.data import AlignedRows, BatchPlan, build_micro_batch, plan_micro_batches


def test_batch_plan_is_deterministic_and_covers_epochs():
    plan = BatchPlan(num_docs=10, batch_size=4, seed=3)
    again = BatchPlan(num_docs=10, batch_size=4, seed=3)
    seen = np.concatenate([plan.global_batch(s) for s in range(5)])  # 20 positions = 2 epochs
    assert all(np.array_equal(plan.global_batch(s), again.global_batch(s)) for s in range(5))
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation per epoch
    assert plan.position(3) == {"epoch": 1, "index_in_epoch": 2, "seed": 3}
    # worker slices partition the global batch whatever the number of workers
    b = plan.global_batch(2)
    for w in (1, 2, 3):
        assert np.array_equal(np.concatenate(plan.worker_slices(b, w)), b)
    assert not np.array_equal(BatchPlan(10, 4, seed=4).global_batch(0), plan.global_batch(0))


def _chunks(lengths: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    starts = [np.array([1, 3], dtype=np.int32) if n > 3 else np.array([1], dtype=np.int32) for n in lengths]
    ends = [np.minimum(s + 1, n - 1).astype(np.int32) for s, n in zip(starts, lengths, strict=True)]
    return starts, ends


def _rows(lengths: list[int]) -> AlignedRows:
    ids = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate(lengths)]
    starts, ends = _chunks(lengths)
    table = pa.table(
        {
            "doc_id": [f"d{i}" for i in range(len(lengths))],
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "chunk_start": pa.array(starts, type=pa.list_(pa.int32())),
            "chunk_end": pa.array(ends, type=pa.list_(pa.int32())),
            "teacher_chunk_logprob": pa.array(
                [-np.ones(len(s), np.float32) for s in starts], type=pa.list_(pa.float32())
            ),
            "teacher_chunk_boundary_logprob": pa.array(
                [-0.5 * np.ones(len(s), np.float32) for s in starts], type=pa.list_(pa.float32())
            ),
        }
    )
    return AlignedRows.from_table(table)


def test_micro_batches_pack_without_crossing_and_respect_budget():
    lengths = [9, 3, 5, 2, 7, 4]
    rows = _rows(lengths)
    starts, ends = _chunks(lengths)
    docs = np.arange(6)
    packed = plan_micro_batches(rows.lengths, max_tokens=20, packing=True)
    flat = sorted(p for mb in packed for row in mb for p in row)
    assert flat == list(range(6))  # every document exactly once
    assert any(len(row) >= 2 for mb in packed for row in mb)  # rows really hold several documents
    for mb_layout in packed:
        mb = build_micro_batch(rows, docs, mb_layout)
        assert mb.padded_tokens <= 20 or len(mb_layout) == 1
        # every document's tokens, positions restarting at 0, groups shifted to the packed columns
        expected_groups = []
        for r, row in enumerate(mb_layout):
            col = 0
            for p in row:
                n = int(rows.lengths[p])
                assert mb.input_ids[r, col : col + n].tolist() == rows.input_ids(p).tolist()
                assert mb.position_ids[r, col : col + n].tolist() == list(range(n))
                assert bool(mb.doc_start[r, col]) and not mb.doc_start[r, col + 1 : col + n].any()
                expected_groups += [(r, col + a, col + b) for a, b in zip(starts[p], ends[p], strict=True)]
                col += n
            assert not mb.attention_mask[r, col:].any()
        g = mb.groups
        got = zip(g.batch_index.tolist(), g.start.tolist(), g.end.tolist(), strict=True)
        assert sorted(got) == sorted(expected_groups)
    # packing needs fewer padded tokens than one document per row
    bucketed = plan_micro_batches(rows.lengths, max_tokens=20, packing=False)
    pad = lambda plan: sum(build_micro_batch(rows, docs, mb).padded_tokens for mb in plan)  # noqa: E731
    assert pad(packed) < pad(bucketed)
    assert all(len(row) == 1 for mb in bucketed for row in mb)


def test_aligned_rows_validation_names_the_document():
    rows = _rows([5, 4])
    table = pa.table(
        {
            "doc_id": ["ok", "bad"],
            "input_ids": pa.array([rows.input_ids(0), rows.input_ids(1)], type=pa.list_(pa.int32())),
            "chunk_start": pa.array([[1], [2]], type=pa.list_(pa.int32())),
            "chunk_end": pa.array([[2], [4]], type=pa.list_(pa.int32())),  # 4 >= length 4
            "teacher_chunk_logprob": pa.array([[-1.0], [-1.0]], type=pa.list_(pa.float32())),
            "teacher_chunk_boundary_logprob": pa.array([[-1.0], [-1.0]], type=pa.list_(pa.float32())),
        }
    )
    with pytest.raises(ValueError, match=r"document 'bad'.*ends after the document"):
        AlignedRows.from_table(table)


def test_workers_take_few_blocks_each_so_each_reads_a_part_of_the_set():
    """Block-wise plan, window of 16 blocks, 4 workers: over an epoch each worker gets the documents of about
    half of the blocks when the global batch is split by block (a quarter is the ideal; which blocks fall to a
    worker shifts a little from step to step), against nearly all of them when it is split by position."""
    blocks = np.repeat(np.arange(64), 16)  # 1024 documents in 64 row groups of 16
    plan = BatchPlan(1024, batch_size=32, seed=1, blocks=blocks, window=256)
    by_block = [set() for _ in range(4)]
    by_position = [set() for _ in range(4)]
    for step in range(32):  # one epoch
        batch = plan.global_batch(step)
        for r, part in enumerate(plan.worker_slices(batch, 4)):
            by_block[r] |= set(blocks[part].tolist())
        for r, part in enumerate(np.array_split(batch, 4)):
            by_position[r] |= set(blocks[part].tolist())
        assert sorted(np.concatenate(plan.worker_slices(batch, 4)).tolist()) == sorted(batch.tolist())
    assert max(len(s) for s in by_block) <= 36
    assert (
        min(len(s) for s in by_position) >= 60
    )  # splitting by position: nearly every block for every worker
