"""Bits per byte (alm_pipeline.evaluation.bits_per_byte) against an independent plain computation; an in-memory
model and the full-logits fallback give the same number."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
from alm_pipeline.evaluation.models import load_eval_model
from tests.factories import EVAL_LONG_TEXT, EVAL_TEXTS, reference_bits_per_byte

MAX_LENGTH = 48


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_bits_per_byte_matches_a_plain_computation(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    texts = [*EVAL_TEXTS, EVAL_LONG_TEXT]
    # tiny budgets: several batches, many LM-head slices, several windows
    model = load_eval_model(str(model_dir), max_logit_elements=3000)
    assert model.lm_head == "sliced" and model.slice_size < 10
    bpb = model_bits_per_byte(model, texts, max_length=MAX_LENGTH, batch_tokens=100, window_docs=4)
    expected, nbytes, ntokens = reference_bits_per_byte(model_dir, texts, MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert (bpb.bytes, bpb.predicted_tokens) == (nbytes, ntokens)
    assert bpb.docs == len(texts) and bpb.truncated_docs == 1
    full_bytes = sum(len(t.encode()) for t in EVAL_TEXTS)
    if model_fixture == "llama_sp_model":  # BOS: every byte of the untruncated documents counts
        assert model.view.prefix_ids and nbytes > full_bytes
    else:  # no BOS: the first token of each document and its bytes are left out
        assert not model.view.prefix_ids and ntokens < nbytes
    # batching does not change the number
    one_by_one = model_bits_per_byte(model, texts, max_length=MAX_LENGTH, batch_tokens=1)
    assert one_by_one.bits_per_byte == pytest.approx(bpb.bits_per_byte, rel=1e-6)


def test_in_memory_model_and_full_logits_fallback(llama_sp_model):
    from alm_pipeline.evaluation.models import EvalModel
    from alm_pipeline.pipeline.byteview import load_byte_view

    expected, _, _ = reference_bits_per_byte(llama_sp_model, EVAL_TEXTS, MAX_LENGTH)
    view = load_byte_view(llama_sp_model)
    model = AutoModelForCausalLM.from_pretrained(str(llama_sp_model), dtype=torch.float32).train()
    wrapped = EvalModel(model, view)
    assert wrapped.lm_head == "sliced"
    bpb = model_bits_per_byte(wrapped, EVAL_TEXTS, max_length=MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert model.training  # scoring switched to eval mode and back
    # a logit scale that Llama's forward does not apply: the sliced path disagrees with the model's own
    # logits, so the model's full logits are used, and the number stays right
    model.config.logit_scale = 2.0
    fallback = EvalModel(model, view)
    assert fallback.lm_head == "full_logits"
    bpb = model_bits_per_byte(fallback, EVAL_TEXTS, max_length=MAX_LENGTH)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
