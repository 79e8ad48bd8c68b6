"""The optimizer and the learning-rate schedule of a run (:class:`~alm_pipeline.trainer.config.OptimConfig`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alm_pipeline.trainer.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "set_schedule"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps
    (``(s+1)/warmup``, so the first step already learns), then linear decay, reaching ``1/(total−warmup)`` at
    the last step (never a wasted step at 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam without weight decay, AdamW when ``weight_decay > 0``."""
    opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    return opt_cls(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = cfg.warmup, cfg.steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


def set_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig
) -> None:
    """After loading a checkpoint's scheduler state: apply this run's schedule (a changed step count changes
    it) at the restored step."""
    warmup, total = cfg.warmup, cfg.steps
    scheduler.lr_lambdas = [lambda s: lr_factor(s, warmup, total)]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_factor(scheduler.last_epoch, warmup, total)
