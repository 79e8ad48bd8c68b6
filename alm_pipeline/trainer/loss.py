"""Approximate Likelihood Matching (ALM) loss on precomputed teacher chunk statistics.

Reference: ``reference/alm-method.md`` §4 (chunk likelihoods), §5 (outcome-chunk debiasing), §6 (distance
and reduction), §14 (reference algorithm), §16.1 (normalisation defect to avoid).

Three steps, each a plain function so the trainer (and tests) can use them separately:

1. :func:`student_token_stats` (in :mod:`alm_pipeline.trainer.token_stats`, beside the trainer's fused
   variant) — per student token, ``ℓ_S[b, v] = log p_S(s_v | s_<v)`` (``0`` at ``v = 0`` and at padding,
   see ``token_mask``) and ``σ_S[b, v] = log Σ_{w∈B} p_S(w | s_≤v)``, both in fp32 from the student's logits and clipped at ``≤ 0``. Either from full logits, or from final hidden states + the LM
   head weight, in slices of positions with activation checkpointing so that no ``[B, T, V]`` fp32 tensor is
   ever materialised (forward or backward).
2. :func:`student_chunk_stats` — per group (chunk after γ-merging) ``C_S = Σ_{v=start..end, v≥1} ℓ_S`` as a
   segment sum over a float64 cumulative sum (no Python loop over groups), and ``σ_S`` at the group end.
3. :func:`alm_loss` — the binarised distance per group against the teacher's ``C_T`` / ``σ_T`` and the
   reduction ``Σ d / (number of valid groups in the global batch)``.

Teacher numbers are constants: they are detached here, gradients reach the student only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alm_pipeline.trainer.token_stats import StudentTokenStats, student_token_stats

T = TypeVar("T")

__all__ = [
    "ALMGroups",
    "ALMLossConfig",
    "ALMLossOutput",
    "Distance",
    "NextTokenLossOutput",
    "StudentChunkStats",
    "StudentTokenStats",
    "alm_distance",
    "alm_loss",
    "log1mexp",
    "next_token_loss",
    "student_chunk_stats",
    "student_token_stats",
]

Distance = Literal["binary_kl", "binary_ce", "binary_tvd", "binary_kl_tau_limit", "abs_tau_limit"]
DISTANCES: tuple[str, ...] = get_args(Distance)

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------
# configuration and containers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ALMLossConfig:
    """Settings of the ALM distance.

    Attributes:
        distance: per-group distance between teacher and student (debiased) chunk log-likelihoods
            ``y_T``, ``y_S`` (both ``≤ 0``); with ``a = y_T/τ − ε``, ``b = y_S/τ − ε``, ``p = eᵃ``, ``q = eᵇ``:

            * ``binary_kl`` (default): ``KL(Bern(p) ‖ Bern(q)) = p(a − b) + (1 − p)(log(1 − p) − log(1 − q))``,
              the paper's binarised f_KL; zero iff ``y_S = y_T``.
            * ``binary_ce``: ``−[p·b + (1 − p)·log(1 − q)]`` (tokenkit's default); equals ``binary_kl`` plus
              the teacher's binary entropy, so same gradients, but not zero at a perfect match.
            * ``binary_tvd``: ``|p − q| + |(1 − p) − (1 − q)| = 2|p − q|`` (binarised f_TVD).
            * ``binary_kl_tau_limit``: the τ → ∞ limit of ``binary_kl`` (paper App. A.2),
              ``(1/τ)[(ȳ_T − ȳ_S) + ȳ_T·log(ȳ_S/ȳ_T)]`` with ``ȳ = y − τε < 0`` (i.e. ``a − b + a·log(b/a)``),
              which is ``≥ 0`` and zero iff ``y_S = y_T``.
            * ``abs_tau_limit``: the τ → ∞ limit of ``binary_tvd``, ``(2/τ)|y_T − y_S|``.
        tau: temperature τ, default 5. The paper's runs used 100 (tuned for its v1 method); its Table 7
            ablation found τ ≈ 5 scored better (f_KL: τ=1 56.1, τ=5 56.3, τ=100 55.5, τ→∞ 55.2), the paper
            suggests τ = 5 "might be a better choice for future experiments", and our bytes-transfer experiment
            agreed (README, Measurements). The τ-limit distances are scaled by 1/τ so
            that they stay comparable to the finite-τ ones.
        debias: outcome-chunk debiasing (§5, tokenkit ``append_space``): ``y = C + σ`` at the group end for
            both models. Without it ``y = C``.
        eps: the shift ``ε`` of ``a`` and ``b`` (keeps ``p, q < 1`` so ``log(1 − p)`` is finite); must be > 0.
        compute_dtype: dtype of the per-group arithmetic (segment sums and distances). ``float64`` is the
            default: the work is O(#groups) and it removes cancellation in the cumulative sums.
    """

    distance: Distance = "binary_kl"
    tau: float = 5.0
    debias: bool = True
    eps: float = 1e-6
    compute_dtype: Literal["float32", "float64"] = "float64"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown ALM distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {self.compute_dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.compute_dtype == "float64" else torch.float32


def tensors_to(obj: T, device: torch.device | str) -> T:
    """A copy of the dataclass ``obj`` with every tensor field (and every field that has a ``.to(device)``,
    such as nested batches) moved to ``device``; other fields are kept."""
    moved = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            moved[f.name] = value.to(device, non_blocking=True)
        elif hasattr(value, "to") and dataclasses.is_dataclass(value):
            moved[f.name] = value.to(device)
    return dataclasses.replace(obj, **moved)


@dataclass(frozen=True)
class ALMGroups:
    """The groups (γ-merged chunks) of a micro-batch, flattened across documents; all ``[G]``.

    ``start`` / ``end`` are inclusive student token indices into row ``batch_index`` of the padded
    ``input_ids`` (so documents must be right-padded, or the indices already shifted by the caller).
    """

    batch_index: Tensor  # int64
    start: Tensor  # int64
    end: Tensor  # int64, inclusive
    teacher_logprob: Tensor  # float: C_T = Σ teacher ℓ over the group, ≤ 0
    teacher_boundary_logprob: Tensor  # float: σ_T at the group end, ≤ 0

    @property
    def num_groups(self) -> int:
        return int(self.batch_index.shape[0])

    def to(self, device: torch.device | str) -> ALMGroups:
        return tensors_to(self, device)

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Mapping[str, Any]],
        seq_lens: Sequence[int] | None = None,
    ) -> ALMGroups:
        """Flatten per-document group lists (row ``i`` of the batch = ``documents[i]``).

        Each document maps ``chunk_start``, ``chunk_end`` (inclusive student indices), ``teacher_chunk_logprob``
        and ``teacher_chunk_boundary_logprob`` to equal-length sequences / arrays (an optional ``doc_id`` is used
        in error messages). ``seq_lens`` (the unpadded student lengths) enables the bounds check
        ``end < seq_len``. Teacher values must be finite and ``≤ 0`` (tiny positive rounding up to 1e-4 is
        clipped to 0). Raises ``ValueError`` naming the document on bad input.
        """
        if seq_lens is not None and len(seq_lens) != len(documents):
            raise ValueError(f"seq_lens has {len(seq_lens)} entries for {len(documents)} documents")
        keys = ("chunk_start", "chunk_end", "teacher_chunk_logprob", "teacher_chunk_boundary_logprob")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        rows: list[np.ndarray] = []
        for i, doc in enumerate(documents):
            ref = f"document {i}" + (f" (doc_id {doc['doc_id']!r})" if "doc_id" in doc else "")
            missing = [k for k in keys if k not in doc]
            if missing:
                raise ValueError(f"{ref}: missing field(s) {', '.join(missing)}")
            start = np.asarray(doc["chunk_start"], dtype=np.int64).reshape(-1)
            end = np.asarray(doc["chunk_end"], dtype=np.int64).reshape(-1)
            c_t = np.asarray(doc["teacher_chunk_logprob"], dtype=np.float64).reshape(-1)
            s_t = np.asarray(doc["teacher_chunk_boundary_logprob"], dtype=np.float64).reshape(-1)
            if not (len(start) == len(end) == len(c_t) == len(s_t)):
                raise ValueError(
                    f"{ref}: group fields differ in length ({len(start)}, {len(end)}, {len(c_t)}, {len(s_t)})"
                )
            if len(start) and (start.min() < 0 or (start > end).any()):
                raise ValueError(f"{ref}: every group needs 0 <= chunk_start <= chunk_end")
            if seq_lens is not None and len(end) and end.max() >= seq_lens[i]:
                raise ValueError(
                    f"{ref}: chunk_end {int(end.max())} is outside the student sequence (length {seq_lens[i]})"
                )
            for name, arr in (("teacher_chunk_logprob", c_t), ("teacher_chunk_boundary_logprob", s_t)):
                if not np.isfinite(arr).all():
                    raise ValueError(f"{ref}: {name} has non-finite values")
                if (arr > 1e-4).any():
                    raise ValueError(f"{ref}: {name} has positive log-probabilities (max {arr.max():.3g})")
            parts["chunk_start"].append(start)
            parts["chunk_end"].append(end)
            parts["teacher_chunk_logprob"].append(np.minimum(c_t, 0.0))
            parts["teacher_chunk_boundary_logprob"].append(np.minimum(s_t, 0.0))
            rows.append(np.full(len(start), i, dtype=np.int64))

        def cat(arrs: list[np.ndarray], dtype: type) -> Tensor:
            return torch.from_numpy(np.concatenate(arrs).astype(dtype) if arrs else np.zeros(0, dtype=dtype))

        return cls(
            batch_index=cat(rows, np.int64),
            start=cat(parts["chunk_start"], np.int64),
            end=cat(parts["chunk_end"], np.int64),
            teacher_logprob=cat(parts["teacher_chunk_logprob"], np.float32),
            teacher_boundary_logprob=cat(parts["teacher_chunk_boundary_logprob"], np.float32),
        )


@dataclass(frozen=True)
class StudentChunkStats:
    """Per group (``[G]``): the student's chunk log-likelihood ``C_S`` and ``σ_S`` at the group end."""

    logprob: Tensor
    boundary_logprob: Tensor


@dataclass(frozen=True)
class ALMLossOutput:
    """Result of :func:`alm_loss`. Only ``loss`` carries gradient; the rest is detached, for metrics.

    Attributes:
        loss: ``loss_sum / max(num_groups_global, 1)`` (0-dim, dtype of the student stats: fp32, or fp64).
        loss_sum: ``Σ d`` over this micro-batch's groups.
        num_groups: groups in this micro-batch.
        num_groups_global: the denominator used.
        mean_abs_logprob_diff: mean ``|C_S − C_T|`` over this micro-batch's groups (without σ; 0 if none).
        distances: per-group distances ``d`` (``[G]``).
        empty: True when this micro-batch had no group (the loss is then an exact 0 that still back-props).
    """

    loss: Tensor
    loss_sum: Tensor
    num_groups: int
    num_groups_global: int
    mean_abs_logprob_diff: Tensor
    distances: Tensor
    empty: bool


@dataclass(frozen=True)
class NextTokenLossOutput:
    """Result of :func:`next_token_loss`: ``loss = loss_sum / max(num_tokens_global, 1)``."""

    loss: Tensor
    loss_sum: Tensor
    num_tokens: Tensor  # 0-dim int64, this micro-batch (a tensor: counting needs no host sync)
    num_tokens_global: Tensor | int


# ----------------------------------------------------------------------------------------------------------
# 2. chunk (group) sums
# ----------------------------------------------------------------------------------------------------------


def student_chunk_stats(
    stats: StudentTokenStats, groups: ALMGroups, dtype: torch.dtype = torch.float64
) -> StudentChunkStats:
    """``C_S[g] = min(0, Σ_{v=start..end, v≥1} ℓ_S[b, v])`` and ``σ_S[g] = σ_S[b, end]`` for every group.

    A segment sum over one cumulative sum per row (in ``dtype``, float64 by default, so the difference of
    two prefix sums loses nothing); gathers only, no loop over groups, no host sync. Masked positions
    (``v = 0``, padding) hold an exact 0 in ``token_logprob`` and so add nothing.
    """
    if stats.boundary_logprob is None:
        raise ValueError(
            "the ALM loss needs the student's σ (token statistics computed with boundary_logprobs)"
        )
    lp = stats.token_logprob.to(dtype)
    device = lp.device
    prefix = F.pad(torch.cumsum(lp, dim=1), (1, 0))  # prefix[b, t] = Σ_{v<t} ℓ[b, v]
    b = groups.batch_index.to(device)
    start = groups.start.to(device)
    end = groups.end.to(device)
    chunk = (prefix[b, end + 1] - prefix[b, start]).clamp(max=0.0)
    sigma = stats.boundary_logprob[b, end].to(dtype)
    return StudentChunkStats(logprob=chunk, boundary_logprob=sigma)


# ----------------------------------------------------------------------------------------------------------
# 3. distances and the loss
# ----------------------------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for ``x < 0``, stable at both ends (Mächler 2012).

    ``log1p(−eˣ)`` for ``x < −ln 2``, ``log(−expm1(x))`` otherwise. Each branch gets an input clamped to
    its own range so that the branch ``torch.where`` discards cannot inject inf/NaN into the gradient.
    """
    lo = torch.log1p(-torch.exp(torch.clamp(x, max=-_LN2)))
    hi = torch.log(-torch.expm1(torch.clamp(x, min=-_LN2)))
    return torch.where(x < -_LN2, lo, hi)


def alm_distance(y_teacher: Tensor, y_student: Tensor, config: ALMLossConfig) -> Tensor:
    """Per-group distance ``d(y_T, y_S)`` of :class:`ALMLossConfig` (elementwise, ``y ≤ 0`` log-probs)."""
    tau, eps = config.tau, config.eps
    y_t = y_teacher.clamp(max=0.0)
    y_s = y_student.clamp(max=0.0)
    if config.distance == "abs_tau_limit":
        return (2.0 / tau) * (y_t - y_s).abs()
    a = y_t / tau - eps
    b = y_s / tau - eps
    if config.distance == "binary_kl_tau_limit":
        # a − b + a·log(b/a) with a, b < 0; = (1/τ)[(ȳ_T − ȳ_S) + ȳ_T log(ȳ_S/ȳ_T)], ȳ = y − τε
        return a - b + a * (torch.log(-b) - torch.log(-a))
    p = torch.exp(a)
    if config.distance == "binary_tvd":
        return 2.0 * (p - torch.exp(b)).abs()
    log1m_q = log1mexp(b)
    if config.distance == "binary_ce":
        return -(p * b + (1.0 - p) * log1m_q)
    if config.distance == "binary_kl":
        return p * (a - b) + (1.0 - p) * (log1mexp(a) - log1m_q)
    raise AssertionError(config.distance)  # unreachable: validated in ALMLossConfig


def alm_loss(
    stats: StudentTokenStats,
    groups: ALMGroups,
    config: ALMLossConfig | None = None,
    *,
    num_groups_global: int | Tensor | None = None,
) -> ALMLossOutput:
    """The ALM loss of one micro-batch: ``Σ_g d(y_T[g], y_S[g]) / max(num_groups_global, 1)``.

    ``y = C (+ σ at the group end if config.debias)`` for both models; the teacher's numbers come from
    ``groups`` (detached), the student's from ``stats`` (:func:`student_token_stats`).

    ``num_groups_global`` is the number of groups over the whole optimiser step — all DDP workers and all
    gradient-accumulation micro-batches (the trainer all-reduces the counts); summing the returned ``loss``
    over those micro-batches and workers then gives exactly the mean over groups (reference §6, §16.1).
    ``None`` means this micro-batch alone. A micro-batch with no group returns an exact zero that is still
    connected to the student's graph (so DDP's gradient hooks fire) and ``empty=True``; the loss is never
    NaN from the reduction and never divides by zero. Raises ``ValueError`` if ``num_groups_global`` is
    smaller than the local group count (an inconsistent count).
    """
    config = config or ALMLossConfig()
    dtype = config.torch_dtype
    n_local = groups.num_groups
    if num_groups_global is None:
        n_global = n_local
    else:
        n_global = int(
            num_groups_global.item() if isinstance(num_groups_global, Tensor) else num_groups_global
        )
    if n_global < n_local:
        raise ValueError(f"num_groups_global={n_global} is smaller than this micro-batch's {n_local} groups")

    student = student_chunk_stats(stats, groups, dtype=dtype)
    device = student.logprob.device
    c_t = groups.teacher_logprob.detach().to(device=device, dtype=dtype)
    c_s = student.logprob
    if config.debias:
        y_t = c_t + groups.teacher_boundary_logprob.detach().to(device=device, dtype=dtype)
        y_s = c_s + student.boundary_logprob
    else:
        y_t, y_s = c_t, c_s
    dist = alm_distance(y_t, y_s, config)
    loss_sum = dist.sum()  # an empty sum is an exact 0 with a grad_fn reaching the student
    out_dtype = torch.promote_types(stats.token_logprob.dtype, torch.float32)
    loss = (loss_sum / max(n_global, 1)).to(out_dtype)
    with torch.no_grad():
        mean_abs = (c_s - c_t).abs().sum() / max(n_local, 1)
    return ALMLossOutput(
        loss=loss,
        loss_sum=loss_sum.detach().to(out_dtype),
        num_groups=n_local,
        num_groups_global=n_global,
        mean_abs_logprob_diff=mean_abs.to(out_dtype),
        distances=dist.detach(),
        empty=n_local == 0,
    )


# ----------------------------------------------------------------------------------------------------------
# next-token (SFT) loss
# ----------------------------------------------------------------------------------------------------------


def next_token_loss(
    stats: StudentTokenStats,
    *,
    loss_mask: Tensor | None = None,
    num_tokens_global: int | Tensor | None = None,
) -> NextTokenLossOutput:
    """Next-token cross-entropy of the student on its own tokens, from :func:`student_token_stats`.

    ``loss = Σ_{v: token_mask ∧ loss_mask} −ℓ_S[b, v] / max(num_tokens_global, 1)`` in fp32. ``loss_mask``
    ``[B, T]`` (optional) selects the predicted tokens that count (e.g. assistant turns only).
    ``num_tokens_global`` plays the same role as ``num_groups_global`` in :func:`alm_loss`; ``None`` means
    the tokens of this micro-batch. Zero tokens give an exact zero that still back-props.
    """
    mask = stats.token_mask
    if loss_mask is not None:
        mask = mask & loss_mask.to(device=mask.device).bool()
    nll = -stats.token_logprob.to(torch.promote_types(stats.token_logprob.dtype, torch.float32))
    loss_sum = torch.where(mask, nll, torch.zeros_like(nll)).sum()
    n_local = mask.sum()
    n_global: Tensor | int = n_local if num_tokens_global is None else num_tokens_global
    denom = (
        n_global.to(device=loss_sum.device, dtype=loss_sum.dtype).clamp(min=1.0)
        if isinstance(n_global, Tensor)
        else float(max(int(n_global), 1))
    )
    return NextTokenLossOutput(
        loss=loss_sum / denom, loss_sum=loss_sum.detach(), num_tokens=n_local, num_tokens_global=n_global
    )
