"""Combining several training losses: GradMag (reference §9) or fixed weights.

GradMag (paper §3.3, tokenkit ``approx_gradmag_preserve_mag``): for each loss ``L_i`` take its gradient
``g_i`` restricted to a small set of parameters — the trainable parameters of the student's last transformer
layer (its LoRA adapters when training LoRA) — and weight the loss by ``w_i = 1/‖g_i‖`` (stop-gradient),
normalised ``w̃_i = w_i / Σ_j w_j``: ``total = Σ_i w̃_i·L_i``. Every loss then pulls the last layer with the
same gradient magnitude. The paper found fixed weights (β ∈ {1/3, 1, 3}) clearly worse than GradMag for
ALM + SFT (Table 9).

The trainer weights the losses of the **global batch** (all micro-batches of all workers) once per optimizer
step, with :class:`GradMagStep`. The weights are known only after the last micro-batch, but the gradient is
linear in them, ``∇ total = Σ_i w̃_i·∇L_i``; so each loss's gradient is accumulated separately over the
micro-batches (its own backward pass, into its own ``.grad`` tensors), summed over the workers, the weights
are taken from the summed last-layer slices, and ``.grad`` is set to ``Σ_i w̃_i·g_i`` before clipping and the
optimizer step. Exact whatever the micro-batching and the number of workers. Cost against one backward of a
fixed-weight sum: one more backward pass per loss and micro-batch (through the whole model; the LM head's
fused statistics recompute their logits in it), one more gradient copy per loss in memory (plus one flat copy
of one loss's gradients during the all-reduce with several workers), and one all-reduce per loss and step.
Measured (``benchmarks/bench_train.py --modes hybrid_fixed,hybrid_gradmag,hybrid_gradmag_mb``, SmolLM2-135M cut to
2 / 12 blocks, 4 × 128 tokens in 2 micro-batches, CPU): 1.74× / 1.80× the step time of fixed weights, 0.81× /
1.00× that of the former per-micro-batch weights (two backward passes to the last layer per micro-batch), peak
memory + one gradient copy. Fixed weights and single losses use none of this (one backward of the weighted sum).

:func:`gradmag_weights` / :func:`gradmag_combine` are the same weights for losses of one batch whose graphs
are at hand (extra backward passes to the last layer only, ``torch.autograd.grad(..., retain_graph=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CombinedLoss",
    "GradMagStep",
    "LossCombinationConfig",
    "combine_losses",
    "fixed_combine",
    "gradmag_combine",
    "gradmag_weights",
    "weights_from_norms",
]


@dataclass(frozen=True)
class LossCombinationConfig:
    """How to combine named losses.

    Attributes:
        method: ``gradmag`` (weights ``∝ 1/‖∇_θ L_i‖`` on the chosen parameters, normalised to sum to 1) or
            ``fixed`` (``total = Σ β_i L_i`` with ``weights``, not normalised).
        weights: the ``β_i`` of ``fixed``, by loss name; a loss without an entry gets 1.0.
        eps: gradient norms ``≤ eps`` (or non-finite) count as zero: such a loss (e.g. an ALM loss of a batch
            without groups) gets weight 0 and is left out of the normalisation; if every loss has a zero norm
            the weights are equal.
    """

    method: Literal["gradmag", "fixed"] = "gradmag"
    weights: Mapping[str, float] = field(default_factory=dict)
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.method not in ("gradmag", "fixed"):
            raise ValueError(f"unknown loss combination {self.method!r}; choose 'gradmag' or 'fixed'")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        for name, w in self.weights.items():
            if not math.isfinite(w):
                raise ValueError(f"weight of loss {name!r} is not finite: {w!r}")


@dataclass(frozen=True)
class CombinedLoss:
    """``loss`` = ``Σ weights[name] · losses[name]``; ``weights`` and ``grad_norms`` are detached, for metrics
    (``grad_norms`` is empty for fixed weights)."""

    loss: Tensor
    weights: dict[str, Tensor]
    grad_norms: dict[str, Tensor]


def weights_from_norms(norms: Tensor, eps: float = 1e-12) -> Tensor:
    """GradMag's normalised weights ``w̃_i = (1/‖g_i‖) / Σ_j 1/‖g_j‖`` from the norms ``[n]``; a norm ``≤ eps``
    or non-finite gives weight 0; if all do, the weights are equal."""
    usable = torch.isfinite(norms) & (norms > eps)
    inv = torch.where(
        usable, 1.0 / torch.where(usable, norms, torch.ones_like(norms)), torch.zeros_like(norms)
    )
    total = inv.sum()
    return torch.where(
        total > 0, inv / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / norms.numel()
    )


def _flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    """``∂loss/∂params`` as one fp32 vector (zeros where ``loss`` does not depend on a parameter)."""
    if not loss.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), device=loss.device)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def gradmag_weights(
    losses: Mapping[str, Tensor], params: Iterable[Tensor], *, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Normalised GradMag weights ``w̃`` and gradient norms ``‖g_i‖`` (both ``[n]``, fp32, detached) of losses
    of one batch, in the order of ``losses``. ``params`` are the parameters the gradients are restricted to
    (those that do not require grad are ignored); nothing is accumulated into ``.grad``."""
    names = list(losses)
    plist = [p for p in params if p.requires_grad]
    if not names:
        raise ValueError("no losses to combine")
    if not plist:
        raise ValueError("GradMag needs at least one parameter that requires grad")
    stacked = torch.stack([_flat_grad(losses[n], plist) for n in names])
    norms = stacked.pow(2).sum(1).sqrt()
    return weights_from_norms(norms, eps).detach(), norms.detach()


