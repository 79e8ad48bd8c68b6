"""Chunk alignment of two tokenizations of the same text, γ-merging and debiasing (pure numpy).

Reference: ``reference/alm-method.md`` §3 (alignment), §4 (chunk likelihoods), §5 (debiasing, γ), §14, §15.

Inputs are byte END offsets into the text's UTF-8 encoding, as produced by
:meth:`alm_pipeline.pipeline.byteview.ByteView.encode` and stored in the teacher cache: token ``u`` covers the
bytes ``[offsets[u-1], offsets[u])`` (``[0, offsets[0])`` for ``u = 0``); a token covering no bytes (BOS, EOS,
a SentencePiece dummy-prefix ``▁``) repeats the previous offset. Counting bytes from the start of the text on
both sides (never restarting a counter) is what keeps the two sides in sync (spec §16.4).

Three steps, each a function:

* :func:`align_document` -> :class:`Alignment`: minimal chunks (a chunk ends wherever both tokenizations have
  a token boundary at the same byte), special-token chunks, validity;
* :func:`merge_and_debias` -> :class:`MergedChunks`: teacher chunk log-likelihoods, γ-merging into groups,
  the teacher's boundary log-probability σ at each group end (the trainer adds it: C + σ);
* :func:`coverage_stats` -> :class:`CoverageStats`: how much of the text the chunks cover.

These per-document functions are the REFERENCE: the specification in code, what the tests compare against,
and what a caller aligning a single document uses. The production path (the align stage) runs the same
three steps on a whole batch of documents at once (:mod:`alm_pipeline.pipeline.align_batch`), which gives
exactly these results, field by field; the two share the rules of :mod:`alm_pipeline.pipeline.align_rules`
and the coverage counts (:meth:`CoverageStats.of_chunks`).

Everything is vectorised numpy (``searchsorted`` on sorted offsets, cumulative sums, ``reduceat``): linear
passes over the n teacher and m student tokens plus binary searches, no sorting of token arrays and no
per-token Python loops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from alm_pipeline.pipeline.align_rules import (
    check_merge_inputs,
    check_token_arrays,
    chunk_bytes,
    chunk_validity,
    merge_groups,
    order_chunks,
    special_run_chunks,
)

__all__ = [
    "Alignment",
    "CoverageStats",
    "MergedChunks",
    "align_document",
    "align_with_views",
    "coverage_stats",
    "merge_and_debias",
]


# --------------------------------------------------------------------------------------------------------
# Alignment


@dataclass(frozen=True)
class Alignment:
    """Chunks of one document, in text order.

    Per chunk ``c`` (arrays of length ``num_chunks``, int64 / bool):

    * ``teacher_start[c]``, ``teacher_end[c]``: teacher token range ``[start, end)``;
    * ``student_start[c]``, ``student_end[c]``: student token range ``[start, end)``;
    * ``byte_start[c]``, ``byte_end[c]``: the chunk's bytes ``[start, end)`` (empty for special chunks);
    * ``is_special[c]``: a chunk made of zero-byte special tokens paired across the two sides (BOS, EOS, ...);
    * ``valid[c]``: the chunk's two likelihoods are comparable (see :func:`align_document`).

    Per token: ``teacher_chunk_id`` / ``student_chunk_id`` (int32, -1 = in no chunk: a special token only one
    side has, or bytes only one side covers after truncation).
    """

    teacher_start: np.ndarray
    teacher_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray
    is_special: np.ndarray
    valid: np.ndarray
    teacher_chunk_id: np.ndarray
    student_chunk_id: np.ndarray
    teacher_bytes: int  # bytes covered by the teacher tokens (its last offset)
    student_bytes: int  # bytes covered by the student tokens
    aligned_bytes: int  # bytes covered by chunks: the last byte boundary both sides share

    @property
    def num_chunks(self) -> int:
        return len(self.byte_start)

    @property
    def num_teacher_tokens(self) -> int:
        return len(self.teacher_chunk_id)

    @property
    def num_student_tokens(self) -> int:
        return len(self.student_chunk_id)


@dataclass(frozen=True)
class _Side:
    name: str
    ends: np.ndarray  # int64 byte end offset per token
    starts: np.ndarray  # int64 byte start offset per token
    covering: np.ndarray  # bool: the token covers at least one byte
    special: np.ndarray  # bool: zero-byte special token

    @property
    def n(self) -> int:
        return len(self.ends)


def _check_side(name: str, ids, offsets, is_special_tok) -> _Side:
    ids, offsets, special = check_token_arrays(name, ids, offsets, is_special_tok)
    ends = offsets.astype(np.int64)
    if len(ends) and ends[0] < 0:
        raise ValueError(f"{name}_offsets must be >= 0, got {int(ends[0])} at position 0")
    decreasing = np.flatnonzero(np.diff(ends) < 0)
    if len(decreasing):
        u = int(decreasing[0]) + 1
        raise ValueError(
            f"{name}_offsets are not non-decreasing: position {u} has offset {int(ends[u])} after "
            f"{int(ends[u - 1])}"
        )
    starts = np.concatenate([np.zeros(min(len(ends), 1), dtype=np.int64), ends[:-1]])
    covering = ends > starts
    # A special token that (inconsistently) covers bytes is treated as an ordinary byte-covering token: the
    # bytes are what both sides must agree on. Special-ness only matters for zero-byte tokens.
    return _Side(name, ends, starts, covering, special.astype(bool) & ~covering)


def _special_runs(side: _Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per side, the special groups: for each byte offset o that has a zero-byte special token, the run of
    zero-byte tokens at o from the first one up to and including the LAST special one at o.

    Zero-byte non-special tokens at o after that last special (a dummy-prefix ``▁`` after BOS) are not part of
    the run: they belong to the chunk holding the next byte. Zero-byte non-special tokens at o *before* a
    special at o (never produced by real tokenizers) ride along with the special group so that token ranges
    stay contiguous. Returns (is_member per token, run start index, run offset) with runs in text order.
    """
    n = side.n
    zero = ~side.covering
    index = np.arange(n)
    # next zero-byte special at or after u (n if none), by a reversed running minimum
    candidate = np.where(side.special, index, n)
    next_special = np.minimum.accumulate(candidate[::-1])[::-1] if n else candidate
    member = zero & (next_special < n)
    member[member] = side.ends[next_special[member]] == side.ends[member]
    # Members at one offset are contiguous and two adjacent members always share their offset (a zero-byte
    # token repeats the previous offset), so runs are exactly the maximal blocks of members.
    previous = np.concatenate([[False], member[:-1]]) if n else member
    run_starts = np.flatnonzero(member & ~previous)
    return member, run_starts, side.ends[run_starts]


