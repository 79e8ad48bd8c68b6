"""Chunk alignment, γ-merging and coverage of a whole batch of documents at once (the production path).

:func:`align_batch`, :func:`merge_batch` and :func:`coverage_batch` are
:func:`~alm_pipeline.pipeline.align.align_document`, :func:`~alm_pipeline.pipeline.align.merge_and_debias` and
:func:`~alm_pipeline.pipeline.align.coverage_stats` (the per-document reference, which documents the rules)
for D documents: the documents' token arrays are concatenated into flat arrays with row pointers and the numpy
work is done once per batch instead of once per document (a document is a few hundred tokens, so
per-document numpy call overhead dominates otherwise). They give exactly the per-document results, field by
field (the tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from alm_pipeline.pipeline.align import Alignment, CoverageStats, MergedChunks
from alm_pipeline.pipeline.align_rules import (
    check_merge_inputs,
    check_token_arrays,
    chunk_bytes,
    chunk_validity,
    merge_groups,
    order_chunks,
    special_run_chunks,
)

__all__ = ["AlignmentBatch", "MergedBatch", "align_batch", "coverage_batch", "merge_batch"]


# A batch holds D documents as flat arrays (the documents' token arrays concatenated) plus row pointers
# ``rows`` (int, length D + 1): document d's tokens are ``[rows[d], rows[d + 1])``. :func:`align_batch` solves
# all documents as ONE alignment problem: document d's byte offsets are shifted by a base ``base[d]`` that
# puts every document in its own byte range, separated by a gap of one byte, so that
#
# * the offsets stay non-decreasing over the whole batch (the searchsorted steps need that),
# * no end offset, common boundary or special-run offset of one document equals one of another document
#   (the ranges are disjoint), so nothing is matched or paired across documents, and
# * sorting by global offset sorts by document first: chunk k of document d gets the global index
#   ``chunk_rows[d] + k``.
#
# The few places where the per-document logic looks at a neighbouring token or chunk (the start offset of a
# document's first token, the runs of special tokens, "the chunk holding the next byte", the start of a
# document's first chunk, adjacency of chunks when merging) are cut explicitly at document boundaries.


@dataclass(frozen=True)
class AlignmentBatch:
    """The :class:`Alignment`\\ s of D documents, as flat arrays; :meth:`document` gives one of them.

    Per chunk (all documents' chunks, document by document, each document's in text order): the fields of
    :class:`Alignment` with DOCUMENT-LOCAL token indices and byte offsets, plus ``chunk_doc`` (the
    document). Per token: ``teacher_chunk_index`` / ``student_chunk_index`` (int64, BATCH-WIDE chunk index,
    -1 = in no chunk; the properties ``teacher_chunk_id`` / ``student_chunk_id`` give the document-local int32
    ids of :class:`Alignment`). Per document: ``teacher_bytes``, ``student_bytes``, ``aligned_bytes`` (int64).
    Row pointers (int64, D + 1): ``chunk_rows``, ``teacher_rows``, ``student_rows``.
    """

    chunk_rows: np.ndarray
    teacher_rows: np.ndarray
    student_rows: np.ndarray
    chunk_doc: np.ndarray
    teacher_start: np.ndarray
    teacher_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray
    is_special: np.ndarray
    valid: np.ndarray
    teacher_chunk_index: np.ndarray
    student_chunk_index: np.ndarray
    teacher_bytes: np.ndarray
    student_bytes: np.ndarray
    aligned_bytes: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.chunk_rows) - 1

    @property
    def teacher_chunk_id(self) -> np.ndarray:
        return self._local_ids(self.teacher_chunk_index, self.teacher_rows)

    @property
    def student_chunk_id(self) -> np.ndarray:
        return self._local_ids(self.student_chunk_index, self.student_rows)

    def _local_ids(self, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        first_chunk = np.repeat(self.chunk_rows[:-1], np.diff(rows))
        return np.where(index >= 0, index - first_chunk, -1).astype(np.int32)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_doc)

    def document(self, d: int) -> Alignment:
        """Document ``d``'s :class:`Alignment` (copies), equal field by field to :func:`align_document`'s."""
        c = slice(int(self.chunk_rows[d]), int(self.chunk_rows[d + 1]))
        t = slice(int(self.teacher_rows[d]), int(self.teacher_rows[d + 1]))
        s = slice(int(self.student_rows[d]), int(self.student_rows[d + 1]))
        return Alignment(
            teacher_start=self.teacher_start[c].copy(),
            teacher_end=self.teacher_end[c].copy(),
            student_start=self.student_start[c].copy(),
            student_end=self.student_end[c].copy(),
            byte_start=self.byte_start[c].copy(),
            byte_end=self.byte_end[c].copy(),
            is_special=self.is_special[c].copy(),
            valid=self.valid[c].copy(),
            teacher_chunk_id=np.where(
                self.teacher_chunk_index[t] >= 0, self.teacher_chunk_index[t] - c.start, -1
            ).astype(np.int32),
            student_chunk_id=np.where(
                self.student_chunk_index[s] >= 0, self.student_chunk_index[s] - c.start, -1
            ).astype(np.int32),
            teacher_bytes=int(self.teacher_bytes[d]),
            student_bytes=int(self.student_bytes[d]),
            aligned_bytes=int(self.aligned_bytes[d]),
        )


@dataclass(frozen=True)
class _BatchSide:
    name: str
    rows: np.ndarray  # int64 (D + 1)
    lengths: np.ndarray  # int64 per document
    doc: np.ndarray  # int64 per token: its document
    first: np.ndarray  # int64: index of each NON-EMPTY document's first token
    ends: np.ndarray  # int64 per token: GLOBAL byte end offset (document-local end + base[doc])
    starts: np.ndarray  # int64 per token: global byte start offset
    covering: np.ndarray
    special: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ends)


def _check_rows(name: str, rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or len(rows) == 0 or (len(rows) > 1 and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"{name}_rows must be a one-dimensional integer array of D + 1 row pointers")
    rows = rows.astype(np.int64)
    if rows[0] != 0 or rows[-1] != n or (np.diff(rows) < 0).any():
        raise ValueError(
            f"{name}_rows must start at 0, be non-decreasing and end at the number of tokens ({n}); got "
            f"{rows[0]} .. {rows[-1]}"
        )
    return rows


def _document(names, d: int) -> str:
    return f"document {names[d] if names is not None else d}"


def _check_batch_side(name: str, ids, offsets, is_special_tok, rows, names=None):
    """The checks of :func:`~alm_pipeline.pipeline.align.align_document`'s inputs, per document; returns
    (rows, lengths, doc, first token of each non-empty document, local ends, special)."""
    ids, offsets, special = check_token_arrays(name, ids, offsets, is_special_tok)
    rows = _check_rows(name, rows, len(ids))
    lengths = np.diff(rows)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    ends = offsets.astype(np.int64)
    first = rows[:-1][lengths > 0]
    negative = np.flatnonzero(ends[first] < 0)
    if len(negative):
        u = int(first[negative[0]])
        raise ValueError(
            f"{name}_offsets must be >= 0, got {int(ends[u])} at position 0 ({_document(names, int(doc[u]))})"
        )
    step = np.diff(ends) < 0
    step[first[1:] - 1] = False  # the step from one document's last token to the next document's first
    decreasing = np.flatnonzero(step)
    if len(decreasing):
        u = int(decreasing[0]) + 1
        d = int(doc[u])
        raise ValueError(
            f"{name}_offsets are not non-decreasing: position {u - int(rows[d])} has offset {int(ends[u])} "
            f"after {int(ends[u - 1])} ({_document(names, d)})"
        )
    return rows, lengths, doc, first, ends, special.astype(bool, copy=False)


def _batch_side(name, rows, lengths, doc, first, local_ends, special, base) -> _BatchSide:
    ends = local_ends + base[doc]
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1]
        starts[first] = base[doc[first]]  # a document's first token starts at its byte 0
    covering = ends > starts
    return _BatchSide(name, rows, lengths, doc, first, ends, starts, covering, special & ~covering)


def _batch_special_runs(side: _BatchSide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_special_runs` of every document at once, computed on the zero-byte tokens only (few: BOS,
    EOS, dummy prefixes). Returns (member token indices, run number of each member, run offsets)."""
    zero = np.flatnonzero(~side.covering)
    special = np.flatnonzero(side.special)  # zero-byte special tokens, a subset of ``zero``
    if len(special) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # next zero-byte special at or after each zero-byte token; a later document's one never has the same
    # (global) offset, so there are no cross-document members
    j = np.searchsorted(special, zero)
    next_special = special[np.minimum(j, len(special) - 1)]
    members = zero[(j < len(special)) & (side.ends[next_special] == side.ends[zero])]
    # runs = maximal blocks of consecutive members, cut at document starts
    run_start = np.ones(len(members), dtype=bool)
    run_start[1:] = members[1:] != members[:-1] + 1
    run_start |= side.rows[side.doc[members]] == members
    run_number = np.cumsum(run_start) - 1
    return members, run_number, side.ends[members[run_start]]


