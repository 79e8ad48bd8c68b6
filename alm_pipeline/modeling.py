"""The rules of a causal LM's output head, in one place.

Everything in alm-pipeline that computes log-probabilities from a model's final hidden states and its LM head
(the ``hf`` and ``vllm`` teacher engines, the student statistics, evaluation) follows these rules:

* **logit post-processing** from the model config (:class:`LogitRules`): ``logit_scale`` multiplies the logits
  (Cohere, some Llama variants), ``logits_scaling`` divides them (Granite), ``final_logit_softcapping`` caps them
  as ``c·tanh(z/c)`` (Gemma 2/3). The scale is folded into the head's weight and bias; soft-capping is applied
  to the fp32 logits. A config field that looks logit-changing but is none of these is reported by
  :func:`unknown_logit_field` (for callers that cannot compare with the model's own logits);
* **padded vocabulary**: the head's rows at or beyond the tokenizer's length are dropped (:func:`head_rows`), so
  they never enter a softmax;
* **fp32 logits in slices**: :meth:`SlicedHead.logits` turns a slice of hidden states into fp32 logits (the
  matmul in the head's dtype, as the model's own head does it);
* **one self-check** (:func:`sliced_head_error`): that path against the model's own logits on a fixed probe
  sequence, with :func:`self_check_tolerance`.

Also the one table of model weight dtypes (:data:`DTYPES`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DTYPES",
    "LogitRules",
    "SlicedHead",
    "apply_softcap",
    "head_rows",
    "linear_head",
    "model_body",
    "postprocess_logits",
    "self_check_tolerance",
    "sliced_head_error",
    "torch_dtype",
    "unknown_logit_field",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# config fields that change the logits and that LogitRules applies; any other field matching _LOGIT_FIELD is
# reported by unknown_logit_field
_KNOWN_LOGIT_FIELDS = {"final_logit_softcapping", "logit_scale", "logits_scaling"}
_LOGIT_FIELD = re.compile(r"logit|softcap|lm_head_mult|output_mult", re.IGNORECASE)
_IGNORED_LOGIT_FIELD = re.compile(r"attn|attention|router|output_logits|return_", re.IGNORECASE)
_PROBE_LENGTH = 12


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` → the torch dtype; anything else is a ValueError."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------ logit rules


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _number(value: Any) -> float | None:
    """A config value as a number (None when it is absent or not a number)."""
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def _factor(value: Any) -> float | None:
    """A logit scale factor, or None when it is absent or neutral (0 and 1 mean "not set")."""
    number = _number(value)
    return None if number in (None, 0.0, 1.0) else number


@dataclass(frozen=True)
class LogitRules:
    """How a model turns its head's output into logits: ``softcap(scale · (W h + b))``."""

    scale: float | None = None  # multiply the logits: logit_scale, divided by logits_scaling
    softcap: float | None = None  # c·tanh(z/c): final_logit_softcapping

    @classmethod
    def of(cls, config: Any) -> LogitRules:
        """The rules of a transformers config (its text config for multimodal ones)."""
        text = _text_config(config)
        scale = _factor(getattr(text, "logit_scale", None))
        scaling = _factor(getattr(text, "logits_scaling", None))
        if scaling is not None:
            scale = _factor((scale or 1.0) / scaling)
        softcap = _number(getattr(text, "final_logit_softcapping", None))
        return cls(scale=scale, softcap=softcap or None)


def unknown_logit_field(config: Any) -> tuple[str, Any] | None:
    """``(name, value)`` of a config field that may change the logits but is not one :class:`LogitRules`
    applies (e.g. ``output_logit_multiplier``), or None."""
    text = _text_config(config)
    for cfg in {id(config): config, id(text): text}.values():
        for key, value in cfg.to_dict().items():
            if (
                _LOGIT_FIELD.search(key)
                and not _IGNORED_LOGIT_FIELD.search(key)
                and key not in _KNOWN_LOGIT_FIELDS
                and value not in (None, False, 1, 1.0, 0, 0.0)
                and not isinstance(value, bool | dict | list)
            ):
                return key, value
    return None


