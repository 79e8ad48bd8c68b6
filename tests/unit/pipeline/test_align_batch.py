"""The batched alignment (alm_pipeline.pipeline.align_batch: align_batch / merge_batch / coverage_batch) equals
the per-document path (align_document / merge_and_debias / coverage_stats), field by field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alm_pipeline.pipeline.align import (
    Alignment,
    CoverageStats,
    MergedChunks,
    align_document,
    coverage_stats,
    merge_and_debias,
)
from alm_pipeline.pipeline.align_batch import align_batch, coverage_batch, merge_batch
from alm_pipeline.pipeline.byteview import TokenizerMismatchError
from tests.factories import four_chunks, random_scores
from tests.strategies import CHAR_TEXT, FAST, GENERAL_TEXT, MAX_LENGTH

ALIGNMENT_FIELDS = [f.name for f in dataclasses.fields(Alignment)]


MERGED_FIELDS = [f.name for f in dataclasses.fields(MergedChunks)]


def assert_same(got, want, names) -> None:
    for name in names:
        g, w = getattr(got, name), getattr(want, name)
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype, name
            np.testing.assert_array_equal(g, w, err_msg=name, strict=True)
        else:
            assert g == w and type(g) is type(w), name


def flat(arrays, dtype):
    rows = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=rows[1:])
    values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return values, rows


def check_batch_equals_documents(docs, gamma) -> None:
    """``docs``: per document (teacher ids, offsets, special, student ids, offsets, special, logprob, σ,
    text bytes)."""
    columns = list(zip(*docs, strict=True)) if docs else [[]] * 9
    t_ids, t_rows = flat(columns[0], np.int32)
    t_off, _ = flat(columns[1], np.int32)
    t_sp, _ = flat(columns[2], bool)
    s_ids, s_rows = flat(columns[3], np.int32)
    s_off, _ = flat(columns[4], np.int32)
    s_sp, _ = flat(columns[5], bool)
    logprob, _ = flat(columns[6], np.float32)
    sigma, _ = flat(columns[7], np.float32)
    batch = align_batch(t_ids, t_off, t_sp, t_rows, s_ids, s_off, s_sp, s_rows)
    merged = merge_batch(batch, logprob, sigma, gamma=gamma)
    assert batch.num_documents == merged.num_documents == len(docs)
    total = CoverageStats()
    for d, doc in enumerate(docs):
        a = align_document(*doc[:6])
        assert_same(batch.document(d), a, ALIGNMENT_FIELDS)
        m = merge_and_debias(a, doc[6], doc[7], gamma=gamma)
        assert_same(merged.document(d), m, MERGED_FIELDS)
        total.add(coverage_stats(a, m, doc[8]))
    assert coverage_batch(batch, merged, [doc[8] for doc in docs]) == total
    assert batch.num_chunks == sum(batch.document(d).num_chunks for d in range(len(docs)))
    for name in ("teacher_chunk_id", "student_chunk_id"):  # the flat per-token ids
        per_doc = [getattr(batch.document(d), name) for d in range(len(docs))]
        want = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=np.int32)
        np.testing.assert_array_equal(getattr(batch, name), want, strict=True)
    assert merged.num_groups == len(merged.chunk_start) == int(merged.groups_per_document().sum())


@pytest.mark.parametrize(
    ("teacher", "student"),
    [("sentencepiece", "bytes"), ("byte_level", "sentencepiece"), ("bytes", "byte_level_small"),
     ("char", "byte_level"), ("byte_level_small", "char")],
)  # fmt: skip
@FAST
@given(data=st.data(), max_t=MAX_LENGTH, max_s=MAX_LENGTH, seed=st.integers(0, 2**32 - 1))
def test_align_batch_equals_align_document(views, teacher, student, data, max_t, max_s, seed):
    texts = data.draw(
        st.lists(CHAR_TEXT if "char" in (teacher, student) else GENERAL_TEXT, max_size=6), label="texts"
    )
    vt, vs = views[teacher], views[student]
    rng = np.random.default_rng(seed)
    docs = []
    for text in texts:
        try:
            et, es = vt.encode(text, max_length=max_t), vs.encode(text, max_length=max_s)
        except TokenizerMismatchError:
            continue  # the char tokenizer: unknown characters
        if rng.random() < 0.2:  # EOS on one or both sides
            et = dataclasses.replace(
                et,
                token_ids=np.append(et.token_ids, vt.eos_id),
                offsets=np.append(et.offsets, et.offsets[-1] if len(et.offsets) else 0),
            )
            if rng.random() < 0.5:
                es = dataclasses.replace(
                    es,
                    token_ids=np.append(es.token_ids, vs.eos_id),
                    offsets=np.append(es.offsets, es.offsets[-1] if len(es.offsets) else 0),
                )
        logprob, sigma = random_scores(rng, len(et.token_ids))
        docs.append(
            (
                et.token_ids,
                et.offsets,
                vt.is_special[et.token_ids],
                es.token_ids,
                es.offsets,
                vs.is_special[es.token_ids],
                logprob,
                sigma,
                len(text.encode("utf-8")),
            )
        )
    check_batch_equals_documents(docs, gamma=float(rng.choice([0.0, 0.1, 0.5])))


@st.composite
def synthetic_side(draw, n_bytes: int):
    """Token end offsets covering [0, k] for some k <= n_bytes, with zero-byte tokens (special or not) at
    random places - including orders no real tokenizer produces."""
    covered = draw(st.integers(0, n_bytes))
    cuts = sorted(draw(st.sets(st.integers(1, max(covered - 1, 1)), max_size=12))) if covered > 1 else []
    ends = [c for c in cuts if c < covered] + ([covered] if covered else [])
    offsets, special = [], []
    for end in [0, *ends]:
        for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):  # zero-byte tokens
            offsets.append(offsets[-1] if offsets else 0)
            special.append(draw(st.booleans()))
        if end:
            offsets.append(end)
            special.append(draw(st.integers(0, 20)) == 0)  # a "special" token covering bytes: ordinary
    return np.array(offsets, dtype=np.int32), np.array(special, dtype=bool)


@st.composite
def synthetic_document(draw):
    n_bytes = draw(st.one_of(st.integers(0, 30), st.sampled_from([10**6, 3 * 10**8])))
    if n_bytes > 30:  # a huge byte range with few tokens: the binary-search path of the common boundaries
        t_off = np.array([0, 5, n_bytes - 7, n_bytes], dtype=np.int32)
        s_off = np.array([5, n_bytes // 2, n_bytes], dtype=np.int32)
        return t_off, np.array([True, False, False, False]), s_off, np.zeros(3, dtype=bool), n_bytes
    t_off, t_sp = draw(synthetic_side(n_bytes))
    s_off, s_sp = draw(synthetic_side(n_bytes))
    return t_off, t_sp, s_off, s_sp, n_bytes + draw(st.integers(0, 3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(synthetic_document(), max_size=8), seed=st.integers(0, 2**32 - 1))
def test_align_batch_equals_align_document_synthetic(docs, seed):
    rng = np.random.default_rng(seed)
    full = []
    for t_off, t_sp, s_off, s_sp, n_bytes in docs:
        logprob, sigma = random_scores(rng, len(t_off))
        t_ids = rng.integers(0, 100, len(t_off))
        s_ids = rng.integers(0, 100, len(s_off))
        full.append((t_ids, t_off, t_sp, s_ids, s_off, s_sp, logprob, sigma, n_bytes))
    check_batch_equals_documents(full, gamma=float(rng.choice([0.0, 0.1, 0.5, 1.0])))


def test_align_batch_of_no_documents_and_of_empty_documents():
    batch = align_batch([], [], np.zeros(0, bool), [0], [], [], np.zeros(0, bool), [0])
    assert batch.num_documents == 0 and batch.num_chunks == 0
    merged = merge_batch(batch, [], [])
    assert merged.num_groups == 0 and merged.group_rows.tolist() == [0]
    assert coverage_batch(batch, merged, []) == CoverageStats()
    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool))
    check_batch_equals_documents([(*empty, *empty, np.zeros(0), np.zeros(0), 0)] * 3, gamma=0.1)


def test_align_batch_errors_name_the_document():
    ok = ([1, 2], [1, 2], [False, False])
    with pytest.raises(
        ValueError, match=r"student_offsets are not non-decreasing: position 1 .* \(document 1\)"
    ):
        align_batch(*ok, [0, 1, 2], [1, 2, 3], [1, 3, 2], [False] * 3, [0, 1, 3])
    with pytest.raises(ValueError, match=r"teacher_offsets must be >= 0.*\(document 1\)"):
        align_batch([1, 2], [1, -1], [False, False], [0, 1, 2], *ok, [0, 1, 2])
    with pytest.raises(ValueError, match="teacher_rows has 1 documents but student_rows has 2"):
        align_batch(*ok, [0, 2], *ok, [0, 1, 2])
    with pytest.raises(ValueError, match="student_rows must start at 0"):
        align_batch(*ok, [0, 2], *ok, [0, 1])
    # the step from one document's last offset to the next document's first is not a decrease
    batch = align_batch([1, 2], [5, 1], [False, False], [0, 1, 2], [1, 2], [5, 1], [False, False], [0, 1, 2])
    assert batch.byte_end.tolist() == [5, 1] and batch.chunk_rows.tolist() == [0, 1, 2]
    a, logprob, sigma = four_chunks()
    batch = align_batch(
        [1, 10, 11, 12, 13] * 2,
        [0, 2, 3, 5, 7] * 2,
        [True, False, False, False, False] * 2,
        [0, 5, 10],
        ([1] + list(range(97, 104))) * 2,
        list(range(8)) * 2,
        ([True] + [False] * 7) * 2,
        [0, 8, 16],
    )
    bad = np.concatenate([logprob, logprob])
    bad[8] = np.nan
    with pytest.raises(
        ValueError, match=r"teacher_logprob is NaN at position 3, inside aligned chunk 3 \(document 1\)"
    ):
        merge_batch(batch, bad, np.concatenate([sigma, sigma]))
    with pytest.raises(ValueError, match=r"\(document second\)"):
        merge_batch(batch, bad, np.concatenate([sigma, sigma]), document_names=["first", "second"])
    with pytest.raises(ValueError, match="gamma"):
        merge_batch(batch, bad, bad, gamma=2.0)


def test_groups_never_cross_documents():
    # document 0's last valid chunk ends at teacher / student token 3, document 1's first valid chunk starts
    # at teacher / student token 3 (its first chunk is invalid), and γ = 1 flags nothing: the two chunks
    # look adjacent by their document-local indices but stay in separate groups
    doc0 = ([1, 2, 3], [0, 1, 2], [True, False, False], [1, 2, 3], [0, 1, 2], [True, False, False])
    doc1 = ([4, 9, 5, 6], [1, 1, 2, 3], [False, True, False, False], [1, 7, 8, 9], [0, 0, 2, 3])
    doc1 += ([True, False, False, False],)
    docs = [
        (*doc, *random_scores(np.random.default_rng(k), len(doc[0])), 3) for k, doc in enumerate([doc0, doc1])
    ]
    check_batch_equals_documents(docs, gamma=1.0)
    a0, a1 = align_document(*doc0), align_document(*doc1)
    assert (a0.teacher_end[-1], a0.student_end[-1]) == (3, 3) and a0.valid[-1]
    assert (a1.teacher_start[1], a1.student_start[1]) == (3, 3) and a1.valid.tolist() == [False, True]
