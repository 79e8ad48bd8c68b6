"""The rules of chunk alignment and γ-merging that the per-document reference
(:mod:`alm_pipeline.pipeline.align`) and the batched production path (:mod:`alm_pipeline.pipeline.align_batch`)
share: input checks, the ordering and pairing of special chunks, chunk bytes, validity and grouping. Each is
stated once here; :func:`~alm_pipeline.pipeline.align.align_document` and
:func:`~alm_pipeline.pipeline.align.merge_and_debias` document the rules.
"""

from __future__ import annotations

import numpy as np


def check_token_arrays(name: str, ids, offsets, is_special_tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side's per-token arrays as numpy (ids, offsets, special flags); raises :class:`ValueError` naming
    the array (``{name}_offsets``, ...) unless they are one-dimensional, of one length, integer offsets and
    bool flags."""
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
    return ids, offsets, special


def order_chunks(
    regular_start: np.ndarray, run_offset_t: np.ndarray, run_offset_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair the two sides' special runs by offset and interleave them with the regular chunks (see
    :func:`~alm_pipeline.pipeline.align.align_document`): returns (paired offsets, final index of each regular chunk, final index of each
    special chunk). The special chunk at o comes after the chunk ending at o and before the one starting at
    o: regular chunk k is preceded by the special chunks at offsets <= its start, special chunk j by the
    regular chunks starting before its offset."""
    paired = np.intersect1d(run_offset_t, run_offset_s, assume_unique=True)
    regular_index = np.arange(len(regular_start)) + np.searchsorted(paired, regular_start, side="right")
    special_index = np.arange(len(paired)) + np.searchsorted(regular_start, paired, side="left")
    return paired, regular_index, special_index


def special_run_chunks(paired: np.ndarray, special_index: np.ndarray, run_offset: np.ndarray) -> np.ndarray:
    """Per special run of one side (by its offset): its special chunk, or -1 when the other side has no run
    at that offset (the run is dropped)."""
    n_special = len(paired)
    j = np.searchsorted(paired, run_offset)
    run_paired = j < n_special
    run_paired[run_paired] = paired[j[run_paired]] == run_offset[run_paired]
    return np.where(run_paired, special_index[np.minimum(j, n_special - 1)] if n_special else -1, -1)


def chunk_bytes(
    regular_index: np.ndarray,
    regular_start: np.ndarray,
    bounds: np.ndarray,
    special_index: np.ndarray,
    paired: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk in final order: (byte start, byte end, is special); special chunks are empty at their offset."""
    n_chunks = len(regular_index) + len(special_index)
    byte_start = np.zeros(n_chunks, dtype=np.int64)
    byte_end = np.zeros(n_chunks, dtype=np.int64)
    is_special = np.zeros(n_chunks, dtype=bool)
    byte_start[regular_index] = regular_start
    byte_end[regular_index] = bounds
    byte_start[special_index] = paired
    byte_end[special_index] = paired
    is_special[special_index] = True
    return byte_start, byte_end, is_special


def chunk_validity(
    t_start: np.ndarray,
    t_end: np.ndarray,
    t_contiguous: np.ndarray,
    teacher_position0_is_content,
    s_start: np.ndarray,
    s_contiguous: np.ndarray,
    student_position0_is_content,
) -> np.ndarray:
    """Rules (a)-(c) of :func:`~alm_pipeline.pipeline.align.align_document`; ``*_position0_is_content``: the side's token 0 covers bytes or
    is special (one bool, or one per chunk for a batch)."""
    return (
        (t_end >= 2)  # (a) the last teacher token of the chunk is at position >= 1
        & ~((t_start == 0) & teacher_position0_is_content)  # (b)
        & ~((s_start == 0) & student_position0_is_content)  # (b)
        & t_contiguous  # (c)
        & s_contiguous  # (c)
    )


def check_merge_inputs(
    num_teacher_tokens: int, teacher_logprob, teacher_boundary_logprob, gamma: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """(γ as float, log-probs float64, σ float64); raises :class:`ValueError` for γ outside [0, 1] or arrays
    that do not have one entry per teacher token."""
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:  # also rejects NaN
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    logprob = np.asarray(teacher_logprob, dtype=np.float64)
    sigma = np.asarray(teacher_boundary_logprob, dtype=np.float64)
    n = num_teacher_tokens
    if logprob.shape != (n,):
        raise ValueError(
            f"teacher_logprob has shape {logprob.shape}, expected ({n},) (one per teacher token)"
        )
    if sigma.shape != (n,):
        raise ValueError(
            f"teacher_boundary_logprob has shape {sigma.shape}, expected ({n},) (one per teacher token)"
        )
    return gamma, logprob, sigma


def merge_groups(
    chunk_ll: np.ndarray, last_sigma: np.ndarray, adjacent: np.ndarray, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """γ-merging of consecutive valid chunks (see :func:`~alm_pipeline.pipeline.align.merge_and_debias`): per group, the position of its
    first and last member among the valid chunks and its log-likelihood min(0, Σ member C_T). ``adjacent[c]``
    says whether valid chunk c + 1 may join chunk c's group."""
    flag = np.exp(last_sigma) > gamma if gamma > 0 else last_sigma > -np.inf
    new_group = np.concatenate([[True], flag[:-1] | ~adjacent])
    first = np.flatnonzero(new_group)  # position (among valid chunks) of each group's first member
    last = np.concatenate([first[1:] - 1, [len(chunk_ll) - 1]])
    return first, last, np.minimum(np.add.reduceat(chunk_ll, first), 0.0)
