"""Chunk agreement between a student and a teacher cache, through an aligned set (:func:`chunk_agreement`).

For every aligned chunk (group) of an aligned set, the student's chunk log-likelihood
``C_S = min(0, Σ_{v ∈ chunk, v≥1} log p_S)`` (:meth:`EvalModel.token_stats` + :func:`student_chunk_stats`) against
the teacher's ``C_T`` read from the aligned set (so the teacher is not loaded), reported as

* the mean ``|C_S − C_T|`` (nats per chunk) and, debiased (reference §5), the mean ``|(C_S + σ_S) − (C_T + σ_T)|``;
* the mean chunk-level **binarised KL** (reference §6, the paper's ALM distance with f_KL at τ = 1): with the
  debiased chunk probabilities ``p = exp(C_T + σ_T)`` and ``q = exp(C_S + σ_S)`` (the main method's chunk
  probabilities, whatever the aligned set's own ``debias`` setting),
  ``KL(Bern(p) ‖ Bern(q)) = p·log(p/q) + (1 − p)·log((1 − p)/(1 − q))`` in nats per chunk, computed in float64 as
  the trainer's ``binary_kl`` distance at τ = 1 (its ε = 1e-6 shift of both log-probabilities keeps
  ``p, q < 1`` so that the second term is finite; the shift changes the value by a relative ~1e-6).

A student that is the teacher, with the teacher's tokenizer, scores 0 on all three.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from alm_pipeline.evaluation.models import EvalError, EvalModel
from alm_pipeline.modeling import length_batches, pad_batch
from alm_pipeline.pipeline.byteview import ByteView
from alm_pipeline.trainer.loss import ALMGroups, ALMLossConfig, alm_distance, student_chunk_stats

__all__ = ["BINARISED_KL", "ChunkAgreement", "chunk_agreement", "same_tokenizer"]

# the binarised KL of the module docstring: the ALM distance with f_KL at τ = 1, on debiased chunk probabilities
BINARISED_KL = ALMLossConfig(distance="binary_kl", tau=1.0, debias=True, eps=1e-6)


@dataclass(frozen=True)
class ChunkAgreement:
    """Agreement of student and teacher chunk log-likelihoods over the groups of an aligned set (nats)."""

    mean_abs_logprob_diff: float  # mean |C_S − C_T|
    mean_abs_debiased_logprob_diff: float  # mean |(C_S + σ_S) − (C_T + σ_T)|
    mean_logprob_diff: float  # mean (C_S − C_T): < 0 when the student finds the chunks less likely
    binarised_kl: float  # mean KL(Bern(exp(C_T + σ_T)) ‖ Bern(exp(C_S + σ_S))), τ = 1 (module docstring)
    teacher_mean_chunk_logprob: float
    student_mean_chunk_logprob: float
    groups: int
    docs: int

    def to_json(self) -> dict:
        return asdict(self)


def same_tokenizer(a: ByteView, b: ByteView) -> str | None:
    """``None`` if the two byte views tokenize identically as far as alignment cares, else a reason."""
    if a.fingerprint == b.fingerprint:
        return None
    if a.vocab_size != b.vocab_size:
        return f"vocabulary sizes differ ({a.vocab_size} vs {b.vocab_size})"
    if list(a.prefix_ids) != list(b.prefix_ids) or list(a.suffix_ids) != list(b.suffix_ids):
        return "special-token templates differ"
    if a.token_bytes != b.token_bytes or not np.array_equal(a.is_special, b.is_special):
        return "token byte strings differ"
    return None


@torch.inference_mode()
def chunk_agreement(
    model: EvalModel,
    aligned_path: str,
    *,
    batch_tokens: int = 8192,
    max_docs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[ChunkAgreement, dict]:
    """Mean |C_S − C_T| (and debiased, with σ on both sides) and the mean binarised KL (module docstring) of
    ``model`` against the teacher over the groups of an aligned set.

    The model's tokenizer must be the aligned set's student tokenizer (same byte strings, specials and
    template). Returns the agreement and a short description of the aligned set."""
    from alm_pipeline.cache.aligned import TRAINER_COLUMNS, open_aligned_set
    from alm_pipeline.cache.store import CacheIntegrityError
    from alm_pipeline.pipeline.byteview import load_byte_view

    try:
        aligned = open_aligned_set(aligned_path, verify=True)
    except (CacheIntegrityError, ValueError, OSError) as err:
        raise EvalError(str(err)) from None
    try:
        set_view = load_byte_view(aligned.tokenizer_dir)
    except (OSError, ValueError) as err:
        raise EvalError(f"{aligned.root}: cannot load the aligned set's student tokenizer ({err})") from None
    reason = same_tokenizer(model.view, set_view)
    if reason:
        raise EvalError(
            f"model {model.path} does not use the student tokenizer of aligned set {aligned.root} "
            f"({aligned.manifest['student_tokenizer']['name']}): {reason}"
        )
    pad_id = 0
    sums = np.zeros(6, dtype=np.float64)  # |ΔC|, |Δ(C+σ)|, ΔC, C_T, C_S, binarised KL
    groups_total, docs = 0, 0
    t0 = time.time()
    for table in aligned.iter_tables(columns=TRAINER_COLUMNS):
        if max_docs is not None:
            if docs >= max_docs:
                break
            table = table.slice(0, max_docs - docs)
        rows = table.to_pylist()
        seqs = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise EvalError(f"{aligned.root}: document {rows[i]['doc_id']!r} has no student token")
            if model.max_positions is not None and len(seq) > model.max_positions:
                raise EvalError(
                    f"{aligned.root}: document {rows[i]['doc_id']!r} has {len(seq)} student tokens, more than the "
                    f"model's {model.max_positions} positions; align with a smaller --max-student-length"
                )
        for batch in length_batches([len(s) for s in seqs], batch_tokens):
            batch_rows = [rows[i] for i in batch]
            groups = ALMGroups.from_documents(batch_rows, seq_lens=[len(seqs[i]) for i in batch])
            if groups.num_groups == 0:
                continue
            ids, mask = pad_batch([seqs[i] for i in batch], pad_id)
            stats = model.token_stats(ids, mask)
            student = student_chunk_stats(stats, groups.to(stats.token_logprob.device), dtype=torch.float64)
            c_s = student.logprob.cpu()
            s_s = student.boundary_logprob.cpu()
            c_t = groups.teacher_logprob.double()
            s_t = groups.teacher_boundary_logprob.double()
            sums += np.array(
                [
                    float((c_s - c_t).abs().sum()),
                    float(((c_s + s_s) - (c_t + s_t)).abs().sum()),
                    float((c_s - c_t).sum()),
                    float(c_t.sum()),
                    float(c_s.sum()),
                    float(alm_distance(c_t + s_t, c_s + s_s, BINARISED_KL).sum()),
                ]
            )
            groups_total += groups.num_groups
        docs += table.num_rows
        if progress:
            progress(f"chunk agreement: {docs} documents, {groups_total} chunks ({time.time() - t0:.1f}s)")
    if groups_total == 0:
        raise EvalError(f"{aligned.root}: no aligned chunk in {docs} document(s); nothing to compare")
    mean = sums / groups_total
    result = ChunkAgreement(
        mean_abs_logprob_diff=float(mean[0]),
        mean_abs_debiased_logprob_diff=float(mean[1]),
        mean_logprob_diff=float(mean[2]),
        binarised_kl=float(mean[5]),
        teacher_mean_chunk_logprob=float(mean[3]),
        student_mean_chunk_logprob=float(mean[4]),
        groups=groups_total,
        docs=docs,
    )
    info = {
        "path": str(aligned.root),
        "student_tokenizer": aligned.manifest["student_tokenizer"]["name"],
        "teacher": aligned.manifest["cache"].get("teacher"),
        "gamma": aligned.gamma,
        "debias": aligned.debias,
    }
    return result, info
