"""Evaluation settings and inputs (alm_pipeline.evaluation.run): errors that name the problem."""

from __future__ import annotations

import pytest

from alm_pipeline.evaluation.bits_per_byte import model_bits_per_byte
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.evaluation.run import EvalConfig, plan, run_evaluation
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


def test_task_bigbench_means_every_installed_task(gpt2_bl_model):
    """--task bigbench reads every task the set-up step installs (checked in plan, no model loaded); naming
    one of them again adds nothing."""
    from alm_pipeline.assets import BIGBENCH, task_data_installed

    if not task_data_installed():
        pytest.skip(
            "the BIG-bench task files are not installed (python -m alm_pipeline.setup_assets prepare)"
        )
    todo = plan(EvalConfig(model=str(gpt2_bl_model), tasks=("winowhy", "bigbench")))
    assert list(todo.tasks) == ["winowhy", *(t for t in BIGBENCH.tasks if t != "winowhy")]
    assert all(len(task.examples) > 50 for task in todo.tasks.values())
    with pytest.raises(EvalError, match=r"--task needs a model"):
        EvalConfig(cache="c", tasks="bigbench")
