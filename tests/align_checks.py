"""Independent checks of a chunk alignment and its merged groups (plain Python, per token), shared by the
alignment property tests (tests/unit/pipeline/test_align.py) and the tokenizer zoo's pairwise tests."""

from __future__ import annotations

import math

import numpy as np
import pytest


def token_spans(view, enc):
    """Per token: (start, end, bytes from token_bytes with a dummy-prefix space removed, special); a token read
    per occurrence (a ``▁`` that is U+2581 in the text) gets the text's bytes when it may read as them."""
    spans, prev, seen_text_token = [], 0, False
    data = enc.text.encode("utf-8")
    for tok, end in zip(enc.token_ids.tolist(), enc.offsets.tolist(), strict=True):
        raw = view.token_bytes[tok]
        special = bool(view.is_special[tok])
        if not special and not seen_text_token and len(raw) == end - prev + 1 and raw[:1] == b" ":
            raw = raw[1:]  # dummy prefix: the first text token carries a space that is not in the text
        elif raw != data[prev:end] and view.reads_as(tok, data[prev:end]):
            raw = data[prev:end]
        if not special:
            seen_text_token = True
        spans.append((prev, end, raw, special))
        prev = end
    return spans


def check_alignment(text: str, view_t, enc_t, view_s, enc_s, a, conventions: bool = True) -> None:
    """Chunks cover identical bytes on both sides, tile the common boundaries minimally and completely, and
    agree with the per-token chunk ids. ``conventions``: also check what holds for the tests' own tokenizers
    (BOS chunks are the only special ones; exactly the chunks holding position 0 are invalid); without it, that
    special chunks hold only special tokens and cover no bytes, and that position 0 is never scored."""
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
    if not conventions:
        # position 0 has no context: a chunk holding it is never scored, unless that token is a bare dummy-prefix
        # piece (no bytes, not special: context for the next token, as a BOS would be)
        for starts, spans in ((a.teacher_start, spans_t), (a.student_start, spans_s)):
            dummy_first = bool(spans) and spans[0][0] == spans[0][1] and not spans[0][3]
            if not dummy_first:
                assert not a.valid[starts == 0].any()
        lost = np.flatnonzero(~a.valid & ~a.is_special)
        assert len(lost) <= 1 and (len(lost) == 0 or lost[0] == np.flatnonzero(~a.is_special)[0])
        return
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