def _common_ends(ends_a: np.ndarray, ends_b: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """For two strictly increasing int64 arrays of offsets in [0, span]: which entries of each the other
    also has. A byte table when it is small compared with the arrays (real tokenizations: a few bytes per
    token), otherwise binary searches of the shorter array in the longer (a corrupt offset cannot make this
    allocate memory proportional to its value)."""
    if span <= 32 * (len(ends_a) + len(ends_b)) + 65536:
        mark = np.zeros(span + 1, dtype=np.uint8)
        mark[ends_a] = 1
        mark[ends_b] |= 2
        return mark[ends_a] == 3, mark[ends_b] == 3
    swap = len(ends_a) > len(ends_b)
    short, long = (ends_b, ends_a) if swap else (ends_a, ends_b)
    in_short = np.zeros(len(short), dtype=bool)
    in_long = np.zeros(len(long), dtype=bool)
    if len(short) and len(long):
        at = np.minimum(np.searchsorted(long, short), len(long) - 1)
        in_short = long[at] == short
        in_long[at[in_short]] = True
    return (in_long, in_short) if swap else (in_short, in_long)


def align_batch(
    teacher_ids,
    teacher_offsets,
    teacher_is_special_tok,
    teacher_rows,
    student_ids,
    student_offsets,
    student_is_special_tok,
    student_rows,
    *,
    document_names=None,
) -> AlignmentBatch:
    """:func:`align_document` for D documents at once: flat per-token arrays (the documents' arrays
    concatenated, offsets document-local as in the cache) and row pointers ``*_rows`` (length D + 1, the
    same D on both sides). Returns an :class:`AlignmentBatch` whose :meth:`~AlignmentBatch.document` ``d``
    equals ``align_document`` on document d's arrays, field by field. Raises :class:`ValueError` like
    :func:`align_document` (naming the document: its index, or ``document_names[d]``) for mismatched
    lengths, bad row pointers or decreasing offsets."""
    rows_t, len_t, doc_t, first_t, local_t, special_t = _check_batch_side(
        "teacher", teacher_ids, teacher_offsets, teacher_is_special_tok, teacher_rows, document_names
    )
    rows_s, len_s, doc_s, first_s, local_s, special_s = _check_batch_side(
        "student", student_ids, student_offsets, student_is_special_tok, student_rows, document_names
    )
    num_docs = len(len_t)
    if len(len_s) != num_docs:
        raise ValueError(f"teacher_rows has {num_docs} documents but student_rows has {len(len_s)}")

    # Per-document byte base: each document gets [base[d], base[d] + last offset], plus one byte of gap.
    last_t = np.zeros(num_docs, dtype=np.int64)
    last_s = np.zeros(num_docs, dtype=np.int64)
    last_t[len_t > 0] = local_t[rows_t[1:][len_t > 0] - 1]
    last_s[len_s > 0] = local_s[rows_s[1:][len_s > 0] - 1]
    base = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.maximum(last_t, last_s) + 1, out=base[1:])
    teacher = _batch_side("teacher", rows_t, len_t, doc_t, first_t, local_t, special_t, base)
    student = _batch_side("student", rows_s, len_s, doc_s, first_s, local_s, special_s, base)

    # Common boundaries (see align_document), all documents at once; ``bound_doc``: each one's document.
    # ``on_bound``: per token, whether it is a byte-covering token ending at a common boundary.
    cov_t = np.flatnonzero(teacher.covering)
    cov_s = np.flatnonzero(student.covering)
    common_t, common_s = _common_ends(teacher.ends[cov_t], student.ends[cov_s], int(base[-1]))
    on_bound_t = np.zeros(teacher.n, dtype=bool)
    on_bound_t[cov_t] = common_t
    on_bound_s = np.zeros(student.n, dtype=bool)
    on_bound_s[cov_s] = common_s
    bound_tokens = cov_s[common_s]
    bounds = student.ends[bound_tokens]
    bound_doc = student.doc[bound_tokens]
    n_regular = len(bounds)
    regular_start = np.empty_like(bounds)
    if n_regular:
        regular_start[0] = 0
        regular_start[1:] = bounds[:-1]
        doc_first = np.flatnonzero(np.concatenate([[True], bound_doc[1:] != bound_doc[:-1]]))
        regular_start[doc_first] = base[bound_doc[doc_first]]  # a document's first chunk starts at its byte 0

    members_t, run_number_t, run_offset_t = _batch_special_runs(teacher)
    members_s, run_number_s, run_offset_s = _batch_special_runs(student)
    paired, regular_index, special_index = order_chunks(regular_start, run_offset_t, run_offset_s)
    n_chunks = n_regular + len(paired)
    regular_lookup = np.concatenate([regular_index, [-1]])
    bound_doc_lookup = np.concatenate([bound_doc, [-1]])

    def chunk_ids(
        side: _BatchSide,
        on_bound: np.ndarray,
        members: np.ndarray,
        run_number: np.ndarray,
        run_offset: np.ndarray,
    ) -> np.ndarray:
        # align_document's searchsorted(bounds, starts, "right") = the number of common boundaries <= the
        # token's start = the number of tokens BEFORE it (on its own side) that end at a common boundary:
        # a running count. The boundary it points to must be in the token's own document: otherwise the
        # token is beyond its document's last common boundary (no chunk).
        k = np.cumsum(on_bound)
        k -= on_bound
        ids = np.where(bound_doc_lookup[k] == side.doc, regular_lookup[k], -1)
        if len(members):  # members of special runs (their entries above are overwritten)
            ids[members] = special_run_chunks(paired, special_index, run_offset)[run_number]
        return ids

    tid = chunk_ids(teacher, on_bound_t, members_t, run_number_t, run_offset_t)
    sid = chunk_ids(student, on_bound_s, members_s, run_number_s, run_offset_s)

    def ranges(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if n_chunks == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=bool)
        assigned = np.flatnonzero(ids >= 0)
        sorted_ids = ids[assigned]
        # chunk ids are non-decreasing along the assigned tokens and every chunk has tokens on both sides
        # (its last byte-covering token, or its special run), so the ranges come from the counts
        count = np.bincount(sorted_ids, minlength=n_chunks)
        if count.all():
            hi = np.cumsum(count)
            lo = hi - count
        else:  # pragma: no cover - not reachable; kept identical to align_document
            chunk = np.arange(n_chunks)
            lo = np.searchsorted(sorted_ids, chunk, side="left")
            hi = np.searchsorted(sorted_ids, chunk, side="right")
        start = assigned[lo]
        end = assigned[hi - 1] + 1
        return start.astype(np.int64), end.astype(np.int64), (end - start) == (hi - lo)

    t_start, t_end, t_contiguous = ranges(tid)
    s_start, s_end, s_contiguous = ranges(sid)

    chunk_doc = np.empty(n_chunks, dtype=np.int64)
    chunk_doc[regular_index] = bound_doc
    chunk_doc[special_index] = np.searchsorted(base, paired, side="right") - 1
    chunk_rows = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(chunk_doc, minlength=num_docs), out=chunk_rows[1:])
    chunk_base = base[chunk_doc]
    byte_start, byte_end, is_special = chunk_bytes(
        regular_index, regular_start, bounds, special_index, paired
    )
    byte_start -= chunk_base
    byte_end -= chunk_base
    t_start -= rows_t[chunk_doc]
    t_end -= rows_t[chunk_doc]
    s_start -= rows_s[chunk_doc]
    s_end -= rows_s[chunk_doc]

    def position0_is_content(side: _BatchSide) -> np.ndarray:
        out = np.zeros(num_docs, dtype=bool)
        out[side.lengths > 0] = side.covering[side.first] | side.special[side.first]
        return out[chunk_doc]

    valid = chunk_validity(
        t_start,
        t_end,
        t_contiguous,
        position0_is_content(teacher),
        s_start,
        s_contiguous,
        position0_is_content(student),
    )

    aligned_bytes = np.zeros(num_docs, dtype=np.int64)
    if n_regular:
        doc_last = np.flatnonzero(np.concatenate([bound_doc[1:] != bound_doc[:-1], [True]]))
        aligned_bytes[bound_doc[doc_last]] = bounds[doc_last] - base[bound_doc[doc_last]]
    return AlignmentBatch(
        chunk_rows=chunk_rows,
        teacher_rows=rows_t,
        student_rows=rows_s,
        chunk_doc=chunk_doc,
        teacher_start=t_start,
        teacher_end=t_end,
        student_start=s_start,
        student_end=s_end,
        byte_start=byte_start,
        byte_end=byte_end,
        is_special=is_special,
        valid=valid,
        teacher_chunk_index=tid,
        student_chunk_index=sid,
        teacher_bytes=last_t,
        student_bytes=last_s,
        aligned_bytes=aligned_bytes,
    )


