"""Combining several training losses: GradMag (reference §9) or fixed weights.

GradMag (paper §3.3, tokenkit ``approx_gradmag_preserve_mag``): for each loss ``L_i`` take its gradient
``g_i`` restricted to a small set of parameters — the trainable parameters of the student's last transformer
layer (its LoRA adapters when training LoRA) — and weight the loss by ``w_i = 1/‖g_i‖`` (stop-gradient),
normalised ``w̃_i = w_i / Σ_j w_j``: ``total = Σ_i w̃_i·L_i``. Every loss then pulls the last layer with the
same gradient magnitude. Overhead: one extra backward pass per loss through the part of the graph between
that loss and the chosen parameters (``torch.autograd.grad(..., retain_graph=True)``; nothing is
accumulated into ``.grad``), followed by the usual ``total.backward()``.

The paper found fixed weights (β ∈ {1/3, 1, 3}) clearly worse than GradMag for ALM + SFT (Table 9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CombinedLoss",
    "LossCombinationConfig",
    "combine_losses",
    "fixed_combine",
    "gradmag_combine",
    "gradmag_weights",
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
    losses: Mapping[str, Tensor],
    params: Iterable[Tensor],
    *,
    eps: float = 1e-12,
    reduce_gradients: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Normalised GradMag weights ``w̃`` and gradient norms ``‖g_i‖`` (both ``[n]``, fp32, detached), in the
    order of ``losses``.

    ``params`` are the parameters the gradients are restricted to (those that do not require grad are
    ignored). ``reduce_gradients``, if given, maps the ``[n, P]`` matrix of local flattened gradients to the
    ones to take the norms of (the trainer sums them over its workers with an all-reduce, so that every worker
    uses the same weights: the norms are those of the gradients of the whole global batch).
    """
    names = list(losses)
    plist = [p for p in params if p.requires_grad]
    if not names:
        raise ValueError("no losses to combine")
    if not plist:
        raise ValueError("GradMag needs at least one parameter that requires grad")
    stacked = torch.stack([_flat_grad(losses[n], plist) for n in names])
    if reduce_gradients is not None:
        stacked = reduce_gradients(stacked)
    norms = stacked.pow(2).sum(1).sqrt()
    usable = torch.isfinite(norms) & (norms > eps)
    inv = torch.where(
        usable, 1.0 / torch.where(usable, norms, torch.ones_like(norms)), torch.zeros_like(norms)
    )
    total = inv.sum()
    weights = torch.where(
        total > 0, inv / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / len(names)
    )
    return weights.detach(), norms.detach()


def gradmag_combine(
    losses: Mapping[str, Tensor],
    params: Iterable[Tensor],
    *,
    eps: float = 1e-12,
    reduce_gradients: Callable[[Tensor], Tensor] | None = None,
) -> CombinedLoss:
    """``Σ_i w̃_i · L_i`` with the weights of :func:`gradmag_weights`. A single loss gets weight 1 (no extra
    backward)."""
    names = list(losses)
    if len(names) == 1:
        one = torch.ones((), dtype=torch.float32, device=losses[names[0]].device)
        return CombinedLoss(loss=losses[names[0]], weights={names[0]: one}, grad_norms={})
    weights, norms = gradmag_weights(losses, params, eps=eps, reduce_gradients=reduce_gradients)
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
    losses: Mapping[str, Tensor],
    config: LossCombinationConfig,
    params: Iterable[Tensor] | None = None,
    *,
    reduce_gradients: Callable[[Tensor], Tensor] | None = None,
) -> CombinedLoss:
    """Dispatch on ``config.method``; ``params`` (the last layer's trainable parameters) is needed for
    ``gradmag``."""
    if config.method == "fixed":
        return fixed_combine(losses, config.weights)
    if params is None:
        raise ValueError("GradMag needs params= (the trainable parameters of the last transformer layer)")
    return gradmag_combine(losses, params, eps=config.eps, reduce_gradients=reduce_gradients)
