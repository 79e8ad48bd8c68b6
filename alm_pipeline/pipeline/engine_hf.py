"""Teacher engine ``hf``: exact per-token log-probs and boundary log-probs with transformers.

For each sequence of teacher token ids it returns

* ``logprob[u] = log p_T(t_u | t_<u)`` (NaN at u = 0, where nothing predicts the token), and
* ``boundary_logprob[u] = log Σ_{v ∈ B} p_T(v | t_≤u)``: the probability that the token after u starts at a
  pretoken boundary (space/newline/tab byte, or a special token),

both from the FULL softmax in fp32. The model body runs once per batch; the LM head and the log-softmax run
over slices of positions so that at most ``max_logit_elements`` fp32 logits exist at any time (a 150k
vocabulary never materialises a [batch, length, vocab] tensor). Sequences are sorted by length and packed
into batches under a token budget to cut padding; results come back in the input order. The LM head follows
the rules of :mod:`alm_pipeline.modeling` (logit scaling and soft-capping from the config; padded vocabulary rows,
at or beyond the tokenizer's size, excluded from the softmax), checked once against the model's own logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from alm_pipeline.modeling import (
    SlicedHead,
    length_batches,
    linear_head,
    model_body,
    pad_batch,
    self_check_tolerance,
    sliced_head_error,
    torch_dtype,
)


@dataclass(frozen=True)
class HFEngineConfig:
    model: str  # local path (or hub name when the network allows)
    dtype: str = "float32"  # model weights/compute: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch_tokens: int = 8192  # padded tokens per forward pass
    max_logit_elements: int = 1 << 25  # fp32 logits alive at once (128 MiB)
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    trust_remote_code: bool = False


class HFTeacherEngine:
    name = "hf"

    def __init__(self, config: HFEngineConfig, boundary_token_ids: np.ndarray, tokenizer_size: int):
        from transformers import AutoModelForCausalLM

        dtype = torch_dtype(config.dtype)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
        self.model = model.eval().to(self.device)
        self.body = model_body(self.model)
        if self.body is None or linear_head(self.model) is None:
            raise ValueError(f"{config.model}: cannot split the model into body and LM head")
        try:
            self.head = SlicedHead.of_model(self.model, tokenizer_size)
        except ValueError as err:
            raise ValueError(f"{config.model}: {err}") from None
        ids = np.asarray(boundary_token_ids, dtype=np.int64)
        boundary = torch.zeros(tokenizer_size, dtype=torch.bool)
        boundary[torch.as_tensor(ids[ids < tokenizer_size])] = True
        self.boundary = boundary.to(self.device)
        self._self_check()

    # ------------------------------------------------------------------ public
    def describe(self) -> dict:
        import transformers

        return {
            "engine": self.name,
            "engine_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "dtype": self.config.dtype,
            "device": str(self.device),
            "logits": "fp32 log-softmax over the tokenizer's ids (padded vocabulary rows excluded)",
        }

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(logprob, boundary_logprob) per sequence, float32 arrays of the sequence's length."""
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(sequences)
        for batch in length_batches([len(s) for s in sequences], self.config.max_batch_tokens):
            for idx, out in zip(batch, self._score_batch([sequences[i] for i in batch]), strict=True):
                results[idx] = out
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _score_batch(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        lengths = [len(s) for s in seqs]
        ids, mask = pad_batch(seqs, pad_id=0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        flat_hidden = hidden[mask.bool()]  # [N, d] valid positions, row-major
        # the token each position predicts (the next one in the same row; a dummy 0 at each row's end)
        next_ids = torch.zeros_like(ids)
        next_ids[:, :-1] = ids[:, 1:]
        flat_next = next_ids[mask.bool()]
        n = flat_hidden.shape[0]
        step = max(1, self.config.max_logit_elements // self.head.vocab)
        target_lp = torch.empty(n, dtype=torch.float32, device=self.device)
        boundary_lp = torch.empty(n, dtype=torch.float32, device=self.device)
        for start in range(0, n, step):
            logits = self.head.logits(flat_hidden[start : start + step])
            lse = torch.logsumexp(logits, dim=-1)
            target_lp[start : start + step] = (
                logits.gather(1, flat_next[start : start + step, None])[:, 0] - lse
            )
            boundary_lse = torch.logsumexp(logits.masked_fill(~self.boundary, -math.inf), dim=-1)
            boundary_lp[start : start + step] = boundary_lse - lse
        target_lp = target_lp.clamp_(max=0.0).cpu().numpy()
        boundary_lp = boundary_lp.clamp_(max=0.0).cpu().numpy()
        out = []
        pos = 0
        for length in lengths:
            lp = np.empty(length, dtype=np.float32)
            lp[0] = np.nan
            lp[1:] = target_lp[pos : pos + length - 1]
            out.append((lp, boundary_lp[pos : pos + length].copy()))
            pos += length
        return out

    def _self_check(self) -> None:
        """Refuse models whose logits are not the sliced head's (e.g. unknown logit post-processing)."""
        diff = sliced_head_error(self.model, self.body, self.head)
        if not diff <= self_check_tolerance(self.config.dtype):
            raise ValueError(
                f"{self.config.model}: the sliced LM-head path differs from the model's own logits by {diff:.2e}; "
                "this model applies logit post-processing the hf engine does not know"
            )