def align_document(
    teacher_ids,
    teacher_offsets,
    teacher_is_special_tok,
    student_ids,
    student_offsets,
    student_is_special_tok,
) -> Alignment:
    """Align one document's teacher and student tokenizations into minimal chunks (spec §3).

    ``*_is_special_tok`` are per-TOKEN bools (map the ids through ``ByteView.is_special``). Raises
    :class:`ValueError` naming the offending array for mismatched lengths or decreasing offsets; the caller
    adds the document id.

    Rules (spec §3.2-§3.3, §16):

    * Regular chunks: the common byte boundaries B are the end offsets that byte-covering tokens of BOTH sides
      have. Chunk k covers ``[B[k-1], B[k])`` (``B[-1] = 0``), so chunks are minimal by construction. Each
      byte-covering token goes to the chunk holding its first byte (``searchsorted`` of its start offset).
    * Zero-byte non-special tokens (a dummy-prefix ``▁``) go to the chunk holding the next byte, i.e. the
      same ``searchsorted`` of their offset; with no next byte (end of the sequence) they are in no chunk.
    * Zero-byte special tokens are grouped by offset (see :func:`_special_runs`). A group on the teacher and a
      group on the student at the same offset o pair into one special chunk of their own, placed between the
      chunk ending at o and the chunk starting at o (o is then always a common boundary). This is the
      BOS↔BOS pairing at o = 0 and the EOS↔EOS pairing at the end when both sides cover the text up to the
      same end; a group that only one side has at its offset (a lone BOS, or an EOS after a side that was
      truncated, or after bytes the other side does not reach) is dropped (in no chunk). Pairing is by
      position, never by content (spec §16.2: the EOS chunk is kept). Groups in the middle of the text
      (chat-template tokens, if a caller produces them) follow the same rule.
    * Truncation: bytes after the last common boundary (covered by only one side) get no chunk: the
      trailing unfinished chunk is discarded (spec §3.3).

    Validity, a refinement of spec §4 / §14 (which only asks for a teacher token at position >= 1): a chunk is
    valid iff (a) it holds at least one teacher token at position >= 1, (b) on neither side does it hold
    position 0 when that token is byte-covering or special, and (c) its token ranges contain no token that
    belongs to no chunk. (b): position 0 has no log-prob on either side, so if one side lacks a BOS its
    first chunk's likelihood misses the first token there while the other side's does not - comparing would
    be biased; for a special chunk the special tokens are the content being compared, so the same applies
    (e.g. the single special chunk of an empty text, [BOS, EOS] ↔ [EOS]). A zero-byte non-special token at
    position 0 (dummy prefix without BOS) is only context and does not invalidate. (c): a one-sided special
    token inside a chunk (not at a common boundary) would put a likelihood in one side's sum that the other
    side lacks; byte-view encodings never produce this.
    """
    teacher = _check_side("teacher", teacher_ids, teacher_offsets, teacher_is_special_tok)
    student = _check_side("student", student_ids, student_offsets, student_is_special_tok)

    # Common boundaries: the end offsets that byte-covering tokens of both sides have. Ends of byte-covering
    # tokens are strictly increasing on each side, so one binary search per student end finds them, sorted
    # (no per-byte table: a corrupt offset cannot make it allocate memory proportional to its value).
    ends_t = teacher.ends[teacher.covering]
    ends_s = student.ends[student.covering]
    at = np.minimum(np.searchsorted(ends_t, ends_s), max(len(ends_t) - 1, 0))
    bounds = ends_s[ends_t[at] == ends_s] if len(ends_t) else ends_s[:0]
    n_regular = len(bounds)
    regular_start = np.concatenate([[0], bounds[:-1]]).astype(np.int64) if n_regular else bounds

    member_t, runs_t, run_offset_t = _special_runs(teacher)
    member_s, runs_s, run_offset_s = _special_runs(student)
    # Special groups pair by offset. A zero-byte token at offset o > 0 follows a byte-covering token ending at
    # o, so a group that both sides have at o always sits at a common boundary (and o = 0 is the start): the
    # pair lies between two chunks, never inside one. A side truncated before o has no group there.
    paired, regular_index, special_index = order_chunks(regular_start, run_offset_t, run_offset_s)
    n_chunks = n_regular + len(paired)

    # chunk id per chunk slot: regular chunk k -> regular_index[k], past the last one -> -1; special group r
    # of a side -> its special chunk, or -1 when it is not paired (dropped)
    regular_lookup = np.concatenate([regular_index, [-1]])

    def chunk_ids(
        side: _Side, member: np.ndarray, run_starts: np.ndarray, run_offset: np.ndarray
    ) -> np.ndarray:
        ids = np.full(side.n, -1, dtype=np.int64)
        ordinary = ~member
        # the chunk holding the token's first byte (for a zero-byte token: the next byte); k = n_regular means
        # beyond the last common boundary (bytes only this side covers): no chunk
        k = np.searchsorted(bounds, side.starts[ordinary], side="right")
        ids[ordinary] = regular_lookup[k]
        run_chunk = special_run_chunks(paired, special_index, run_offset)
        is_start = np.zeros(side.n, dtype=bool)
        is_start[run_starts] = True
        ids[member] = run_chunk[np.cumsum(is_start)[member] - 1]
        return ids

    tid = chunk_ids(teacher, member_t, runs_t, run_offset_t)
    sid = chunk_ids(student, member_s, runs_s, run_offset_s)

    def ranges(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Chunk ids are non-decreasing along the assigned tokens, so each chunk's tokens are found by
        # searchsorted; "contiguous" is False where the range also contains tokens that are in no chunk.
        assigned = np.flatnonzero(ids >= 0)
        sorted_ids = ids[assigned]
        chunk = np.arange(n_chunks)
        lo = np.searchsorted(sorted_ids, chunk, side="left")
        hi = np.searchsorted(sorted_ids, chunk, side="right")
        if n_chunks == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=bool)
        start = assigned[lo]
        end = assigned[hi - 1] + 1
        return start.astype(np.int64), end.astype(np.int64), (end - start) == (hi - lo)

    t_start, t_end, t_contiguous = ranges(tid)
    s_start, s_end, s_contiguous = ranges(sid)

    byte_start, byte_end, is_special = chunk_bytes(
        regular_index, regular_start, bounds, special_index, paired
    )

    def position0_is_content(side: _Side) -> bool:
        return bool(side.n and (side.covering[0] or side.special[0]))

    valid = chunk_validity(
        t_start,
        t_end,
        t_contiguous,
        position0_is_content(teacher),
        s_start,
        s_contiguous,
        position0_is_content(student),
    )
    return Alignment(
        teacher_start=t_start,
        teacher_end=t_end,
        student_start=s_start,
        student_end=s_end,
        byte_start=byte_start,
        byte_end=byte_end,
        is_special=is_special,
        valid=valid,
        teacher_chunk_id=tid.astype(np.int32),
        student_chunk_id=sid.astype(np.int32),
        teacher_bytes=int(teacher.ends[-1]) if teacher.n else 0,
        student_bytes=int(student.ends[-1]) if student.n else 0,
        aligned_bytes=int(bounds[-1]) if n_regular else 0,
    )