def apply_softcap(logits: Tensor, softcap: float | None) -> Tensor:
    """``c·tanh(z/c)`` (Gemma-2 style soft-capping); ``z`` unchanged when ``softcap`` is None."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def postprocess_logits(logits: Tensor, softcap: float | None) -> Tensor:
    """Logits in fp32 (fp64 stays fp64), soft-capped."""
    return apply_softcap(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)


# ------------------------------------------------------------------------------------------ the head


def model_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer body of a causal LM (``model.<base_model_prefix>``: its final hidden states)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return body if isinstance(body, torch.nn.Module) else None


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output embeddings when they are a plain ``nn.Linear`` (no adapter around them), else None."""
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def head_rows(
    weight: Tensor, bias: Tensor | None, vocab: int, hidden: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The head's rows for the tokenizer's ``vocab`` ids (padded rows beyond it dropped: views, no copy);
    checked against the hidden size when given."""
    if weight.dim() != 2 or (hidden is not None and weight.shape[1] != hidden):
        raise ValueError(f"lm_head_weight {tuple(weight.shape)} does not fit hidden size {hidden}")
    if weight.shape[0] < vocab:
        raise ValueError(f"the tokenizer has {vocab} tokens but the LM head only {weight.shape[0]} rows")
    return weight[:vocab], (bias[:vocab] if bias is not None else None)


@dataclass(frozen=True)
class SlicedHead:
    """An LM head ready to apply to slices of final hidden states: the tokenizer's rows, the logit scale folded
    into weight and bias, soft-capping applied to the fp32 logits."""

    weight: Tensor  # [vocab, hidden]
    bias: Tensor | None
    softcap: float | None

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, rules: LogitRules, vocab: int) -> SlicedHead:
        weight, bias = head_rows(weight, bias, vocab)
        if rules.scale is not None:
            weight = weight * rules.scale
            bias = bias * rules.scale if bias is not None else None
        return cls(weight, bias, rules.softcap)

    @classmethod
    def of_model(cls, model: torch.nn.Module, vocab: int) -> SlicedHead:
        """The head of a loaded causal LM (parameters read live: the result follows a model that trains)."""
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"{type(model).__name__} has no LM head weight")
        return cls.of(weight, getattr(head, "bias", None), LogitRules.of(model.config), vocab)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits ``[n, vocab]`` of hidden states ``[n, hidden]`` (the matmul runs in the head's dtype)."""
        return postprocess_logits(
            F.linear(hidden.to(self.weight.dtype), self.weight, self.bias), self.softcap
        )


def self_check_tolerance(dtype: torch.dtype | str) -> float:
    """The largest |Δ log p| :func:`sliced_head_error` may report for a model computing in ``dtype``."""
    return 1e-3 if str(dtype).removeprefix("torch.") == "float32" else 5e-2


@torch.inference_mode()
def sliced_head_error(model: torch.nn.Module, body: torch.nn.Module, head: SlicedHead) -> float:
    """Max |Δ log p| between ``head.logits(body(x))`` and the model's own logits (columns of the tokenizer's
    ids), both log-softmaxed in fp32, on a fixed random probe sequence of tokenizer ids. A value above
    :func:`self_check_tolerance` means the model post-processes its logits in a way these rules do not know."""
    device = head.weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.vocab, (1, _PROBE_LENGTH), generator=gen).to(device)
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask).logits[0, :, : head.vocab].float().log_softmax(-1)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[0]
    ours = head.logits(hidden).log_softmax(-1)
    return float((full - ours).abs().max())


# ------------------------------------------------------------------------------------------ batching


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with ``rows × longest ≤ batch_tokens`` (≥ 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids and attention mask of token-id sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask
