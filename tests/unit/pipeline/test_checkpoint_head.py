"""The LM head read from the checkpoint alone (alm_pipeline.pipeline.checkpoint_head): tied and untied heads
equal transformers' own; logit post-processing it does not know is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alm_pipeline.modeling import LogitRules
from alm_pipeline.pipeline.checkpoint_head import load_lm_head


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model"])
def test_lm_head_is_read_from_the_checkpoint_alone(request, model_fixture):
    """Untied (Llama) and tied (GPT-2: lm_head = transformer.wte) heads equal transformers' own."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model_fixture)
    head = load_lm_head(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.testing.assert_close(head.weight, model.get_output_embeddings().weight, rtol=0, atol=0)
    assert head.rules == LogitRules(scale=None, softcap=None)


def test_unknown_logit_postprocessing_is_refused(tmp_path, llama_sp_model):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_sp_model, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    cfg["logit_scale"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(cfg))
    head = load_lm_head(str(model_dir))
    assert head.rules == LogitRules(scale=0.5, softcap=30.0)
    cfg["output_logit_multiplier"] = 3.0
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="output_logit_multiplier=3.0 may change the logits"):
        load_lm_head(str(model_dir))