def align_with_views(teacher_ids, teacher_offsets, teacher_view, student_ids, student_offsets, student_view):
    """:func:`align_document` with the per-token special flags looked up in the two ``ByteView``\\ s."""

    def special(ids, view, name):
        ids = np.asarray(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(view.is_special)):
            raise ValueError(
                f"{name}_ids hold id {int(ids.min() if ids.min() < 0 else ids.max())} outside the vocabulary "
                f"of {view.name!r} (size {len(view.is_special)})"
            )
        return view.is_special[ids] if len(ids) else np.zeros(0, dtype=bool)

    return align_document(
        teacher_ids,
        teacher_offsets,
        special(teacher_ids, teacher_view, "teacher"),
        student_ids,
        student_offsets,
        special(student_ids, student_view, "student"),
    )


# --------------------------------------------------------------------------------------------------------
# γ-merging and debiasing


@dataclass(frozen=True)
class MergedChunks:
    """The groups (merged chunks) of one document, in text order - what the aligned set stores.

    Token indices are INCLUSIVE (first and last token of the group), byte ranges half-open:

    * ``chunk_start`` / ``chunk_end`` (int32): student index of the group's first / last token;
    * ``teacher_start`` / ``teacher_end`` (int32): teacher index of the group's first / last token;
    * ``byte_start`` / ``byte_end`` (int64): the group's bytes ``[start, end)``;
    * ``num_chunks`` (int32): minimal chunks merged into the group;
    * ``teacher_chunk_logprob`` (float32): Σ of the members' C_T, clipped at 0 - NOT including σ;
    * ``teacher_chunk_boundary_logprob`` (float32): σ_T at the group's last teacher token, clipped at 0.

    Debiasing (spec §5, ``append_space``) is applied by the trainer, as C + σ for both models when ``debias``
    is on; the aligned set stores both parts so the trainer can also run without it. ``teacher_target()``
    gives the teacher side of that sum.
    """

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
    def num_groups(self) -> int:
        return len(self.chunk_start)

    @classmethod
    def empty(cls, gamma: float, debias: bool) -> MergedChunks:
        """No groups (a document without a valid chunk)."""
        i32, i64, f32 = (np.zeros(0, dtype=t) for t in (np.int32, np.int64, np.float32))
        return cls(i32, i32, i32, i32, i64, i64, i32, f32, f32, gamma, debias)

    def teacher_target(self) -> np.ndarray:
        """The teacher's (debiased when ``debias``) group log-likelihood, float32."""
        if not self.debias:
            return self.teacher_chunk_logprob.copy()
        total = self.teacher_chunk_logprob.astype(np.float64) + self.teacher_chunk_boundary_logprob
        return total.astype(np.float32)


