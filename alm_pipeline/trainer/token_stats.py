"""Per-token student statistics for the ALM loss: ``ℓ_S`` and ``σ_S`` from the student's full softmax, fp32.

* ``ℓ_S[b, v] = log p_S(s_v | s_<v)`` (``0`` at ``v = 0`` and at padding, see ``token_mask``);
* ``σ_S[b, v] = log Σ_{w∈B} p_S(w | s_≤v)`` (B: the student's boundary tokens, reference §5);

both clipped at ``≤ 0``, computed from final hidden states + the LM head (or full logits) in slices of positions,
so that no ``[B, T, V]`` fp32 tensor is ever materialised. Two implementations with the same outputs (tested
equal):

* :func:`student_token_stats` — the reference: plain autograd ops per slice, each slice activation-checkpointed.
* :func:`fused_token_stats` — what the trainer runs: per slice two max-shifted logsumexps (all logits, boundary
  logits) and a hand-written backward (:class:`_LMHeadStats`), about the cost of a plain cross-entropy.

Both work in log space (``σ = lse_B − lse``), so σ and its gradients stay finite on peaked distributions where
``p(B)`` underflows fp32 (σ < ≈ −88; tested down to σ = −300).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alm_pipeline.modeling import apply_softcap, head_rows, postprocess_logits

__all__ = ["StudentTokenStats", "fused_token_stats", "student_token_stats"]


@dataclass(frozen=True)
class StudentTokenStats:
    """Per-token student statistics, all ``[B, T]``.

    Attributes:
        token_logprob: ``ℓ_S[b, v] = log p_S(s_v | s_<v)``, fp32 (fp64 for fp64 inputs), ``≤ 0``; exactly 0 where ``token_mask`` is
            False (position 0, padding, or a token whose predecessor is padding).
        boundary_logprob: ``σ_S[b, v] = log Σ_{w∈B} p_S(w | s_≤v)``, fp32, ``≤ 0``; 0 at padding. ``None`` when
            it was not asked for (:func:`fused_token_stats` with ``boundary_logprobs=False``).
        token_mask: bool, where ``token_logprob`` is defined (``v ≥ 1`` and positions ``v−1``, ``v`` unpadded).
        position_mask: bool, the attention mask (where ``boundary_logprob`` is defined).
    """

    token_logprob: Tensor
    boundary_logprob: Tensor | None
    token_mask: Tensor
    position_mask: Tensor


@dataclass(frozen=True)
class _Layout:
    """Where the predictions of a ``[B, T]`` batch are: every unpadded position ``flat_pos`` (flat index) and the
    id of the token it predicts (0 where there is none: last position, or the next position is padding)."""

    pos_mask: Tensor  # [B, T] bool: unpadded positions
    has_next: Tensor  # [B, T] bool: position p is unpadded and so is p + 1
    next_ids: Tensor  # [B, T] the token at p + 1 (0 where has_next is False)
    flat_pos: Tensor  # [N] flat indices of the unpadded positions

    @classmethod
    def of(
        cls, input_ids: Tensor, attention_mask: Tensor | None, vocab: int, device: torch.device
    ) -> _Layout:
        bsz, seq = input_ids.shape
        input_ids = input_ids.to(device)
        pos_mask = (
            torch.ones(bsz, seq, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.to(device=device).bool()
        )
        next_ids = torch.zeros_like(input_ids)
        next_ids[:, :-1] = input_ids[:, 1:]
        has_next = torch.zeros_like(pos_mask)
        has_next[:, :-1] = pos_mask[:, :-1] & pos_mask[:, 1:]
        if bool(((next_ids < 0) | (next_ids >= vocab))[has_next].any()):
            raise ValueError(f"input_ids contain ids outside the student vocabulary [0, {vocab})")
        next_ids = torch.where(has_next, next_ids, torch.zeros_like(next_ids))
        return cls(pos_mask, has_next, next_ids, pos_mask.reshape(-1).nonzero().squeeze(-1))

    def assemble(self, target: Tensor, sigma: Tensor | None) -> StudentTokenStats:
        """Per-position results (``[N]``, in ``flat_pos`` order, unclipped) as :class:`StudentTokenStats`:
        position p's target log-prob is ℓ at p + 1 (kept only when p + 1 is a real token); both clipped ``≤ 0``
        (``sigma`` None: no σ)."""
        bsz, seq = self.pos_mask.shape
        target = target.clamp(max=0.0)
        zeros = torch.zeros(bsz * seq, dtype=target.dtype, device=target.device)
        keep = self.has_next.reshape(-1).index_select(0, self.flat_pos)
        token_lp = zeros.index_copy(0, (self.flat_pos + 1)[keep], target[keep])
        boundary_lp = None
        if sigma is not None:
            boundary_lp = zeros.index_copy(0, self.flat_pos, sigma.clamp(max=0.0)).view(bsz, seq)
        token_mask = torch.zeros_like(self.pos_mask)
        token_mask[:, 1:] = self.has_next[:, :-1]
        return StudentTokenStats(
            token_logprob=token_lp.view(bsz, seq),
            boundary_logprob=boundary_lp,
            token_mask=token_mask,
            position_mask=self.pos_mask,
        )


def _as_bool_mask(boundary_mask: Tensor | np.ndarray | Sequence[bool], device: torch.device) -> Tensor:
    mask = torch.as_tensor(
        np.asarray(boundary_mask) if not isinstance(boundary_mask, Tensor) else boundary_mask
    )
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(
            f"boundary_mask must be a 1-D bool vector over the vocabulary, got {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError("boundary_mask selects no token; σ would be log 0")
    return mask.to(device)


def _rows_stats(
    logits: Tensor, next_ids: Tensor, boundary_ids: Tensor, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """For rows of logits ``[n, V]``: ``(log p(next_ids), log p(B))`` in fp32 (fp64 stays fp64), unclipped."""
    logits = postprocess_logits(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - lse
    boundary = torch.logsumexp(logits.index_select(-1, boundary_ids), dim=-1) - lse
    return target, boundary


def _hidden_rows_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    next_ids: Tensor,
    boundary_ids: Tensor,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    # The matmul runs in the weight's dtype, as the model's own LM head would; softmax statistics in fp32.
    return _rows_stats(F.linear(hidden.to(weight.dtype), weight, bias), next_ids, boundary_ids, softcap)


def student_token_stats(
    input_ids: Tensor,
    boundary_mask: Tensor | np.ndarray | Sequence[bool],
    *,
    logits: Tensor | None = None,
    hidden_states: Tensor | None = None,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit_softcap: float | None = None,
    slice_size: int = 1024,
    checkpoint_slices: bool = True,
) -> StudentTokenStats:
    """Per-token student ``ℓ_S`` and ``σ_S`` (fp32, or fp64 for fp64 inputs; clipped ``≤ 0``), differentiable.

    Give either ``logits`` ``[B, T, V']`` or ``hidden_states`` ``[B, T, H]`` + ``lm_head_weight`` ``[V', H]``
    (+ ``lm_head_bias``). The vocabulary is ``V = len(boundary_mask) ≤ V'``; logit columns ``≥ V`` are padded
    vocabulary entries and are excluded from the softmax. ``logit_softcap`` applies Gemma-2 style
    ``c·tanh(z/c)`` before the softmax.

    The unpadded positions (``attention_mask``; all if None) are processed ``slice_size`` positions at a time;
    each slice is computed in fp32 and reduced to two numbers per position immediately. With
    ``checkpoint_slices`` (default) and gradients enabled, every slice is activation-checkpointed, so the
    backward pass also holds one slice of logits at a time (it recomputes them): peak extra memory is
    ``O(slice_size · V)`` instead of ``O(B · T · V)``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    if (logits is None) == (hidden_states is None):
        raise ValueError("give exactly one of logits= or hidden_states= (+ lm_head_weight=)")
    if slice_size < 1:
        raise ValueError(f"slice_size must be >= 1, got {slice_size}")
    bsz, seq = input_ids.shape
    source = logits if logits is not None else hidden_states
    assert source is not None
    device = source.device
    if tuple(source.shape[:2]) != (bsz, seq):
        raise ValueError(f"logits/hidden_states {tuple(source.shape)} do not match input_ids {(bsz, seq)}")
    bmask = _as_bool_mask(boundary_mask, device)
    vocab = bmask.shape[0]
    boundary_ids = bmask.nonzero().squeeze(-1)

    if hidden_states is not None:
        if lm_head_weight is None:
            raise ValueError("hidden_states= needs lm_head_weight=")
        weight, bias = head_rows(lm_head_weight, lm_head_bias, vocab, hidden=hidden_states.shape[-1])
        rows = hidden_states.reshape(bsz * seq, -1)
    else:
        assert logits is not None
        if logits.shape[-1] < vocab:
            raise ValueError(f"logits have {logits.shape[-1]} columns but boundary_mask has {vocab} entries")
        rows = logits.reshape(bsz * seq, -1)[:, :vocab]

    lay = _Layout.of(input_ids, attention_mask, vocab, device)
    flat_next = lay.next_ids.reshape(-1)
    use_ckpt = checkpoint_slices and torch.is_grad_enabled()
    targets: list[Tensor] = []
    sigmas: list[Tensor] = []
    # (an all-padding batch still runs one empty slice, so the outputs stay connected to the student)
    for lo in range(0, max(lay.flat_pos.shape[0], 1), slice_size):
        idx = lay.flat_pos[lo : lo + slice_size]
        nxt = flat_next.index_select(0, idx)
        x = rows.index_select(0, idx)
        if hidden_states is not None:
            args = (x, weight, bias, nxt, boundary_ids, logit_softcap)
            fn = _hidden_rows_stats
        else:
            args = (x, nxt, boundary_ids, logit_softcap)
            fn = _rows_stats
        needs_grad = use_ckpt and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        t, s = checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args)
        targets.append(t)
        sigmas.append(s)
    return lay.assemble(torch.cat(targets), torch.cat(sigmas))


