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

The same three steps exist for a whole batch of documents at once (:func:`align_batch`, :func:`merge_batch`,
:func:`coverage_batch`): the documents' token arrays are concatenated into flat arrays with row pointers and
the numpy work is done once per batch instead of once per document (a document is a few hundred tokens, so
per-document numpy call overhead dominates otherwise). The batched functions give exactly the per-document
results, field by field; the per-document functions are the reference.

Everything is vectorised numpy (``searchsorted`` on sorted offsets, cumulative sums, ``reduceat``): linear
passes over the n teacher and m student tokens plus binary searches, no sorting of token arrays and no
per-token Python loops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "Alignment",
    "CoverageStats",
    "MergedChunks",
    "AlignmentBatch",
    "MergedBatch",
    "align_batch",
    "align_document",
    "align_with_views",
    "coverage_batch",
    "coverage_stats",
    "merge_and_debias",
    "merge_batch",
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
    ids = np.asarray(ids)
    offsets = np.asarray(offsets)
    special = np.asarray(is_special_tok)
    for label, arr in (("ids", ids), ("offsets", offsets), ("is_special_tok", special)):
        if arr.ndim != 1:
            raise ValueError(f"{name}_{label} must be one-dimensional, got shape {arr.shape}")
    if len(offsets) != len(ids):
        raise ValueError(f"{name}_offsets has {len(offsets)} entries but {name}_ids has {len(ids)}")
    if len(special) != len(ids):
        raise ValueError(f"{name}_is_special_tok has {len(special)} entries but {name}_ids has {len(ids)}")
    if len(offsets) and not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{name}_offsets must be integers, got dtype {offsets.dtype}")
    if len(special) and special.dtype != bool:
        raise ValueError(f"{name}_is_special_tok must be bool, got dtype {special.dtype}")
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
    paired = np.intersect1d(run_offset_t, run_offset_s, assume_unique=True)
    n_special = len(paired)

    # Final chunk order: the special chunk at o comes after the chunk ending at o and before the one starting
    # at o. Regular chunk k is preceded by the special chunks at offsets <= its start; special chunk j by the
    # regular chunks starting before its offset.
    regular_index = np.arange(n_regular) + np.searchsorted(paired, regular_start, side="right")
    special_index = np.arange(n_special) + np.searchsorted(regular_start, paired, side="left")
    n_chunks = n_regular + n_special

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
        j = np.searchsorted(paired, run_offset)
        run_paired = j < n_special
        run_paired[run_paired] = paired[j[run_paired]] == run_offset[run_paired]
        run_chunk = np.where(run_paired, special_index[np.minimum(j, n_special - 1)] if n_special else -1, -1)
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

    byte_start = np.zeros(n_chunks, dtype=np.int64)
    byte_end = np.zeros(n_chunks, dtype=np.int64)
    is_special = np.zeros(n_chunks, dtype=bool)
    byte_start[regular_index] = regular_start
    byte_end[regular_index] = bounds
    byte_start[special_index] = paired
    byte_end[special_index] = paired
    is_special[special_index] = True

    def position0_is_content(side: _Side) -> bool:
        return bool(side.n and (side.covering[0] or side.special[0]))

    valid = (
        (t_end >= 2)  # (a) the last teacher token of the chunk is at position >= 1
        & ~((t_start == 0) & position0_is_content(teacher))  # (b)
        & ~((s_start == 0) & position0_is_content(student))  # (b)
        & t_contiguous  # (c)
        & s_contiguous  # (c)
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

    def teacher_target(self) -> np.ndarray:
        """The teacher's (debiased when ``debias``) group log-likelihood, float32."""
        if not self.debias:
            return self.teacher_chunk_logprob.copy()
        total = self.teacher_chunk_logprob.astype(np.float64) + self.teacher_chunk_boundary_logprob
        return total.astype(np.float32)


def _empty_merged(gamma: float, debias: bool) -> MergedChunks:
    i32, i64, f32 = (np.zeros(0, dtype=t) for t in (np.int32, np.int64, np.float32))
    return MergedChunks(i32, i32, i32, i32, i64, i64, i32, f32, f32, gamma, debias)


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
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:  # also rejects NaN
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    logprob = np.asarray(teacher_logprob, dtype=np.float64)
    sigma = np.asarray(teacher_boundary_logprob, dtype=np.float64)
    n = alignment.num_teacher_tokens
    if logprob.shape != (n,):
        raise ValueError(
            f"teacher_logprob has shape {logprob.shape}, expected ({n},) (one per teacher token)"
        )
    if sigma.shape != (n,):
        raise ValueError(
            f"teacher_boundary_logprob has shape {sigma.shape}, expected ({n},) (one per teacher token)"
        )
    chunks = np.flatnonzero(alignment.valid)
    if len(chunks) == 0:
        return _empty_merged(gamma, debias)
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
    flag = np.exp(last_sigma) > gamma if gamma > 0 else last_sigma > -np.inf

    adjacent = (t_start[1:] == t_end[:-1]) & (s_start[1:] == s_end[:-1])
    new_group = np.concatenate([[True], flag[:-1] | ~adjacent])
    first = np.flatnonzero(new_group)  # position (among valid chunks) of each group's first member
    last = np.concatenate([first[1:] - 1, [len(chunks) - 1]])

    group_ll = np.minimum(np.add.reduceat(chunk_ll, first), 0.0)
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
    valid = alignment.valid
    return CoverageStats(
        documents=1,
        text_bytes=int(text_bytes),
        covered_bytes=int((alignment.byte_end - alignment.byte_start)[valid].sum()),
        chunks=alignment.num_chunks,
        valid_chunks=int(valid.sum()),
        special_chunks=int((valid & alignment.is_special).sum()),
        groups=merged.num_groups if merged is not None else 0,
        teacher_tokens=alignment.num_teacher_tokens,
        student_tokens=alignment.num_student_tokens,
        teacher_tokens_in_chunks=int((alignment.teacher_end - alignment.teacher_start)[valid].sum()),
        student_tokens_in_chunks=int((alignment.student_end - alignment.student_start)[valid].sum()),
    )


# --------------------------------------------------------------------------------------------------------
# Batches of documents
#
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
    """Like :func:`_check_side`, per document; returns (rows, lengths, doc, local ends, special)."""
    ids = np.asarray(ids)
    offsets = np.asarray(offsets)
    special = np.asarray(is_special_tok)
    for label, arr in (("ids", ids), ("offsets", offsets), ("is_special_tok", special)):
        if arr.ndim != 1:
            raise ValueError(f"{name}_{label} must be one-dimensional, got shape {arr.shape}")
    if len(offsets) != len(ids):
        raise ValueError(f"{name}_offsets has {len(offsets)} entries but {name}_ids has {len(ids)}")
    if len(special) != len(ids):
        raise ValueError(f"{name}_is_special_tok has {len(special)} entries but {name}_ids has {len(ids)}")
    if len(offsets) and not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{name}_offsets must be integers, got dtype {offsets.dtype}")
    if len(special) and special.dtype != bool:
        raise ValueError(f"{name}_is_special_tok must be bool, got dtype {special.dtype}")
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
    paired = np.intersect1d(run_offset_t, run_offset_s, assume_unique=True)
    n_special = len(paired)

    regular_index = np.arange(n_regular) + np.searchsorted(paired, regular_start, side="right")
    special_index = np.arange(n_special) + np.searchsorted(regular_start, paired, side="left")
    n_chunks = n_regular + n_special
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
            j = np.searchsorted(paired, run_offset)
            run_paired = j < n_special
            run_paired[run_paired] = paired[j[run_paired]] == run_offset[run_paired]
            run_chunk = np.where(
                run_paired, special_index[np.minimum(j, n_special - 1)] if n_special else -1, -1
            )
            ids[members] = run_chunk[run_number]
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
    byte_start = np.empty(n_chunks, dtype=np.int64)
    byte_end = np.empty(n_chunks, dtype=np.int64)
    is_special = np.zeros(n_chunks, dtype=bool)
    byte_start[regular_index] = regular_start
    byte_end[regular_index] = bounds
    byte_start[special_index] = paired
    byte_end[special_index] = paired
    is_special[special_index] = True
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

    valid = (
        (t_end >= 2)
        & ~((t_start == 0) & position0_is_content(teacher))
        & ~((s_start == 0) & position0_is_content(student))
        & t_contiguous
        & s_contiguous
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
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    logprob = np.asarray(teacher_logprob, dtype=np.float64)
    sigma = np.asarray(teacher_boundary_logprob, dtype=np.float64)
    rows_t = alignment.teacher_rows
    n = int(rows_t[-1])
    if logprob.shape != (n,):
        raise ValueError(
            f"teacher_logprob has shape {logprob.shape}, expected ({n},) (one per teacher token)"
        )
    if sigma.shape != (n,):
        raise ValueError(
            f"teacher_boundary_logprob has shape {sigma.shape}, expected ({n},) (one per teacher token)"
        )
    num_docs = alignment.num_documents
    chunks = np.flatnonzero(alignment.valid)
    if len(chunks) == 0:
        empty = _empty_merged(gamma, bool(debias))
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
    flag = np.exp(last_sigma) > gamma if gamma > 0 else last_sigma > -np.inf

    adjacent = (t_start[1:] == t_end[:-1]) & (s_start[1:] == s_end[:-1]) & (cdoc[1:] == cdoc[:-1])
    new_group = np.concatenate([[True], flag[:-1] | ~adjacent])
    first = np.flatnonzero(new_group)
    last = np.concatenate([first[1:] - 1, [len(chunks) - 1]])
    group_ll = np.minimum(np.add.reduceat(chunk_ll, first), 0.0)
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
    valid = alignment.valid
    return CoverageStats(
        documents=alignment.num_documents,
        text_bytes=int(text_bytes.sum()),
        covered_bytes=int((alignment.byte_end - alignment.byte_start)[valid].sum()),
        chunks=alignment.num_chunks,
        valid_chunks=int(valid.sum()),
        special_chunks=int((valid & alignment.is_special).sum()),
        groups=merged.num_groups if merged is not None else 0,
        teacher_tokens=int(alignment.teacher_rows[-1]),
        student_tokens=int(alignment.student_rows[-1]),
        teacher_tokens_in_chunks=int((alignment.teacher_end - alignment.teacher_start)[valid].sum()),
        student_tokens_in_chunks=int((alignment.student_end - alignment.student_start)[valid].sum()),
    )
