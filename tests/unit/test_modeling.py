"""The LM-head rules (alm_pipeline.modeling) on a real tiny Granite model, which divides its logits by
``logits_scaling`` and has padded vocabulary rows: the sliced head, the hf engine and evaluation's bits per byte
all equal the model's own logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig, LlamaConfig

from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
from alm_pipeline.evaluation.models import load_eval_model
from alm_pipeline.modeling import (
    LogitRules,
    SlicedHead,
    head_rows,
    model_body,
    self_check_tolerance,
    sliced_head_error,
    torch_dtype,
    unknown_logit_field,
)
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from tests.factories import GRANITE_LOGITS_SCALING, GRANITE_PADDED_ROWS

TEXTS = ["Hello world, a first document.", "To be, or not to be:\nthat is the question", "x", "Café 中文 👍"]


def _own_logprobs(model_dir: Path, ids: np.ndarray, vocab: int) -> torch.Tensor:
    """The model's own logits (its forward applies logits_scaling), tokenizer columns, fp32 log-softmax."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0]
    return logits[:, :vocab].float().log_softmax(-1)


def test_logit_rules_of_configs():
    assert LogitRules.of(LlamaConfig()) == LogitRules(scale=None, softcap=None)
    assert LogitRules.of(GraniteConfig(logits_scaling=GRANITE_LOGITS_SCALING)) == LogitRules(
        scale=0.25, softcap=None
    )
    assert LogitRules.of(GraniteConfig(logits_scaling=1.0)) == LogitRules()
    assert LogitRules.of(CohereConfig(logit_scale=0.5)) == LogitRules(scale=0.5)
    both = LlamaConfig(logit_scale=0.5, logits_scaling=2.0, final_logit_softcapping=30.0)
    assert LogitRules.of(both) == LogitRules(scale=0.25, softcap=30.0)
    assert unknown_logit_field(both) is None
    assert unknown_logit_field(LlamaConfig(output_logit_multiplier=3.0)) == ("output_logit_multiplier", 3.0)
    assert torch_dtype("bfloat16") is torch.bfloat16 and self_check_tolerance(torch.float32) == 1e-3
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        torch_dtype("int8")


def test_sliced_head_folds_the_scaling_and_drops_padded_rows(granite_model):
    view = load_byte_view(granite_model)
    model = AutoModelForCausalLM.from_pretrained(str(granite_model), dtype=torch.float32).eval()
    assert model.get_output_embeddings().weight.shape[0] == view.vocab_size + GRANITE_PADDED_ROWS
    head = SlicedHead.of_model(model, view.vocab_size)
    assert head.vocab == view.vocab_size and head.softcap is None
    torch.testing.assert_close(
        head.weight,
        model.get_output_embeddings().weight[: view.vocab_size] / GRANITE_LOGITS_SCALING,
        rtol=0,
        atol=0,
    )
    assert sliced_head_error(model, model_body(model), head) < 1e-5
    # without the scaling (what evaluation and the student statistics did before): far off, refused
    unscaled = SlicedHead.of(model.get_output_embeddings().weight, None, LogitRules(), view.vocab_size)
    assert sliced_head_error(model, model_body(model), unscaled) > self_check_tolerance(torch.float32)
    with pytest.raises(ValueError, match="the tokenizer has 9 tokens but the LM head only 8 rows"):
        head_rows(torch.zeros(8, 4), None, 9)


def test_hf_engine_equals_the_models_own_logits(granite_model):
    view = load_byte_view(granite_model)
    seqs = [view.encode(t).token_ids for t in TEXTS]
    engine = HFTeacherEngine(
        HFEngineConfig(model=str(granite_model), max_batch_tokens=64, max_logit_elements=2000),
        view.boundary_token_ids(),
        view.vocab_size,
    )
    for ids, (lp, bl) in zip(seqs, engine.score(seqs), strict=True):
        logp = _own_logprobs(granite_model, ids, view.vocab_size)
        expected_lp = logp[:-1].gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]
        expected_bl = torch.logsumexp(logp[:, torch.as_tensor(view.boundary_mask)], dim=-1)
        np.testing.assert_allclose(lp[1:], expected_lp.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(bl, expected_bl.numpy(), atol=1e-5, rtol=0)


def test_evaluation_bits_per_byte_equals_the_models_own_logits(granite_model):
    view = load_byte_view(granite_model)
    model = load_eval_model(str(granite_model), max_logit_elements=3000)
    assert model.lm_head == "sliced" and model.slice_size < 10
    bpb = model_bits_per_byte(model, TEXTS, batch_tokens=64)
    nats, nbytes = 0.0, 0
    for text in TEXTS:
        enc = view.encode(text)
        logp = _own_logprobs(granite_model, enc.token_ids, view.vocab_size)
        nats -= float(logp[:-1].gather(1, torch.as_tensor(enc.token_ids[1:])[:, None]).double().sum())
        nbytes += int(enc.offsets[-1] - enc.offsets[0])
    assert bpb.bytes == nbytes
    assert bpb.bits_per_byte == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)
