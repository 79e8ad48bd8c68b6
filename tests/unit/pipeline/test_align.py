"""Chunk alignment, γ-merging and debiasing (alm_pipeline.pipeline.align), on real tiny tokenizers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from alm_pipeline.pipeline.align import (
    Alignment,
    CoverageStats,
    MergedChunks,
    align_document,
    align_with_views,
    coverage_stats,
    merge_and_debias,
)
from alm_pipeline.pipeline.align_batch import align_batch, coverage_batch, merge_batch
from alm_pipeline.pipeline.align_stage import CACHE_COLUMNS, AlignSettings, DroppedDocs, align_table
from alm_pipeline.pipeline.byteview import TokenizerMismatchError, load_byte_view
from tests.factories import corpus_lines

KINDS = ["byte_level", "byte_level_small", "sentencepiece", "bytes", "char"]
PAIRS = [(t, s) for t in KINDS for s in KINDS]


@pytest.fixture(scope="module")
def views(tokenizer_dirs):
    out = {kind: load_byte_view(path) for kind, path in tokenizer_dirs.items()}
    out["bytes"] = load_byte_view("bytes")
    return out


# --------------------------------------------------------------------------------------------------------
# Text strategies

FRAGMENTS = [
    "👩‍💻",  # ZWJ sequence
    "👨‍👩‍👧‍👦",
    "🇺🇳",  # regional indicators
    "👍🏽",  # skin-tone modifier
    "e\u0301",  # combining acute
    "a\u0308\u0323",  # two combining marks
    "中文文本",
    "日本語の",
    "한국어",
    "العربية نص",  # RTL
    "עברית",
    "\u200f",  # RLM
    "\u200d",  # lone ZWJ
    "\t",
    "\t\t",
    "\r\n",
    "\n",
    "\n\n",
    "    ",
    "  ",
    " ",
    "Hello",
    " the",
    " world.",
    "Café",
    "x",
    "1234",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "\x00",
    "\u00a0",
    "ﬁ",
    "\U0001f600",
]
ASCIIISH = st.text(alphabet=st.sampled_from(list("abcxyz ABC\t\n\r.,!?'0123456789")), max_size=8)
# U+2581 (▁) is excluded: the SentencePiece byte view maps a literal ▁ in the text to a space and refuses
# the text (TokenizerMismatchError); that is a property of the tokenizer, not of the aligner.
ANY_CHARS = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=6)
GENERAL_TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), ASCIIISH, ANY_CHARS), max_size=12).map("".join)

# The "char" tokenizer has no byte fallback: only characters of its training text (plus printable ASCII) are
# encodable; draw mostly from those so few examples are skipped.
CHAR_VOCAB = sorted({c for line in corpus_lines(1) for c in line} | {chr(c) for c in range(32, 127)})
CHAR_FRAGMENTS = [f for f in FRAGMENTS if all(c in CHAR_VOCAB for c in f)]
_CHAR_KNOWN = st.lists(
    st.one_of(st.sampled_from(CHAR_FRAGMENTS), st.text(alphabet=st.sampled_from(CHAR_VOCAB), max_size=8)),
    max_size=12,
).map("".join)
# now and then a character outside the char vocabulary: such examples are skipped (rejected)
CHAR_TEXT = st.tuples(
    _CHAR_KNOWN, st.sampled_from([""] * 8 + ["\u2603", "\U0001f600"]), st.integers(0, 64)
).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :])

MAX_LENGTH = st.one_of(st.none(), st.integers(min_value=1, max_value=48))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(view, text, max_length=None):
    try:
        return view.encode(text, max_length=max_length)
    except TokenizerMismatchError:
        if view.kind == "plain":  # the char tokenizer: unknown characters
            reject()
        raise


# --------------------------------------------------------------------------------------------------------
# Independent checks (plain Python, per token)


def token_spans(view, enc):
    """Per token: (start, end, bytes from token_bytes with a dummy-prefix space removed, special)."""
    spans, prev, seen_text_token = [], 0, False
    for tok, end in zip(enc.token_ids.tolist(), enc.offsets.tolist(), strict=True):
        raw = view.token_bytes[tok]
        special = bool(view.is_special[tok])
        if not special and not seen_text_token and len(raw) == end - prev + 1 and raw[:1] == b" ":
            raw = raw[1:]  # dummy prefix: the first text token carries a space that is not in the text
        if not special:
            seen_text_token = True
        spans.append((prev, end, raw, special))
        prev = end
    return spans


def check_alignment(text: str, view_t, enc_t, view_s, enc_s, a) -> None:
    data = text.encode("utf-8")
    spans_t, spans_s = token_spans(view_t, enc_t), token_spans(view_s, enc_s)
    for spans in (spans_t, spans_s):  # the byte views themselves are consistent with the text
        for start, end, raw, _ in spans:
            assert raw == data[start:end]

    c = a.num_chunks
    for arr in (a.teacher_start, a.teacher_end, a.student_start, a.student_end, a.byte_start, a.byte_end):
        assert len(arr) == c
    # every chunk's teacher bytes equal its student bytes equal the text's bytes there
    for k in range(c):
        bt = b"".join(spans_t[u][2] for u in range(a.teacher_start[k], a.teacher_end[k]))
        bs = b"".join(spans_s[u][2] for u in range(a.student_start[k], a.student_end[k]))
        assert bt == bs == data[a.byte_start[k] : a.byte_end[k]]
        assert a.teacher_end[k] > a.teacher_start[k] and a.student_end[k] > a.student_start[k]
        if a.is_special[k]:
            assert a.byte_start[k] == a.byte_end[k]
            assert all(spans_t[u][3] for u in range(a.teacher_start[k], a.teacher_end[k]))
            assert all(spans_s[u][3] for u in range(a.student_start[k], a.student_end[k]))
        else:
            assert a.byte_end[k] > a.byte_start[k]
    # in order, non-overlapping
    assert np.all(a.teacher_start[1:] >= a.teacher_end[:-1])
    assert np.all(a.student_start[1:] >= a.student_end[:-1])
    assert np.all(a.byte_start[1:] >= a.byte_end[:-1])
    # the regular chunks tile [0, aligned_bytes) and end exactly at the common boundaries (minimal + complete)
    regular = ~a.is_special
    ends_t = {e for s, e, _, _ in spans_t if e > s}
    ends_s = {e for s, e, _, _ in spans_s if e > s}
    common = sorted(ends_t & ends_s)
    assert a.byte_end[regular].tolist() == common
    assert a.byte_start[regular].tolist() == [0, *common[:-1]][: len(common)]
    assert a.aligned_bytes == (common[-1] if common else 0)
    assert a.aligned_bytes <= min(a.teacher_bytes, a.student_bytes)
    if not enc_t.truncated and not enc_s.truncated:
        assert a.aligned_bytes == len(data)
    # per-token chunk ids agree with the ranges; covering tokens up to the aligned end are all in a chunk
    for ids, starts, ends, spans in (
        (a.teacher_chunk_id, a.teacher_start, a.teacher_end, spans_t),
        (a.student_chunk_id, a.student_start, a.student_end, spans_s),
    ):
        expected = np.full(len(spans), -1)
        for k in range(c):
            expected[starts[k] : ends[k]] = k
        assert ids.tolist() == expected.tolist()
        for u, (s, e, _, special) in enumerate(spans):
            if e > s:
                assert (ids[u] >= 0) == (e <= a.aligned_bytes)
            elif not special and s < a.aligned_bytes:
                assert ids[u] >= 0  # dummy prefix: with the chunk holding the next byte
    # special chunks: BOS on both sides pair at the start; nothing else is special in these encodings
    both_bos = (
        bool(view_t.prefix_ids) and bool(view_s.prefix_ids) and len(enc_t.token_ids) and len(enc_s.token_ids)
    )
    assert a.is_special.tolist() == ([True] + [False] * (c - 1) if both_bos else [False] * c)
    # validity: exactly the chunks holding position 0 of either side are invalid here (no dummy prefix at
    # position 0 without a BOS among these tokenizers)
    assert a.valid.tolist() == ((a.teacher_start > 0) & (a.student_start > 0)).tolist()


def check_merged(a, m, logprob, sigma, gamma) -> None:
    valid = np.flatnonzero(a.valid)
    assert int(m.num_chunks.sum()) == len(valid)
    members = np.split(valid, np.cumsum(m.num_chunks)[:-1]) if len(valid) else []
    for g, chunks in enumerate(members):
        first, last = chunks[0], chunks[-1]
        assert m.chunk_start[g] == a.student_start[first] and m.chunk_end[g] == a.student_end[last] - 1
        assert m.teacher_start[g] == a.teacher_start[first] and m.teacher_end[g] == a.teacher_end[last] - 1
        assert m.byte_start[g] == a.byte_start[first] and m.byte_end[g] == a.byte_end[last]
        # teacher group sum = Σ logprob over the group's teacher tokens (at positions >= 1), chunks clipped
        expected = sum(
            min(
                0.0, math.fsum(float(logprob[u]) for u in range(max(a.teacher_start[c], 1), a.teacher_end[c]))
            )
            for c in chunks
        )
        assert m.teacher_chunk_logprob[g] == pytest.approx(min(expected, 0.0), rel=1e-6, abs=1e-5)
        last_tok = a.teacher_end[last] - 1
        assert m.teacher_chunk_boundary_logprob[g] == np.float32(min(float(sigma[last_tok]), 0.0))
        flags = [math.exp(float(sigma[a.teacher_end[c] - 1])) > gamma for c in chunks]
        assert not any(flags[:-1])  # merged only across unflagged chunks
        if g < len(members) - 1:
            assert flags[-1]  # every group but the trailing one ends at a flagged chunk
    if members:
        assert members[0][0] == valid[0] and members[-1][-1] == valid[-1]


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


def _four_chunks():
    """Teacher [BOS, "ab", "c", "de", "fg"], student [BOS, a..g] (bytes): BOS chunk + 4 text chunks."""
    teacher_offsets = [0, 2, 3, 5, 7]
    student_offsets = [0, 1, 2, 3, 4, 5, 6, 7]
    a = align_document(
        [1, 10, 11, 12, 13],
        teacher_offsets,
        [True, False, False, False, False],
        [1] + list(range(97, 104)),
        student_offsets,
        [True] + [False] * 7,
    )
    logprob = np.array([np.nan, -1.0, -0.5, -2.0, -0.25], dtype=np.float32)
    sigma = np.log(np.array([0.9, 0.05, 0.5, 0.01, 0.02])).astype(np.float32)
    return a, logprob, sigma


def test_gamma_merging_hand_computed():
    a, logprob, sigma = _four_chunks()
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
    a, logprob, _ = _four_chunks()
    sigma = np.zeros(5, dtype=np.float32)  # exp(σ) = 1.0 exactly
    assert merge_and_debias(a, logprob, sigma, gamma=1.0).num_groups == 1  # 1.0 > 1.0 is False
    assert merge_and_debias(a, logprob, sigma, gamma=0.999).num_groups == 4


def test_invalid_bos_chunk_does_not_move_group_boundaries():
    a, logprob, sigma = _four_chunks()
    # the BOS chunk's position has σ = log .9 (would be flagged) - it is skipped, not a group of its own
    m = merge_and_debias(a, logprob, sigma, gamma=0.1)
    assert m.chunk_start[0] == 1 and m.teacher_start[0] == 1
    # and the NaN log-prob at position 0 is never read
    assert np.isfinite(m.teacher_chunk_logprob).all()


def test_chunk_and_group_clipping():
    a, _, sigma = _four_chunks()
    logprob = np.array([np.nan, 0.25, -0.5, -1e-3, 1e-3], dtype=np.float32)
    m = merge_and_debias(a, logprob, np.zeros(5, np.float32), gamma=0.5)
    # per chunk: min(0, Σℓ) -> [0, -0.5, -1e-3, 0]; every chunk is flagged (exp(0) = 1 > .5)
    np.testing.assert_allclose(m.teacher_chunk_logprob, [0.0, -0.5, -1e-3, 0.0], rtol=1e-6)
    sigma_pos = np.array([0, 0.01, 0.01, 0.01, 0.01], dtype=np.float32)
    m = merge_and_debias(a, logprob, sigma_pos, gamma=0.5)
    assert (m.teacher_chunk_boundary_logprob == 0).all()  # σ > 0 (rounding) is clipped at 0


def test_chunks_are_clipped_before_they_are_summed_into_a_group():
    a, _, _ = _four_chunks()
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
    a, logprob, sigma = _four_chunks()
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
    a, logprob, sigma = _four_chunks()
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


# --------------------------------------------------------------------------------------------------------
# The batched path (align_batch / merge_batch / coverage_batch, align_stage.align_table) equals the
# per-document path (align_document / merge_and_debias / coverage_stats, ByteView.encode), field by field


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


def random_scores(rng, n):
    logprob = -rng.exponential(2.0, n).astype(np.float32)
    logprob[rng.random(n) < 0.05] = 1e-7
    if n:
        logprob[0] = np.nan
    sigma = np.log(rng.choice([0.9, 0.3, 0.11, 0.09, 0.01, 1e-5], n)).astype(np.float32)
    return logprob, sigma


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
    a, logprob, sigma = _four_chunks()
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


# ---- align_stage.align_table: the whole shard at once == the per-document loop it replaced


def align_table_per_document(table, teacher_is_special, student, settings, coverage, dropped):
    """The per-document align_table (ByteView.encode, align_document, merge_and_debias, coverage_stats per
    row): the reference for align_stage.align_table."""
    from alm_pipeline.cache.aligned import ALIGNED_SCHEMA

    out = {name: [] for name in ALIGNED_SCHEMA.names}
    rows = table.to_pylist()
    for row in rows:
        doc_id, text = row["doc_id"], row["text"]
        t_ids = np.asarray(row["token_ids"], dtype=np.int32)
        text_bytes = len(text.encode("utf-8"))
        try:
            enc = student.encode(text, max_length=settings.max_student_length, doc_ref=doc_id)
        except TokenizerMismatchError as err:
            dropped.add("student tokenizer cannot reproduce the text", doc_id, str(err)[:200])
            continue
        alignment = align_document(
            t_ids,
            np.asarray(row["offsets"], dtype=np.int32),
            teacher_is_special[t_ids],
            enc.token_ids,
            enc.offsets,
            student.is_special[enc.token_ids],
        )
        merged = merge_and_debias(
            alignment,
            np.asarray(row["logprob"], dtype=np.float32),
            np.asarray(row["boundary_logprob"], dtype=np.float32),
            gamma=settings.gamma,
            debias=settings.debias,
        )
        coverage.add(coverage_stats(alignment, merged, text_bytes))
        if merged.num_groups == 0:
            dropped.add("no valid chunk", doc_id)
            continue
        out["doc_id"].append(doc_id)
        out["input_ids"].append(enc.token_ids.tolist())
        out["chunk_start"].append(merged.chunk_start.tolist())
        out["chunk_end"].append(merged.chunk_end.tolist())
        out["teacher_chunk_logprob"].append(merged.teacher_chunk_logprob.tolist())
        out["teacher_chunk_boundary_logprob"].append(merged.teacher_chunk_boundary_logprob.tolist())
        out["text_bytes"].append(text_bytes)
        out["covered_bytes"].append(int((merged.byte_end - merged.byte_start).sum()))
    return pa.table(out, schema=ALIGNED_SCHEMA)


def cache_table(view, texts, max_length, rng):
    """Teacher-cache rows (the cache's schema) for ``texts`` tokenized by ``view``."""
    from alm_pipeline.cache.teacher import CACHE_SCHEMA

    rows = []
    for i, text in enumerate(texts):
        enc = view.encode(text, max_length=max_length)
        logprob, sigma = random_scores(rng, len(enc.token_ids))
        rows.append(
            {
                "doc_id": f"doc-{i}",
                "text": text,
                "token_ids": enc.token_ids.tolist(),
                "offsets": enc.offsets.tolist(),
                "logprob": logprob.tolist(),
                "boundary_logprob": sigma.tolist(),
            }
        )
    schema = pa.schema([CACHE_SCHEMA.field(name) for name in CACHE_COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema)


def check_align_table(table, teacher_view, student_view, settings) -> pa.Table:
    got_cov, got_drop = CoverageStats(), DroppedDocs()
    got = align_table(table, teacher_view.is_special, student_view, settings, got_cov, got_drop)
    want_cov, want_drop = CoverageStats(), DroppedDocs()
    want = align_table_per_document(
        table, teacher_view.is_special, student_view, settings, want_cov, want_drop
    )
    assert got.schema == want.schema
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    assert got.equals(want)
    assert got_cov == want_cov
    assert got_drop.counts == want_drop.counts and got_drop.examples == want_drop.examples
    return got


STUDENT_MAX_LENGTH = st.one_of(st.none(), st.integers(min_value=1, max_value=48), st.just(2000))


@pytest.mark.parametrize(
    ("teacher", "student"),
    [("byte_level", "bytes"), ("sentencepiece", "byte_level_small"), ("byte_level", "sentencepiece"),
     ("byte_level", "char"), ("bytes", "char")],
)  # fmt: skip
@FAST
@given(data=st.data(), max_t=MAX_LENGTH, max_s=STUDENT_MAX_LENGTH, seed=st.integers(0, 2**32 - 1))
def test_align_table_equals_the_per_document_path(views, teacher, student, data, max_t, max_s, seed):
    # For the char student, texts outside its vocabulary are kept: the student cannot tokenize them and
    # they are dropped and counted. Empty texts and one-character texts have no valid chunk.
    texts = data.draw(
        st.lists(
            st.one_of(CHAR_TEXT if student == "char" else GENERAL_TEXT, st.sampled_from(["", "a", "\u2603"])),
            max_size=10,
        ),
        label="texts",
    )
    rng = np.random.default_rng(seed)
    vt, vs = views[teacher], views[student]
    try:
        table = cache_table(vt, texts, max_t, rng)
    except TokenizerMismatchError:
        reject()
    gamma = float(rng.choice([0.0, 0.1, 0.5]))
    settings_ = AlignSettings(gamma=gamma, max_student_length=max_s)
    check_align_table(table, vt, vs, settings_)
    if table.num_rows > 2:  # a sliced table (list offsets not starting at 0) and a table of several chunks
        check_align_table(table.slice(1, table.num_rows - 2), vt, vs, settings_)
        check_align_table(pa.concat_tables([table.slice(0, 2), table.slice(2)]), vt, vs, settings_)


def test_align_table_drops_and_counts_like_the_per_document_path(views):
    texts = ["Hello world", "", "snow \u2603 man", "a", "Hello again", "\u2603"]
    table = cache_table(views["byte_level"], texts, None, np.random.default_rng(0))
    out = check_align_table(table, views["byte_level"], views["char"], AlignSettings())
    assert out["doc_id"].to_pylist() == ["doc-0", "doc-4"]
    drop = DroppedDocs()
    align_table(table, views["byte_level"].is_special, views["char"], AlignSettings(), dropped=drop)
    assert drop.counts == {"no valid chunk": 2, "student tokenizer cannot reproduce the text": 2}
    assert [e.split(":")[0] for e in drop.examples] == ["doc-1", "doc-2", "doc-3", "doc-5"]
    # truncation of the student: every document is cut at 4 tokens
    out = check_align_table(table, views["byte_level"], views["bytes"], AlignSettings(max_student_length=4))
    assert all(len(ids) <= 4 for ids in out["input_ids"].to_pylist())
    # a corrupt cache row: the error names the document
    corrupt = table.set_column(
        table.schema.get_field_index("logprob"),
        "logprob",
        pa.array(
            [[float("nan")] * len(r) for r in table["logprob"].to_pylist()], type=pa.list_(pa.float32())
        ),
    )
    with pytest.raises(ValueError, match=r"teacher_logprob is NaN at position \d+, .*\(document doc-0\)"):
        align_table(corrupt, views["byte_level"].is_special, views["bytes"], AlignSettings())
    # no rows at all
    check_align_table(table.slice(0, 0), views["byte_level"], views["bytes"], AlignSettings())


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


def test_align_table_refuses_texts_the_student_does_not_reproduce(views):
    """Student views whose token bytes were altered: the texts they cannot reproduce are dropped with the
    message ByteView.encode gives, by every path of the batched byte check."""
    texts = ["Hello world", "Hello", "the other one", "xyz", "", "e", "Hello there"]
    teacher = views["byte_level"]
    table = cache_table(teacher, texts, None, np.random.default_rng(0))

    def altered(view, old: bytes, new: bytes, leading_only: bool = False):
        def alter(b: bytes) -> bytes:
            if leading_only:
                return new + b[len(old) :] if b.startswith(old) else b
            return b.replace(old, new)

        return dataclasses.replace(view, token_bytes=[alter(b) for b in view.token_bytes])

    cases = [
        altered(views["bytes"], b"e", b"E"),  # one byte per token, texts and tokens of the same length
        altered(views["sentencepiece"], b"e", b"E"),  # dummy prefix: lengths differ from the text's
        altered(views["sentencepiece"], b" ", b"X", leading_only=True),  # "XHello" for "Hello": refused
        altered(views["byte_level"], b"o", b"oo"),  # longer than the text
    ]
    for student in cases:
        for max_length in (None, 3):
            drop = DroppedDocs()
            align_table(
                table, teacher.is_special, student, AlignSettings(max_student_length=max_length), dropped=drop
            )
            assert drop.counts.get("student tokenizer cannot reproduce the text", 0) > 0
            check_align_table(table, teacher, student, AlignSettings(max_student_length=max_length))
