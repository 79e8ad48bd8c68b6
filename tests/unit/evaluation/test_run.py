"""Evaluation settings and inputs (alm_pipeline.evaluation.run): errors that name the problem."""

from __future__ import annotations

import pytest

from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.evaluation.run import EvalConfig, run_evaluation
from tests.factories import write_texts


def test_config_and_input_errors(llama_sp_model, gpt2_bl_model, tmp_path):
    with pytest.raises(EvalError, match="nothing to evaluate"):
        EvalConfig()
    with pytest.raises(EvalError, match="needs a model"):
        EvalConfig(data="x.jsonl")
    with pytest.raises(EvalError, match=r"cache_texts \(--cache-texts\) needs a teacher cache"):
        EvalConfig(model="m", cache_texts=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: missing text field"):
        run_evaluation(EvalConfig(model=str(llama_sp_model), data=str(bad)))
    single = write_texts(tmp_path / "single.jsonl", ["x"])
    model = load_eval_model(str(llama_sp_model))
    assert model_bits_per_byte(model, ["x"]).bytes == 1  # BOS: the single token is predicted
    with pytest.raises(EvalError, match="no predicted byte"):
        run_evaluation(EvalConfig(model=str(gpt2_bl_model), data=str(single)))