class _LMHeadStats(torch.autograd.Function):
    """Per row of hidden states: ``(z[next] − lse(z), log Σ_{v∈B} softmax(z)_v)`` with ``z`` = the LM head's fp32
    logits, in slices of rows, with a hand-written backward.

    The same numbers as :func:`student_token_stats` (unclipped), but without autograd's chain of logsumexp /
    gather / index_select and their backward ops. Everything is in log space, so that peaked distributions
    (σ far below the fp32 ``exp`` range, e.g. −300) keep finite values and gradients::

        lse = logsumexp(z),  lse_B = logsumexp(z[B]),  ℓ = z[next] − lse,  σ = lse_B − lse
        ∂/∂z = g_ℓ·(onehot(next) − p) + g_σ·(q − p),   p = exp(z − lse),  q = 1_B·exp(z − lse_B)

    One exp pass (the forward's with ``keep``, else the backward's) gives ``e = exp(z − lse − σ·1_B)`` (``p`` off B, ``q`` on B; both ``≤ 1``, no
    0/0), and since ``p = q·e^σ`` on B, ``∂/∂z = e·c + g_ℓ·onehot(next)`` with ``c = −(g_ℓ + g_σ)`` off B and
    ``c = g_σ − (g_ℓ + g_σ)·e^σ`` on B: one masked multiply.

    ``boundary=None`` computes ℓ only (σ is returned as None): the log-softmax and its backward, a plain
    cross-entropy (``e = p``, ``∂/∂z = −g_ℓ·p + g_ℓ·onehot(next)``).

    ``keep=True`` keeps ``e`` (fp32, ``rows × V``; and ``z`` with soft-capping) for the backward; ``keep=False`` keeps only
    ``lse`` and σ and recomputes the slice's logits in the backward (memory ``O(slice × V)``, one more LM-head
    matmul). The matmul runs in the dtype autocast would use at forward time (in the backward too); statistics
    in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, next_ids, boundary, softcap, slice_size, keep):
        compute_dtype = weight.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        n = hidden.shape[0]
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with_sigma = boundary is not None
        sigma = torch.empty_like(target) if with_sigma else None
        lse_all = torch.empty_like(target)
        boundary_ids = boundary.nonzero().squeeze(-1) if with_sigma else None
        kept = []
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, n, slice_size):
                z = _LMHeadStats._logits(hidden[lo : lo + slice_size], weight, bias, compute_dtype, softcap)
                lse = torch.logsumexp(z, dim=-1)
                target[lo : lo + slice_size] = z.gather(1, next_ids[lo : lo + slice_size, None])[:, 0] - lse
                sig = None
                if with_sigma:
                    # σ = lse_B − lse: both max-shifted logsumexps, finite however small p(B) is
                    sig = sigma[lo : lo + slice_size]
                    sig[:] = torch.logsumexp(z.index_select(1, boundary_ids), dim=-1) - lse
                lse_all[lo : lo + slice_size] = lse
                if keep:
                    e = _LMHeadStats._scaled_probs(z, lse, sig, boundary, softcap)
                    kept.append((e, z if softcap else None))
        ctx.save_for_backward(hidden, weight, bias, next_ids, boundary, lse_all, sigma)
        ctx.kept = kept
        ctx.config = (compute_dtype, softcap, slice_size)
        return target, sigma

    @staticmethod
    def _scaled_probs(z, lse, sigma, boundary, softcap):
        """``e = exp(z − lse − σ·1_B)``: ``p`` off B, ``p/P_B = exp(z − lse_B)`` on B; every exponent is ``≤ 0``
        (up to rounding), so ``e ≤ 1`` and nothing is 0/0 or ∞·0 however peaked the row is (``sigma`` None:
        ``e = p``). In place on ``z`` unless soft-capping's backward still needs ``z``."""
        e = z - lse[:, None] if softcap else z.sub_(lse[:, None])
        if sigma is not None:
            e.addcmul_(sigma[:, None], boundary[None, :], value=-1.0)
        return e.exp_()

    @staticmethod
    def _logits(h, weight, bias, compute_dtype, softcap):
        z = F.linear(
            h.to(compute_dtype),
            weight.to(compute_dtype),
            bias.to(compute_dtype) if bias is not None else None,
        ).float()
        return apply_softcap(z, softcap)

    @staticmethod
    def backward(ctx, g_target, g_sigma):
        hidden, weight, bias, next_ids, boundary, lse_all, sigma = ctx.saved_tensors
        with_sigma = boundary is not None
        compute_dtype, softcap, slice_size = ctx.config
        kept = ctx.kept
        g_target = g_target.float() if g_target is not None else torch.zeros_like(lse_all)
        g_sigma = g_sigma.float() if g_sigma is not None and with_sigma else torch.zeros_like(lse_all)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w_c = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for k, lo in enumerate(range(0, hidden.shape[0], slice_size)):
                h = hidden[lo : lo + slice_size]
                sig = sigma[lo : lo + slice_size] if with_sigma else None
                if kept:
                    e, z = kept[k]
                    kept[k] = None
                else:
                    z = _LMHeadStats._logits(h, weight, bias, compute_dtype, softcap)
                    e = _LMHeadStats._scaled_probs(z, lse_all[lo : lo + slice_size], sig, boundary, softcap)
                gt = g_target[lo : lo + slice_size]
                if with_sigma:
                    gs = g_sigma[lo : lo + slice_size]
                    g_all = gt + gs
                    # dz = e·(−(g_ℓ + g_σ)) off B, e·(g_σ − (g_ℓ + g_σ)·e^σ) on B, + g_ℓ·onehot(next)
                    on_b = gs - g_all * torch.exp(sig)
                    dz = e.mul_(torch.where(boundary[None, :] > 0, on_b[:, None], (-g_all)[:, None]))
                else:  # dz = −g_ℓ·p + g_ℓ·onehot(next)
                    dz = e.mul_(-gt[:, None])
                dz.scatter_add_(1, next_ids[lo : lo + slice_size, None], gt[:, None])
                if softcap:
                    dz.mul_(1.0 - (z / softcap) ** 2)
                dz = dz.to(compute_dtype)
                if need_h:
                    d_hidden[lo : lo + slice_size] = (dz @ w_c).to(hidden.dtype)
                if need_w:
                    d_weight += (dz.t() @ h.to(compute_dtype)).float()
                if need_b:
                    d_bias += dz.float().sum(0)
        ctx.kept = None
        return (
            d_hidden,
            d_weight.to(weight.dtype) if need_w else None,
            d_bias.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_token_stats(
    input_ids: Tensor,
    boundary_mask: Tensor,
    *,
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit_softcap: float | None = None,
    slice_size: int = 1024,
    keep_probs: bool = False,
    boundary_logprobs: bool = True,
) -> StudentTokenStats:
    """Drop-in for :func:`student_token_stats` (hidden-state form) with a fused
    backward (:class:`_LMHeadStats`): same outputs, same masking and clipping, ~the cost of a plain cross-entropy.
    ``keep_probs=False`` recomputes each slice's logits in the backward (bounded memory).
    ``boundary_logprobs=False`` computes ℓ only (``boundary_logprob`` is None; ``boundary_mask`` then only gives
    the vocabulary size), for the next-token loss alone."""
    bsz, seq = input_ids.shape
    device = hidden_states.device
    bmask = _as_bool_mask(boundary_mask, device)
    vocab = bmask.shape[0]
    weight, bias = head_rows(lm_head_weight, lm_head_bias, vocab, hidden=hidden_states.shape[-1])
    lay = _Layout.of(input_ids, attention_mask, vocab, device)
    rows = hidden_states.reshape(bsz * seq, -1).index_select(0, lay.flat_pos)
    nxt = lay.next_ids.reshape(-1).index_select(0, lay.flat_pos)
    target, sigma = _LMHeadStats.apply(
        rows,
        weight,
        bias,
        nxt,
        bmask.float() if boundary_logprobs else None,
        logit_softcap or None,
        slice_size,
        keep_probs,
    )
    return lay.assemble(target, sigma)