def merge_and_debias(
    alignment: Alignment,
    teacher_logprob,
    teacher_boundary_logprob,
    gamma: float = 0.1,
    debias: bool = True,
) -> MergedChunks:
    """Teacher chunk log-likelihoods and γ-merging of the valid chunks into groups (spec §4, §5, §14).

    * C_T[c] = min(0, Σ ℓ over the chunk's teacher tokens at positions >= 1), summed in float64 (position 0
      has no log-prob; the cache stores NaN there, which is never read).
    * flag[c] = exp(σ_T[last teacher token of c]) > γ, strict, teacher only (spec §15.1). γ = 0 means "no
      merging": mathematically exp(σ) > 0 for every finite σ, but exp underflows to 0 below σ ≈ -745 in
      float64, so for γ = 0 the flag is computed as σ > -inf instead (a σ of exactly -inf, a boundary
      probability of 0, still merges).
    * Invalid chunks are skipped entirely when forming groups (spec §15.7): they never join a group and their
      σ is never read, so they cannot move group boundaries. A group = consecutive valid chunks up to and
      including a flagged chunk; the trailing group after the last flagged chunk is kept (spec §15.2, its σ
      may be <= γ).
    * Refinement: a group is also closed where the next valid chunk is not adjacent to it in BOTH token
      sequences (an invalid chunk or a dropped one-sided special token lies between), so that the student
      span ``[chunk_start, chunk_end]`` holds exactly the members' student tokens and the trainer's segment
      sum matches the teacher's. Byte-view encodings only have invalid chunks / dropped tokens outside the
      span of the valid chunks (BOS, the first chunk, the truncated tail), so there this never changes the
      grouping.
    * Group log-likelihood = min(0, Σ member C_T); group σ = min(0, σ_T at the group's last teacher token)
      (σ is a log-probability, spec §5 clips it at 0).

    ``debias`` does not change the numbers stored; it is recorded and used by :meth:`MergedChunks.teacher_target`
    and by the trainer. Raises :class:`ValueError` for mismatched lengths, γ outside [0, 1], or a NaN
    log-prob / σ where one is used.
    """
    gamma, logprob, sigma = check_merge_inputs(
        alignment.num_teacher_tokens, teacher_logprob, teacher_boundary_logprob, gamma
    )
    chunks = np.flatnonzero(alignment.valid)
    if len(chunks) == 0:
        return MergedChunks.empty(gamma, debias)
    t_start = alignment.teacher_start[chunks]
    t_end = alignment.teacher_end[chunks]
    s_start = alignment.student_start[chunks]
    s_end = alignment.student_end[chunks]

    # Chunk sums by reduceat over [start, end) pairs (exact per-segment sums, no cumsum differences). The
    # extra trailing 0 makes index n addressable; odd entries (the gaps between chunks) are discarded.
    terms = np.concatenate([logprob, [0.0]])
    terms[0] = 0.0  # position 0: no log-prob
    chunk_sum = np.add.reduceat(terms, np.column_stack([t_start, t_end]).ravel())[::2]
    if np.isnan(chunk_sum).any():
        c = int(np.flatnonzero(np.isnan(chunk_sum))[0])
        u = int(t_start[c] + np.flatnonzero(np.isnan(terms[t_start[c] : t_end[c]]))[0])
        raise ValueError(f"teacher_logprob is NaN at position {u}, inside aligned chunk {int(chunks[c])}")
    chunk_ll = np.minimum(chunk_sum, 0.0)
    last_sigma = sigma[t_end - 1]
    if np.isnan(last_sigma).any():
        u = int(t_end[np.flatnonzero(np.isnan(last_sigma))[0]] - 1)
        raise ValueError(f"teacher_boundary_logprob is NaN at position {u}, the end of an aligned chunk")
    adjacent = (t_start[1:] == t_end[:-1]) & (s_start[1:] == s_end[:-1])
    first, last, group_ll = merge_groups(chunk_ll, last_sigma, adjacent, gamma)
    return MergedChunks(
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


# --------------------------------------------------------------------------------------------------------
# Coverage statistics


@dataclass
class CoverageStats:
    """How much of the text the aligned chunks cover; sums, so that :meth:`add` accumulates documents."""

    documents: int = 0
    text_bytes: int = 0
    covered_bytes: int = 0  # bytes inside valid chunks
    chunks: int = 0  # all minimal chunks, valid or not
    valid_chunks: int = 0
    special_chunks: int = 0  # valid special chunks (e.g. EOS↔EOS)
    groups: int = 0
    teacher_tokens: int = 0
    student_tokens: int = 0
    teacher_tokens_in_chunks: int = 0  # teacher tokens inside valid chunks
    student_tokens_in_chunks: int = 0

    def add(self, other: CoverageStats) -> CoverageStats:
        """Accumulate ``other`` into ``self`` (in place) and return ``self``."""
        for f in fields(self):  # plain attribute access: asdict() deep-copies and is slow per document
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def coverage(self) -> float:
        """Bytes covered by valid chunks / bytes of text (1.0 for no text at all)."""
        return self.covered_bytes / self.text_bytes if self.text_bytes else 1.0

    @property
    def mean_chunk_bytes(self) -> float:
        return self.covered_bytes / self.valid_chunks if self.valid_chunks else 0.0

    @property
    def mean_chunk_teacher_tokens(self) -> float:
        return self.teacher_tokens_in_chunks / self.valid_chunks if self.valid_chunks else 0.0

    @property
    def mean_chunk_student_tokens(self) -> float:
        return self.student_tokens_in_chunks / self.valid_chunks if self.valid_chunks else 0.0

    @property
    def mean_group_bytes(self) -> float:
        return self.covered_bytes / self.groups if self.groups else 0.0

    @classmethod
    def of_chunks(
        cls, chunks, *, documents: int, text_bytes: int, groups: int, teacher_tokens: int, student_tokens: int
    ) -> CoverageStats:
        """The counts of ``chunks`` (an :class:`Alignment`, or a batch of them: per-chunk byte and token
        ranges, ``valid``, ``is_special``) with the given per-text totals."""
        valid = chunks.valid
        return cls(
            documents=documents,
            text_bytes=text_bytes,
            covered_bytes=int((chunks.byte_end - chunks.byte_start)[valid].sum()),
            chunks=len(valid),
            valid_chunks=int(valid.sum()),
            special_chunks=int((valid & chunks.is_special).sum()),
            groups=groups,
            teacher_tokens=teacher_tokens,
            student_tokens=student_tokens,
            teacher_tokens_in_chunks=int((chunks.teacher_end - chunks.teacher_start)[valid].sum()),
            student_tokens_in_chunks=int((chunks.student_end - chunks.student_start)[valid].sum()),
        )

    def as_dict(self) -> dict:
        """Counts plus the derived ratios (for manifests and logs)."""
        out: dict = asdict(self)
        for name in (
            "coverage",
            "mean_chunk_bytes",
            "mean_chunk_teacher_tokens",
            "mean_chunk_student_tokens",
            "mean_group_bytes",
        ):
            out[name] = getattr(self, name)
        return out


def coverage_stats(alignment: Alignment, merged: MergedChunks | None, text_bytes: int) -> CoverageStats:
    """Coverage of one document; ``text_bytes`` = length of the document's UTF-8 text (before truncation,
    so that truncation shows up as lost coverage)."""
    return CoverageStats.of_chunks(
        alignment,
        documents=1,
        text_bytes=int(text_bytes),
        groups=merged.num_groups if merged is not None else 0,
        teacher_tokens=alignment.num_teacher_tokens,
        student_tokens=alignment.num_student_tokens,
    )
