"""The student forward pass as one module (so DDP / FSDP see a single forward): ``(input_ids, ...) → (ℓ_S, σ_S)``.

:class:`StudentForward` runs the model body once and the LM head in slices with a fused fp32 softmax
(:func:`~alm_pipeline.trainer.token_stats.fused_token_stats`, tested equal to
:func:`~alm_pipeline.trainer.token_stats.student_token_stats` in values and gradients); the probabilities are kept
for the backward when a micro-batch's fit ``logits_memory_mib``, else the logits are recomputed slice by slice
(memory ``O(slice × vocab)``). :func:`micro_batch_token_stats` masks the per-token statistics of a (packed)
micro-batch for the losses.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from alm_pipeline.modeling import LogitRules, SlicedHead
from alm_pipeline.trainer.data import MicroBatch
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.loss import StudentTokenStats, student_token_stats
from alm_pipeline.trainer.token_stats import fused_token_stats

__all__ = ["StudentForward", "disable_dropout", "micro_batch_token_stats"]


def _head_weight_and_bias(hf_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = hf_model.get_output_embeddings()
    if head is None:
        raise TrainingError(f"{type(hf_model).__name__} has no output embeddings (LM head)")
    # peft keeps trainable copies of embeddings in a ModulesToSaveWrapper: use the active copy
    modules = getattr(head, "modules_to_save", None)
    if modules is not None and not getattr(head, "disable_adapters", False):
        adapter = getattr(head, "active_adapter", None)
        adapter = adapter[0] if isinstance(adapter, list | tuple) else adapter
        if adapter in modules:
            head = modules[adapter]
    if hasattr(head, "lora_A"):
        raise TrainingError(
            "LoRA on the LM head is not supported (the loss reads the head's weight directly)"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TrainingError(f"cannot read the LM head weight of {type(hf_model).__name__}")
    return weight, getattr(head, "bias", None)


class StudentForward(nn.Module):
    """``(input_ids, ...) → (ℓ_S, σ_S)`` per position, memory-bounded (see :func:`student_token_stats`);
    ``boundary_logprobs=False`` (the next-token loss alone): ``(ℓ_S, None)``, σ is not computed.

    Runs the model body once (no ``[B, T, V]`` logits tensor), then the LM head + fp32 log-softmax statistics in
    slices of positions. Applies the config's logit rules (:class:`~alm_pipeline.modeling.LogitRules`:
    ``logit_scale``, ``logits_scaling``, ``final_logit_softcapping``); :meth:`self_check` refuses models whose
    logits are something else.
    """

    def __init__(
        self,
        model: nn.Module,
        boundary_mask: np.ndarray,
        slice_size: int = 1024,
        checkpoint_slices: bool = True,
        fused: bool = True,
        boundary_logprobs: bool = True,
    ):
        super().__init__()
        self.model = model
        self.register_buffer(
            "boundary_mask", torch.as_tensor(np.asarray(boundary_mask, dtype=bool)), persistent=False
        )
        self.slice_size = slice_size
        self.checkpoint_slices = checkpoint_slices
        self.fused = fused
        self.boundary_logprobs = boundary_logprobs
        if not (fused or boundary_logprobs):
            raise ValueError("the reference (unfused) statistics always compute σ; use fused=True")

    def hf_model(self) -> nn.Module:
        m = self.model
        return m.get_base_model() if hasattr(m, "peft_config") and hasattr(m, "get_base_model") else m

    def forward(
        self,
        input_ids: torch.Tensor,
        stats_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hf = self.hf_model()
        body = getattr(hf, hf.base_model_prefix)
        out = body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weight, bias = _head_weight_and_bias(hf)
        head = SlicedHead.of(weight, bias, LogitRules.of(hf.config), self.boundary_mask.shape[0])
        kwargs = {
            "hidden_states": hidden,
            "lm_head_weight": head.weight,
            "lm_head_bias": head.bias,
            "attention_mask": stats_mask,
            "logit_softcap": head.softcap,
            "slice_size": self.slice_size,
        }
        if self.fused:
            stats = fused_token_stats(
                input_ids,
                self.boundary_mask,
                keep_probs=not self.checkpoint_slices,
                boundary_logprobs=self.boundary_logprobs,
                **kwargs,
            )
        else:
            stats = student_token_stats(
                input_ids, self.boundary_mask, checkpoint_slices=self.checkpoint_slices, **kwargs
            )
        # fresh tensors, not views (FSDP2 hooks the outputs; in-place ops on a view would bypass them)
        sigma = stats.boundary_logprob
        return stats.token_logprob.clone(), None if sigma is None else sigma.clone()

    @torch.no_grad()
    def self_check(self, input_ids: torch.Tensor, tol: float = 1e-3) -> float:
        """Max |Δ log p| between this path and the model's own logits on ``input_ids`` [1, T]; raises if > tol."""
        hf = self.hf_model()
        was_training = hf.training
        hf.eval()
        try:
            logits = self.model(input_ids=input_ids, use_cache=False).logits.float()[0]
            vocab = self.boundary_mask.shape[0]
            ref = logits[:-1, :vocab].log_softmax(-1).gather(-1, input_ids[0, 1:, None])[:, 0]
            mask = torch.ones_like(input_ids, dtype=torch.bool)
            lp, _ = self(input_ids, mask)
            diff = float((lp[0, 1:] - ref).abs().max()) if input_ids.shape[1] > 1 else 0.0
        finally:
            hf.train(was_training)
        if not diff <= tol:
            raise TrainingError(
                f"the student's log-probs computed from hidden states + LM head differ from its own logits by "
                f"{diff:.2e}: this model applies logit post-processing the trainer does not know"
            )
        return diff


def micro_batch_token_stats(
    lp: torch.Tensor, sigma: torch.Tensor | None, mb: MicroBatch
) -> StudentTokenStats:
    """Per-token statistics of a micro-batch; the first token of every document has no log-prob (in a packed row
    the previous position belongs to another document). ``sigma`` None: no σ (next-token loss only)."""
    mask = mb.attention_mask
    token_mask = torch.zeros_like(mask)
    token_mask[:, 1:] = mask[:, :-1] & mask[:, 1:]
    token_mask &= ~mb.doc_start
    lp = torch.where(token_mask, lp, torch.zeros_like(lp))
    return StudentTokenStats(
        token_logprob=lp, boundary_logprob=sigma, token_mask=token_mask, position_mask=mask
    )


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of ``model`` (modules and config) to 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    for key, value in list(cfg.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(cfg, key, 0.0)