@dataclass(frozen=True)
class MergedBatch:
    """The :class:`MergedChunks` of D documents as flat per-group arrays (fields and dtypes as there,
    token indices and bytes document-local), ``group_doc`` (int64, each group's document) and ``group_rows``
    (int64, D + 1); :meth:`document` gives one document's :class:`MergedChunks`."""

    group_rows: np.ndarray
    group_doc: np.ndarray
    chunk_start: np.ndarray
    chunk_end: np.ndarray
    teacher_start: np.ndarray
    teacher_end: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray
    num_chunks: np.ndarray
    teacher_chunk_logprob: np.ndarray
    teacher_chunk_boundary_logprob: np.ndarray
    gamma: float
    debias: bool

    @property
    def num_documents(self) -> int:
        return len(self.group_rows) - 1

    @property
    def num_groups(self) -> int:
        return len(self.group_doc)

    def groups_per_document(self) -> np.ndarray:
        return np.diff(self.group_rows)

    def document(self, d: int) -> MergedChunks:
        g = slice(int(self.group_rows[d]), int(self.group_rows[d + 1]))
        return MergedChunks(
            chunk_start=self.chunk_start[g].copy(),
            chunk_end=self.chunk_end[g].copy(),
            teacher_start=self.teacher_start[g].copy(),
            teacher_end=self.teacher_end[g].copy(),
            byte_start=self.byte_start[g].copy(),
            byte_end=self.byte_end[g].copy(),
            num_chunks=self.num_chunks[g].copy(),
            teacher_chunk_logprob=self.teacher_chunk_logprob[g].copy(),
            teacher_chunk_boundary_logprob=self.teacher_chunk_boundary_logprob[g].copy(),
            gamma=self.gamma,
            debias=self.debias,
        )


