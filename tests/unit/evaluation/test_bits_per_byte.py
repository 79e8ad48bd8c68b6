"""Bits per byte (alm_pipeline.evaluation.bits_per_byte) against an independent plain computation, under the one
convention for every tokenizer (every byte predicted: from the BOS the tokenizer adds, else its BOS or EOS token,
else the first token's bytes reported as excluded); an in-memory model and the full-logits fallback give the same
number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_pipeline.assets import asset_path, is_installed
from alm_pipeline.evaluation.bits_per_byte import first_token_context, model_bits_per_byte
from alm_pipeline.evaluation.models import load_eval_model
from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer
from tests import factories
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
    # every byte of the untruncated documents counts; the truncated one counts its kept bytes
    full_bytes = sum(len(t.encode()) for t in EVAL_TEXTS)
    assert nbytes > full_bytes and bpb.excluded_bytes == bpb.truncated_bytes > 0
    assert bpb.bytes + bpb.excluded_bytes == bpb.document_bytes == full_bytes + len(EVAL_LONG_TEXT)
    if model_fixture == "llama_sp_model":  # the tokenizer adds its BOS
        assert model.view.prefix_ids and "own prefix" in bpb.context
    else:  # GPT-2 style: a BOS token that the tokenizer does not add is prepended
        assert not model.view.prefix_ids and bpb.context.startswith("BOS '<|endoftext|>', prepended")
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


# ----------------------------------------------------------------------------------------------------------
# one convention across tokenizers with and without BOS (defect: the teacher without BOS and a bytes student
# with BOS were scored on different bytes)


def _real(asset: str, sub: str = "") -> tuple[str, Path | None]:
    return asset, (asset_path(asset) / sub if is_installed(asset) else None)


# (name, where the tokenizer comes from, expected context)
TOKENIZER_CASES = [
    ("gpt2", "gpt2-tokenizer", "BOS '<|endoftext|>', prepended"),  # has a BOS token, does not add it
    ("smollm2", "smollm2-135m", "BOS '<|im_start|>', prepended"),  # the same, SmolLM2's own tokenizer
    ("qwen3", "qwen3-tokenizer", "EOS '<|im_end|>', prepended"),  # no BOS token at all
    ("mistral", "mistral-tokenizer", "the tokenizer's own prefix '<s>'"),  # adds its BOS, dummy prefix
    ("bytes", "bytes", "the tokenizer's own prefix '<bos>'"),  # alm-pipeline's bytes tokenizer adds <bos>
    ("char", "char", "EOS '</s>', prepended"),  # test tokenizer with an EOS only
    ("char_bare", "char_bare", "none"),  # test tokenizer with neither: first tokens excluded, reported
]


@pytest.fixture(scope="module")
def convention_models(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    """A tiny random model for each tokenizer of TOKENIZER_CASES that is available here."""
    root = tmp_path_factory.mktemp("bpb_convention")
    sources: dict[str, Path | None] = {
        "gpt2-tokenizer": _real("gpt2-tokenizer")[1],
        "smollm2-135m": _real("smollm2-135m")[1],
        "qwen3-tokenizer": _real("qwen3-tokenizer")[1],
        "mistral-tokenizer": _real("mistral-tokenizer")[1],
        "char": tokenizer_dirs["char"],
    }
    build_byte_tokenizer().save_pretrained(str(root / "tok_bytes"))
    sources["bytes"] = root / "tok_bytes"
    sources["char_bare"] = factories.make_tokenizer("char_bare", root / "tok_char_bare")
    models = {}
    for name, source, _ in TOKENIZER_CASES:
        if sources[source] is not None:
            models[name] = factories.make_model("llama", sources[source], root / f"model_{name}")
    return models


@pytest.mark.parametrize(("name", "source", "context"), TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_every_model_scores_every_byte(convention_models, name, source, context):
    """With and without a BOS, every model scores every byte of the documents (the first token from its BOS or
    EOS token); only a tokenizer with neither leaves the first tokens out, and reports their bytes."""
    if name not in convention_models:
        pytest.skip(f"{source} is not installed (run scripts/setup.sh)")
    model_dir = convention_models[name]
    model = load_eval_model(str(model_dir))
    bpb = model_bits_per_byte(model, EVAL_TEXTS, max_length=512, batch_tokens=256)
    document_bytes = sum(len(t.encode("utf-8")) for t in EVAL_TEXTS)
    assert bpb.context.startswith(context) and first_token_context(model.view).description == bpb.context
    assert bpb.document_bytes == document_bytes and bpb.truncated_bytes == 0 and bpb.truncated_docs == 0
    assert bpb.bytes + bpb.excluded_bytes == document_bytes
    if name == "char_bare":
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        first = [tok(t, return_offsets_mapping=True)["offset_mapping"][0][1] for t in EVAL_TEXTS]
        assert bpb.excluded_bytes == sum(
            len(t[:end].encode("utf-8")) for t, end in zip(EVAL_TEXTS, first, strict=True)
        )
        assert bpb.excluded_bytes == len(EVAL_TEXTS)  # one character each (ASCII first characters)
    else:
        assert bpb.bytes == document_bytes and bpb.excluded_bytes == 0
    expected, nbytes, ntokens = reference_bits_per_byte(model_dir, EVAL_TEXTS, 512)
    assert (bpb.bytes, bpb.predicted_tokens) == (nbytes, ntokens)
    assert bpb.bits_per_byte == pytest.approx(expected, rel=1e-6)