def gradmag_combine(
    losses: Mapping[str, Tensor], params: Iterable[Tensor], *, eps: float = 1e-12
) -> CombinedLoss:
    """``Σ_i w̃_i · L_i`` with the weights of :func:`gradmag_weights`. A single loss gets weight 1 (no extra
    backward)."""
    names = list(losses)
    if len(names) == 1:
        one = torch.ones((), dtype=torch.float32, device=losses[names[0]].device)
        return CombinedLoss(loss=losses[names[0]], weights={names[0]: one}, grad_norms={})
    weights, norms = gradmag_weights(losses, params, eps=eps)
    total = weights[0].to(losses[names[0]].dtype) * losses[names[0]]
    for w, n in zip(weights[1:], names[1:], strict=True):
        total = total + w.to(losses[n].dtype) * losses[n]
    return CombinedLoss(
        loss=total,
        weights={n: w for n, w in zip(names, weights, strict=True)},
        grad_norms={n: g for n, g in zip(names, norms, strict=True)},
    )


def fixed_combine(losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> CombinedLoss:
    """``Σ_i β_i · L_i`` with fixed ``weights`` by name (missing names get 1.0; unknown names are an error)."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise ValueError(f"weights given for unknown loss(es): {', '.join(unknown)}")
    if not losses:
        raise ValueError("no losses to combine")
    total: Tensor | None = None
    used: dict[str, Tensor] = {}
    for name, loss in losses.items():
        beta = float(weights.get(name, 1.0))
        used[name] = torch.tensor(beta, dtype=torch.float64, device=loss.device)  # float(·) gives β back
        total = beta * loss if total is None else total + beta * loss
    assert total is not None
    return CombinedLoss(loss=total, weights=used, grad_norms={})


def combine_losses(
    losses: Mapping[str, Tensor], config: LossCombinationConfig, params: Iterable[Tensor] | None = None
) -> CombinedLoss:
    """Losses of one batch: dispatch on ``config.method``; ``params`` (the last layer's trainable parameters)
    is needed for ``gradmag``."""
    if config.method == "fixed":
        return fixed_combine(losses, config.weights)
    if params is None:
        raise ValueError("GradMag needs params= (the trainable parameters of the last transformer layer)")
    return gradmag_combine(losses, params, eps=config.eps)


class GradMagStep:
    """GradMag over the global batch of one optimizer step (see the module docstring).

    Per micro-batch, :meth:`backward` runs one backward pass per loss and accumulates each loss's gradient in
    its own tensors (swapped in as ``.grad`` for its pass). After the last micro-batch, :meth:`finish` sums
    them over the workers (``reduce``), computes the weights from the last layer's slices and leaves
    ``Σ_i w̃_i·g_i`` in every parameter's ``.grad`` (``None`` where no loss reached it). Under DDP every
    micro-batch must run without DDP's own gradient sync (``no_sync``): :meth:`finish` reduces instead.

    Args:
        names: the losses, in the order of the returned weights.
        params: every trainable parameter (those whose ``.grad`` the optimizer reads).
        last_layer: the parameters the weights are computed on (a subset of ``params``).
        eps: as :attr:`LossCombinationConfig.eps`.
    """

    def __init__(
        self, names: Sequence[str], params: Iterable[Tensor], last_layer: Iterable[Tensor], eps: float = 1e-12
    ):
        self.names = list(names)
        if len(self.names) < 2:
            raise ValueError("GradMagStep combines at least two losses")
        self.params = [p for p in params if p.requires_grad]
        index = {id(p): i for i, p in enumerate(self.params)}
        last = [p for p in last_layer if p.requires_grad]
        missing = [p for p in last if id(p) not in index]
        if not last or missing:
            raise ValueError("GradMag's last-layer parameters must be trainable parameters of the model")
        self.last_layer = [index[id(p)] for p in last]
        self.eps = eps
        self.grads: dict[str, list[Tensor | None]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated gradients (start of a step)."""
        self.grads = {n: [None] * len(self.params) for n in self.names}

    def backward(self, losses: Mapping[str, Tensor]) -> None:
        """Accumulate ``∇ losses[name]`` (one micro-batch) into that loss's gradients. A loss that does not
        require grad adds nothing."""
        if set(losses) != set(self.names):
            raise ValueError(f"expected the losses {self.names}, got {sorted(losses)}")
        todo = [n for n in self.names if losses[n].requires_grad]
        for k, name in enumerate(todo):
            mine = self.grads[name]
            for p, g in zip(self.params, mine, strict=True):
                p.grad = g
            try:
                losses[name].backward(retain_graph=k < len(todo) - 1)
            finally:
                for i, p in enumerate(self.params):
                    mine[i], p.grad = p.grad, None

    def finish(
        self, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Set every parameter's ``.grad`` to ``Σ_i w̃_i·g_i`` and return ``(weights, last-layer gradient norms)``
        by loss name. ``reduce`` maps one loss's flattened local gradients to their sum over the workers (as
        the gradient of the global batch loss; the same on every worker); the accumulators are reset."""
        if reduce is not None:
            for name in self.names:
                self._reduce(self.grads[name], reduce)
        norms = torch.stack([self._last_layer_norm(self.grads[n]) for n in self.names])
        weights = [float(w) for w in weights_from_norms(norms, self.eps)]
        for i, p in enumerate(self.params):
            total: Tensor | None = None
            for w, name in zip(weights, self.names, strict=True):
                g = self.grads[name][i]
                if g is None:
                    continue
                total = g.mul_(w) if total is None else total.add_(g, alpha=w)
            p.grad = total
        self.reset()
        return dict(zip(self.names, weights, strict=True)), {
            n: float(v) for n, v in zip(self.names, norms, strict=True)
        }

    def _reduce(self, grads: list[Tensor | None], reduce: Callable[[Tensor], Tensor]) -> None:
        for i, p in enumerate(self.params):
            if grads[i] is None:  # every worker must send the same layout
                grads[i] = torch.zeros_like(p)
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]))  # type: ignore[union-attr]
        offset = 0
        for g in grads:
            assert g is not None
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _last_layer_norm(self, grads: list[Tensor | None]) -> Tensor:
        parts = [grads[i] for i in self.last_layer]
        device = self.params[0].device
        sq = [g.float().pow(2).sum() for g in parts if g is not None]
        return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=device)
