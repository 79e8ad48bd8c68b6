"""Chunk alignment, γ-merging and debiasing (alm_pipeline.pipeline.align), on real tiny tokenizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from alm_pipeline.pipeline.align import (
    CoverageStats,
    align_document,
    align_with_views,
    coverage_stats,
    merge_and_debias,
)
from alm_pipeline.pipeline.byteview import TokenizerMismatchError
from tests.align_checks import check_alignment, check_merged
from tests.factories import four_chunks
from tests.strategies import CHAR_TEXT, FAST, GENERAL_TEXT, MAX_LENGTH

KINDS = ["byte_level", "byte_level_small", "sentencepiece", "bytes", "char"]
PAIRS = [(t, s) for t in KINDS for s in KINDS]


def encode(view, text, max_length=None):
    try:
        return view.encode(text, max_length=max_length)
    except TokenizerMismatchError:
        if view.kind == "plain":  # the char tokenizer: unknown characters
            reject()
        raise


# --------------------------------------------------------------------------------------------------------
# Property-based tests on real tokenizers


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
@FAST
@given(data=st.data(), max_t=MAX_LENGTH, max_s=MAX_LENGTH, seed=st.integers(0, 2**32 - 1))
def test_alignment_properties(views, teacher, student, data, max_t, max_s, seed):
    text = data.draw(CHAR_TEXT if "char" in (teacher, student) else GENERAL_TEXT, label="text")
    vt, vs = views[teacher], views[student]
    et, es = encode(vt, text, max_t), encode(vs, text, max_s)
    a = align_with_views(et.token_ids, et.offsets, vt, es.token_ids, es.offsets, vs)
    check_alignment(text, vt, et, vs, es, a)

    if student == "bytes":  # every teacher token boundary (within the aligned bytes) is a chunk end
        teacher_ends = {e for e in et.offsets.tolist() if 0 < e <= a.aligned_bytes}
        assert teacher_ends == set(a.byte_end[~a.is_special].tolist())

    rng = np.random.default_rng(seed)
    n = len(et.token_ids)
    logprob = -rng.exponential(2.0, n).astype(np.float32)
    logprob[rng.random(n) < 0.05] = 1e-7  # tiny positive log-probs (rounding) must be clipped per chunk
    if n:
        logprob[0] = np.nan
    sigma = np.log(rng.choice([0.9, 0.3, 0.11, 0.09, 0.01, 1e-5], n)).astype(np.float32)
    gamma = float(rng.choice([0.0, 0.1, 0.5]))
    m = merge_and_debias(a, logprob, sigma, gamma=gamma)
    check_merged(a, m, logprob, sigma, gamma)

    stats = coverage_stats(a, m, len(text.encode("utf-8")))
    assert stats.covered_bytes <= stats.text_bytes
    assert (~a.valid).sum() <= 1  # at most the chunk holding position 0 (or the BOS chunk)
    if not et.truncated and not es.truncated:
        lost = int((a.byte_end - a.byte_start)[~a.valid].sum())
        assert stats.covered_bytes == len(text.encode("utf-8")) - lost


@pytest.mark.parametrize(("teacher", "student"), [("sentencepiece", "byte_level"), ("byte_level", "bytes")])
@FAST
@given(text=GENERAL_TEXT.filter(lambda t: len(t.encode("utf-8")) > 8), cut=st.integers(2, 12))
def test_truncation_drops_the_unfinished_tail(views, teacher, student, text, cut):
    vt, vs = views[teacher], views[student]
    et, es = encode(vt, text, max_length=cut), encode(vs, text)  # only the teacher is truncated
    a = align_with_views(et.token_ids, et.offsets, vt, es.token_ids, es.offsets, vs)
    check_alignment(text, vt, et, vs, es, a)
    assert a.aligned_bytes <= len(et.text.encode("utf-8"))
    assert (a.student_chunk_id[es.offsets > a.aligned_bytes] == -1).all()


# --------------------------------------------------------------------------------------------------------
# Special tokens, BOS / EOS / dummy prefix


def _align(views, teacher, student, text, eos_t=False, eos_s=False):
    vt, vs = views[teacher], views[student]
    et, es = vt.encode(text), vs.encode(text)
    ids_t, off_t, ids_s, off_s = et.token_ids, et.offsets, es.token_ids, es.offsets
    if eos_t:
        ids_t, off_t = np.append(ids_t, vt.eos_id), np.append(off_t, off_t[-1] if len(off_t) else 0)
    if eos_s:
        ids_s, off_s = np.append(ids_s, vs.eos_id), np.append(off_s, off_s[-1] if len(off_s) else 0)
    return align_with_views(ids_t, off_t, vt, ids_s, off_s, vs), ids_t, ids_s


def test_bos_on_both_sides_pairs_as_an_invalid_special_chunk(views):
    a, ids_t, ids_s = _align(views, "sentencepiece", "bytes", "Hello world")
    assert ids_t[0] == views["sentencepiece"].bos_id and ids_s[0] == views["bytes"].bos_id
    assert a.is_special[0] and not a.valid[0]
    assert (a.teacher_start[0], a.teacher_end[0], a.student_start[0], a.student_end[0]) == (0, 1, 0, 1)
    assert (a.byte_start[0], a.byte_end[0]) == (0, 0)
    # the SentencePiece dummy prefix '▁' (zero bytes) goes with the first byte: [▁, H] ↔ [H], valid
    assert (a.teacher_start[1], a.student_start[1], a.student_end[1]) == (1, 1, 2)
    assert views["sentencepiece"].token_bytes[ids_t[1]] == b" "
    assert a.byte_start[1] == 0 and a.valid[1:].all()
    assert not a.is_special[1:].any()


def test_bos_on_one_side_only_is_dropped(views):
    for teacher, student in [("byte_level", "bytes"), ("bytes", "byte_level")]:
        a, _, _ = _align(views, teacher, student, "Hello world")
        bos_side = a.student_chunk_id if student == "bytes" else a.teacher_chunk_id
        assert bos_side[0] == -1  # the lone BOS is in no chunk
        assert not a.is_special.any()
        # the first chunk holds position 0 of the BOS-less side, which covers bytes: its log-prob is undefined
        assert not a.valid[0] and a.valid[1:].all()
        assert a.byte_start[0] == 0


def test_dummy_prefix_on_one_side_without_bos_on_the_other(views):
    a, ids_t, _ = _align(views, "sentencepiece", "byte_level", "Hello world")
    assert a.teacher_chunk_id[0] == -1  # <s>: the student has no BOS
    assert a.teacher_start[0] == 1 and a.student_start[0] == 0  # dummy '▁' joins the chunk of 'H'
    assert not a.valid[0] and a.valid[1:].all()
    assert not a.is_special.any()
    # same pair the other way round
    a, _, _ = _align(views, "byte_level", "sentencepiece", "Hello world")
    assert a.student_chunk_id[0] == -1 and a.student_start[0] == 1 and not a.valid[0]


def test_dummy_prefix_of_a_text_starting_with_a_space(views):
    # SentencePiece: [<s>, ▁ (dummy, 0 bytes), ▁ (the first space), ▁the] <-> bytes [<bos>, ' ', ' ', t, h, e]
    a, ids_t, _ = _align(views, "sentencepiece", "bytes", "  the")
    assert [views["sentencepiece"].token_bytes[i] for i in ids_t] == [b"", b" ", b" ", b" the"]
    assert (a.teacher_start[1], a.teacher_end[1], a.student_start[1], a.student_end[1]) == (1, 3, 1, 2)
    assert (a.byte_start[1], a.byte_end[1]) == (0, 1)
    assert a.valid[1:].all()


def test_eos_on_both_sides_pairs_and_is_valid(views):
    text = "Hello world"
    a, ids_t, ids_s = _align(views, "sentencepiece", "bytes", text, eos_t=True, eos_s=True)
    n = len(text.encode())
    assert a.is_special[-1] and a.valid[-1]
    assert (a.byte_start[-1], a.byte_end[-1]) == (n, n)
    assert (a.teacher_start[-1], a.teacher_end[-1]) == (len(ids_t) - 1, len(ids_t))
    assert (a.student_start[-1], a.student_end[-1]) == (len(ids_s) - 1, len(ids_s))
    assert a.is_special.sum() == 2  # BOS and EOS
    # EOS without BOS on either side
    a, ids_t, ids_s = _align(views, "byte_level", "char", text, eos_t=True, eos_s=True)
    assert a.is_special.tolist() == [False] * (a.num_chunks - 1) + [True] and a.valid[-1]


def test_eos_on_one_side_only_is_dropped(views):
    a, ids_t, _ = _align(views, "sentencepiece", "bytes", "Hello world", eos_t=True)
    assert a.teacher_chunk_id[-1] == -1 and not a.is_special[-1]
    assert a.aligned_bytes == len(b"Hello world")


def test_eos_pairs_only_when_both_sides_end_at_the_same_byte():
    # teacher truncated at byte 3 and closed with EOS; the student covers 5 bytes and ends with EOS
    a = align_document(
        [1, 10, 11, 2],
        [0, 2, 3, 3],
        [True, False, False, True],
        [5, 6, 7, 9],
        [2, 3, 5, 5],
        [False] * 3 + [True],
    )
    assert not a.is_special.any()
    assert a.teacher_chunk_id.tolist() == [-1, 0, 1, -1]
    assert a.student_chunk_id.tolist() == [0, 1, -1, -1]
    assert a.aligned_bytes == 3


def test_empty_text(views):
    a, _, _ = _align(views, "sentencepiece", "bytes", "")
    assert a.num_chunks == 1 and a.is_special[0] and not a.valid[0]
    m = merge_and_debias(a, [np.nan], [-0.5])
    assert m.num_groups == 0
    assert coverage_stats(a, m, 0).coverage == 1.0
    # [BOS, EOS] ↔ [EOS]: one special chunk at offset 0, invalid (the student's side is its position 0)
    a = align_document([1, 2], [0, 0], [True, True], [9], [0], [True])
    assert a.num_chunks == 1 and a.is_special[0] and not a.valid[0]
    a = align_document([], [], np.zeros(0, bool), [], [], np.zeros(0, bool))
    assert a.num_chunks == 0 and merge_and_debias(a, [], []).num_groups == 0


def test_mid_text_special_tokens():
    # teacher: "ab" | S | "cd" ; student: "a" "b" | S | "cd"  -> special chunk between the two text chunks
    a = align_document(
        [1, 50, 60], [2, 2, 4], [False, True, False], [3, 4, 70, 5], [1, 2, 2, 4], [False, False, True, False]
    )
    assert a.is_special.tolist() == [False, True, False]
    assert (a.byte_start.tolist(), a.byte_end.tolist()) == ([0, 2, 2], [2, 2, 4])
    assert a.teacher_chunk_id.tolist() == [0, 1, 2] and a.student_chunk_id.tolist() == [0, 0, 1, 2]
    assert a.valid.tolist() == [False, True, True]
    # one-sided special at a common boundary: dropped; its neighbours stay valid but are not merged
    a = align_document(
        [7, 1, 50, 60], [0, 2, 2, 4], [True, False, True, False], [0, 3, 5], [0, 2, 4], [True, False, False]
    )
    assert a.teacher_chunk_id.tolist() == [0, 1, -1, 2] and a.valid.tolist() == [False, True, True]
    m = merge_and_debias(a, [np.nan, -1.0, -5.0, -2.0], [0.0, -10.0, 0.0, 0.0], gamma=0.5)
    assert m.num_groups == 2  # chunk 1 is not flagged, but the dropped special lies between it and chunk 2
    assert m.teacher_chunk_logprob.tolist() == [-1.0, -2.0]
    # one-sided special strictly inside a chunk: the chunk is invalid (BOS on both sides, so position 0 is
    # not what invalidates it)
    a = align_document(
        [7, 1, 50, 60], [0, 1, 1, 4], [True, False, True, False], [0, 3, 4], [0, 2, 4], [True, False, False]
    )
    assert a.teacher_chunk_id.tolist() == [0, 1, -1, 1]
    assert a.num_chunks == 2 and (a.teacher_start[1], a.teacher_end[1]) == (1, 4) and not a.valid[1]


# --------------------------------------------------------------------------------------------------------
# Hand-computed γ-merging and debiasing


def test_gamma_merging_hand_computed():
    a, logprob, sigma = four_chunks()
    assert a.valid.tolist() == [False, True, True, True, True]
    m = merge_and_debias(a, logprob, sigma, gamma=0.1)
    # chunk "ab" (σ=.05) merges into "c" (σ=.5, flagged); "de" (.01) and "fg" (.02) form the trailing group
    assert m.chunk_start.tolist() == [1, 4] and m.chunk_end.tolist() == [3, 7]
    assert m.teacher_start.tolist() == [1, 3] and m.teacher_end.tolist() == [2, 4]
    assert m.byte_start.tolist() == [0, 3] and m.byte_end.tolist() == [3, 7]
    assert m.num_chunks.tolist() == [2, 2]
    assert m.teacher_chunk_logprob.tolist() == [-1.5, -2.25]
    assert m.teacher_chunk_boundary_logprob.tolist() == [sigma[2], sigma[4]]
    assert (
        m.teacher_chunk_logprob.dtype == np.float32 and m.teacher_chunk_boundary_logprob.dtype == np.float32
    )
    # debiasing (applied by the trainer) = C + σ
    np.testing.assert_allclose(m.teacher_target(), [-1.5 + np.log(0.5), -2.25 + np.log(0.02)], rtol=1e-6)
    assert merge_and_debias(a, logprob, sigma, debias=False).teacher_target().tolist() == [-1.5, -2.25]

    # γ = 0.04: "ab" (σ=.05 > .04) is flagged now
    m = merge_and_debias(a, logprob, sigma, gamma=0.04)
    assert m.teacher_chunk_logprob.tolist() == [-1.0, -0.5, -2.25]
    assert m.chunk_end.tolist() == [2, 3, 7]
    # γ = 0: every chunk is its own group (no merging) ...
    m = merge_and_debias(a, logprob, sigma, gamma=0.0)
    assert m.teacher_chunk_logprob.tolist() == [-1.0, -0.5, -2.0, -0.25]
    # ... even where exp(σ) underflows to 0 in float64
    tiny = np.full(5, -800.0, dtype=np.float32)
    assert merge_and_debias(a, logprob, tiny, gamma=0.0).num_groups == 4
    # γ = 1: nothing is flagged (σ <= 0), everything is one trailing group
    m = merge_and_debias(a, logprob, sigma, gamma=1.0)
    assert m.num_groups == 1 and m.teacher_chunk_logprob.tolist() == [-3.75]
    assert (m.chunk_start[0], m.chunk_end[0]) == (1, 7)


def test_gamma_flag_is_strict():
    a, logprob, _ = four_chunks()
    sigma = np.zeros(5, dtype=np.float32)  # exp(σ) = 1.0 exactly
    assert merge_and_debias(a, logprob, sigma, gamma=1.0).num_groups == 1  # 1.0 > 1.0 is False
    assert merge_and_debias(a, logprob, sigma, gamma=0.999).num_groups == 4


def test_invalid_bos_chunk_does_not_move_group_boundaries():
    a, logprob, sigma = four_chunks()
    # the BOS chunk's position has σ = log .9 (would be flagged) - it is skipped, not a group of its own
    m = merge_and_debias(a, logprob, sigma, gamma=0.1)
    assert m.chunk_start[0] == 1 and m.teacher_start[0] == 1
    # and the NaN log-prob at position 0 is never read
    assert np.isfinite(m.teacher_chunk_logprob).all()


def test_chunk_and_group_clipping():
    a, _, sigma = four_chunks()
    logprob = np.array([np.nan, 0.25, -0.5, -1e-3, 1e-3], dtype=np.float32)
    m = merge_and_debias(a, logprob, np.zeros(5, np.float32), gamma=0.5)
    # per chunk: min(0, Σℓ) -> [0, -0.5, -1e-3, 0]; every chunk is flagged (exp(0) = 1 > .5)
    np.testing.assert_allclose(m.teacher_chunk_logprob, [0.0, -0.5, -1e-3, 0.0], rtol=1e-6)
    sigma_pos = np.array([0, 0.01, 0.01, 0.01, 0.01], dtype=np.float32)
    m = merge_and_debias(a, logprob, sigma_pos, gamma=0.5)
    assert (m.teacher_chunk_boundary_logprob == 0).all()  # σ > 0 (rounding) is clipped at 0


def test_chunks_are_clipped_before_they_are_summed_into_a_group():
    a, _, _ = four_chunks()
    logprob = np.array([np.nan, 0.25, -0.5, -1.0, -1.0], dtype=np.float32)
    sigma = np.log(np.array([0.9, 0.01, 0.5, 0.5, 0.5])).astype(np.float32)
    m = merge_and_debias(a, logprob, sigma, gamma=0.1)
    # group 1 = "ab" (+0.25, clipped to 0) + "c" (-0.5): -0.5, not -0.25
    assert m.teacher_chunk_logprob.tolist() == [-0.5, -1.0, -1.0]


def test_dummy_prefix_at_position_0_without_bos_is_context():
    # teacher [▁ (dummy, zero bytes, not special), "ab"], no BOS; student [BOS, a, b]
    a = align_document([5, 6], [0, 2], [False, False], [1, 97, 98], [0, 1, 2], [True, False, False])
    assert a.student_chunk_id.tolist() == [-1, 0, 0] and a.teacher_chunk_id.tolist() == [0, 0]
    assert a.valid.tolist() == [True]  # the teacher's position 0 covers no bytes: only context
    m = merge_and_debias(a, [np.nan, -1.5], [-0.1, -0.1])  # the NaN at position 0 is never read
    assert m.teacher_chunk_logprob.tolist() == [-1.5]
    assert (m.teacher_start[0], m.teacher_end[0], m.chunk_start[0], m.chunk_end[0]) == (0, 1, 1, 2)


def test_zero_byte_token_before_a_special_token_rides_with_the_special_group():
    # teacher [▁, <s>, H] (an odd order no real tokenizer produces), student [<bos>, H]
    a = align_document([5, 1, 6], [0, 0, 1], [False, True, False], [1, 72], [0, 1], [True, False])
    assert a.teacher_chunk_id.tolist() == [0, 0, 1] and a.student_chunk_id.tolist() == [0, 1]
    assert a.is_special.tolist() == [True, False]
    assert a.valid.tolist() == [False, True]  # the student's side of the special chunk is its position 0


def test_teacher_sum_uses_float64():
    # 200 000 one-byte tokens of log-prob -0.1 in a single chunk: float32 accumulation would drift
    n = 200_001
    a = align_document(
        np.zeros(n, np.int32),
        np.concatenate([[0], np.arange(1, n)]).astype(np.int32),
        np.concatenate([[True], np.zeros(n - 1, bool)]),
        [0, 1],
        [0, n - 1],
        [True, False],
    )
    assert a.num_chunks == 2 and a.valid.tolist() == [False, True]
    logprob = np.full(n, -0.1, dtype=np.float32)
    m = merge_and_debias(a, logprob, np.zeros(n, np.float32))
    expected = np.float32(math.fsum([float(np.float32(-0.1))] * (n - 1)))
    assert abs(m.teacher_chunk_logprob[0] - expected) <= abs(np.spacing(expected))
    assert abs(np.cumsum(logprob[1:])[-1] - expected) > 10 * abs(
        np.spacing(expected)
    )  # what float32 would give


def test_large_document_every_teacher_boundary_with_a_byte_student():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 100_000)
    t_off = np.cumsum(lengths)
    s_off = np.concatenate([[0], np.arange(1, t_off[-1] + 1)])
    a = align_document(
        np.zeros(len(t_off), np.int32),
        t_off,
        np.zeros(len(t_off), bool),
        s_off,
        s_off,
        np.r_[True, np.zeros(len(s_off) - 1, bool)],
    )
    assert a.num_chunks == len(t_off)
    assert a.byte_end.tolist() == t_off.tolist()
    assert (a.teacher_end - a.teacher_start == 1).all()
    assert (a.student_end - a.student_start).tolist() == lengths.tolist()


# --------------------------------------------------------------------------------------------------------
# Coverage statistics


def test_coverage_stats_accumulate():
    a, logprob, sigma = four_chunks()
    m = merge_and_debias(a, logprob, sigma)
    s = coverage_stats(a, m, text_bytes=8)  # one byte of text beyond what both sides cover
    assert (s.documents, s.text_bytes, s.covered_bytes, s.chunks, s.valid_chunks, s.groups) == (
        1,
        8,
        7,
        5,
        4,
        2,
    )
    assert s.coverage == 7 / 8
    assert s.mean_chunk_bytes == 7 / 4
    assert s.mean_chunk_teacher_tokens == 1.0 and s.mean_chunk_student_tokens == 7 / 4
    assert s.mean_group_bytes == 3.5
    total = CoverageStats().add(s).add(s)
    assert (total.documents, total.text_bytes, total.covered_bytes, total.groups) == (2, 16, 14, 4)
    assert total.coverage == 7 / 8
    d = total.as_dict()
    assert d["coverage"] == 7 / 8 and d["valid_chunks"] == 8


# --------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem():
    ok_ids, ok_off, ok_sp = [1, 2], [1, 2], [False, False]
    with pytest.raises(ValueError, match="teacher_offsets has 1 entries but teacher_ids has 2"):
        align_document(ok_ids, [1], ok_sp, ok_ids, ok_off, ok_sp)
    with pytest.raises(ValueError, match="student_is_special_tok has 3 entries"):
        align_document(ok_ids, ok_off, ok_sp, ok_ids, ok_off, [False] * 3)
    with pytest.raises(
        ValueError, match="student_offsets are not non-decreasing: position 2 has offset 1 after 3"
    ):
        align_document(ok_ids, ok_off, ok_sp, [1, 2, 3], [2, 3, 1], [False] * 3)
    with pytest.raises(ValueError, match="teacher_offsets must be >= 0"):
        align_document(ok_ids, [-1, 2], ok_sp, ok_ids, ok_off, ok_sp)
    with pytest.raises(ValueError, match="one-dimensional"):
        align_document([ok_ids], [ok_off], [ok_sp], ok_ids, ok_off, ok_sp)
    with pytest.raises(ValueError, match="must be integers"):
        align_document(ok_ids, [1.0, 2.0], ok_sp, ok_ids, ok_off, ok_sp)
    a, logprob, sigma = four_chunks()
    with pytest.raises(ValueError, match="teacher_logprob has shape"):
        merge_and_debias(a, logprob[:-1], sigma)
    with pytest.raises(ValueError, match="teacher_boundary_logprob has shape"):
        merge_and_debias(a, logprob, sigma[:-1])
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            merge_and_debias(a, logprob, sigma, gamma=gamma)
    bad = logprob.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="teacher_logprob is NaN at position 3"):
        merge_and_debias(a, bad, sigma)
    bad = sigma.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="teacher_boundary_logprob is NaN at position 2"):
        merge_and_debias(a, logprob, bad)


def test_ids_outside_the_vocabulary(views):
    v = views["bytes"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        align_with_views([1000], [1], v, [65], [1], v)


def test_bytes_tokenizer_reads_special_strings_as_text(views):
    enc = views["bytes"].encode("<eos>")
    assert enc.token_ids.tolist() == [257, *b"<eos>"]