def merge_batch(
    alignment: AlignmentBatch,
    teacher_logprob,
    teacher_boundary_logprob,
    gamma: float = 0.1,
    debias: bool = True,
    *,
    document_names=None,
) -> MergedBatch:
    """:func:`merge_and_debias` for a whole :class:`AlignmentBatch`: flat teacher log-probs / σ (the
    documents' arrays concatenated, as the teacher ids given to :func:`align_batch`). Document d's groups
    equal ``merge_and_debias`` on document d, field by field (groups never cross a document boundary).
    Errors name the document by its index, or by ``document_names[d]``."""
    rows_t = alignment.teacher_rows
    gamma, logprob, sigma = check_merge_inputs(
        int(rows_t[-1]), teacher_logprob, teacher_boundary_logprob, gamma
    )
    num_docs = alignment.num_documents
    chunks = np.flatnonzero(alignment.valid)
    if len(chunks) == 0:
        empty = MergedChunks.empty(gamma, bool(debias))
        return MergedBatch(
            group_rows=np.zeros(num_docs + 1, dtype=np.int64),
            group_doc=np.zeros(0, dtype=np.int64),
            **{f.name: getattr(empty, f.name) for f in fields(MergedChunks)},
        )
    cdoc = alignment.chunk_doc[chunks]
    t_base = rows_t[cdoc]
    t_start = alignment.teacher_start[chunks]
    t_end = alignment.teacher_end[chunks]
    s_start = alignment.student_start[chunks]
    s_end = alignment.student_end[chunks]
    g_start = t_start + t_base  # global teacher token indices
    g_end = t_end + t_base

    terms = np.concatenate([logprob, [0.0]])
    terms[rows_t[:-1][np.diff(rows_t) > 0]] = 0.0  # position 0 of every document: no log-prob
    chunk_sum = np.add.reduceat(terms, np.column_stack([g_start, g_end]).ravel())[::2]
    if np.isnan(chunk_sum).any():
        c = int(np.flatnonzero(np.isnan(chunk_sum))[0])
        u = int(g_start[c] + np.flatnonzero(np.isnan(terms[g_start[c] : g_end[c]]))[0])
        d = int(cdoc[c])
        raise ValueError(
            f"teacher_logprob is NaN at position {u - int(rows_t[d])}, inside aligned chunk "
            f"{int(chunks[c] - alignment.chunk_rows[d])} ({_document(document_names, d)})"
        )
    chunk_ll = np.minimum(chunk_sum, 0.0)
    last_sigma = sigma[g_end - 1]
    if np.isnan(last_sigma).any():
        c = int(np.flatnonzero(np.isnan(last_sigma))[0])
        raise ValueError(
            f"teacher_boundary_logprob is NaN at position {int(t_end[c]) - 1}, the end of an aligned chunk "
            f"({_document(document_names, int(cdoc[c]))})"
        )
    adjacent = (t_start[1:] == t_end[:-1]) & (s_start[1:] == s_end[:-1]) & (cdoc[1:] == cdoc[:-1])
    first, last, group_ll = merge_groups(chunk_ll, last_sigma, adjacent, gamma)
    group_doc = cdoc[first]
    group_rows = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(group_doc, minlength=num_docs), out=group_rows[1:])
    return MergedBatch(
        group_rows=group_rows,
        group_doc=group_doc,
        chunk_start=s_start[first].astype(np.int32),
        chunk_end=(s_end[last] - 1).astype(np.int32),
        teacher_start=t_start[first].astype(np.int32),
        teacher_end=(t_end[last] - 1).astype(np.int32),
        byte_start=alignment.byte_start[chunks[first]].astype(np.int64),
        byte_end=alignment.byte_end[chunks[last]].astype(np.int64),
        num_chunks=(last - first + 1).astype(np.int32),
        teacher_chunk_logprob=group_ll.astype(np.float32),
        teacher_chunk_boundary_logprob=np.minimum(last_sigma[last], 0.0).astype(np.float32),
        gamma=gamma,
        debias=bool(debias),
    )


def coverage_batch(alignment: AlignmentBatch, merged: MergedBatch | None, text_bytes) -> CoverageStats:
    """The sum over the batch's documents of :func:`coverage_stats` (``text_bytes``: one per document)."""
    text_bytes = np.asarray(text_bytes, dtype=np.int64)
    if text_bytes.shape != (alignment.num_documents,):
        raise ValueError(
            f"text_bytes has shape {text_bytes.shape}, expected ({alignment.num_documents},) (one per document)"
        )
    return CoverageStats.of_chunks(
        alignment,
        documents=alignment.num_documents,
        text_bytes=int(text_bytes.sum()),
        groups=merged.num_groups if merged is not None else 0,
        teacher_tokens=int(alignment.teacher_rows[-1]),
        student_tokens=int(alignment.student_rows[-1]),
    )
