"""Evaluation settings and inputs (alm_pipeline.evaluation.run): errors that name the problem."""

from __future__ import annotations

import pytest

from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.evaluation.run import EvalConfig, run_evaluation
from tests.factories import write_texts


def test_config_and_input_errors(llama_sp_model, gpt2_bl_model, tmp_path):
    from tests import factories

    with pytest.raises(EvalError, match="nothing to evaluate"):
        EvalConfig()
    with pytest.raises(EvalError, match="needs a model"):
        EvalConfig(data="x.jsonl")
    with pytest.raises(EvalError, match=r"--cache-texts needs a teacher cache"):
        EvalConfig(model="m", cache_texts=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: missing text field"):
        run_evaluation(EvalConfig(model=str(llama_sp_model), data=str(bad)))
    single = write_texts(tmp_path / "single.jsonl", ["x"])
    model = load_eval_model(str(llama_sp_model))
    assert model_bits_per_byte(model, ["x"]).bytes == 1  # BOS: the single token is predicted
    gpt2 = load_eval_model(str(gpt2_bl_model))
    assert model_bits_per_byte(gpt2, ["x"]).bytes == 1  # its BOS token, prepended: predicted too
    bare = factories.make_model(
        "llama", factories.make_tokenizer("char_bare", tmp_path / "tok"), tmp_path / "bare"
    )
    with pytest.raises(EvalError, match="no predicted byte"):  # no BOS, no EOS: nothing predicts "x"
        run_evaluation(EvalConfig(model=str(bare), data=str(single)))
