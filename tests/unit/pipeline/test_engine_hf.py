"""The hf teacher engine against an independent plain transformers computation."""

from __future__ import annotations

import numpy as np
import pytest

from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from tests.factories import reference_scores

TEXTS = [
    "Hello world, a first document.",
    "Short",
    "emoji 👩‍💻 café 中文 <|endoftext|> <s>\r\n\ttab " * 3,
    "x",
]


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_logprob_and_boundary_match_plain_forward(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    view = load_byte_view(model_dir)
    seqs = [view.encode(t).token_ids for t in TEXTS]
    # tiny budgets force several batches and many LM-head slices
    engine = HFTeacherEngine(
        HFEngineConfig(model=str(model_dir), max_batch_tokens=96, max_logit_elements=2000),
        view.boundary_token_ids(),
        view.vocab_size,
    )
    for ids, (lp, bl) in zip(seqs, engine.score(seqs), strict=True):
        ref_lp, ref_bl = reference_scores(model_dir, view, ids)
        assert lp.dtype == np.float32 and bl.dtype == np.float32
        assert np.isnan(lp[0]) and np.isnan(ref_lp[0])
        np.testing.assert_allclose(lp[1:], ref_lp[1:], atol=1e-5)
        np.testing.assert_allclose(bl, ref_bl, atol=1e-5)
        assert (lp[1:] <= 0).all() and (bl <= 0).all()


def test_batching_does_not_change_results(llama_sp_model):
    view = load_byte_view(llama_sp_model)
    seqs = [view.encode(t).token_ids for t in TEXTS]
    args = (view.boundary_token_ids(), view.vocab_size)
    one = HFTeacherEngine(HFEngineConfig(model=str(llama_sp_model), max_batch_tokens=1), *args).score(seqs)
    many = HFTeacherEngine(HFEngineConfig(model=str(llama_sp_model), max_batch_tokens=4096), *args).score(
        seqs
    )
    for (a, b), (c, d) in zip(one, many, strict=True):
        np.testing.assert_allclose(a[1:], c[1:], atol=1e-5)
        np.testing.assert_allclose(b, d, atol=1e-5)


def test_tokenizer_larger_than_model_is_refused(llama_sp_model):
    view = load_byte_view(llama_sp_model)
    with pytest.raises(ValueError, match="LM head only"):
        HFTeacherEngine(
            HFEngineConfig(model=str(llama_sp_model)), view.boundary_token_ids(), view.vocab_size + 5
        )
