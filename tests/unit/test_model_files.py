"""check_model (alm_pipeline.model_files): a model folder that would fail to load is refused up front, naming the
folder or file; a good one (a real saved model) passes."""

from __future__ import annotations

import json
import shutil

import pytest

from alm_pipeline.model_files import ModelFilesError, check_model


def test_a_saved_model_passes(gpt2_bl_model, llama_sp_model):
    check_model(gpt2_bl_model, "--teacher")
    check_model(str(llama_sp_model), "--teacher")


def test_broken_model_folders_are_refused(tmp_path, gpt2_bl_model, tokenizer_dirs):
    with pytest.raises(
        ModelFilesError, match=r"--teacher .*tok_byte_level: not a model folder \(no config.json"
    ):
        check_model(tokenizer_dirs["byte_level"], "--teacher")

    cut = tmp_path / "truncated"
    shutil.copytree(gpt2_bl_model, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFilesError, match=r"truncated/model.safetensors is corrupt or truncated"):
        check_model(cut, "--teacher")

    garbage = tmp_path / "garbage"
    shutil.copytree(gpt2_bl_model, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(ModelFilesError, match="corrupt or truncated"):
        check_model(garbage, "--init-from")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(gpt2_bl_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="no_weights: no weights"):
        check_model(no_weights, "--student")

    sharded = tmp_path / "sharded"
    shutil.copytree(gpt2_bl_model, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFilesError, match="missing: model-00002-of-00002.safetensors"):
        check_model(sharded, "--teacher")

    with pytest.raises(ModelFilesError, match="is a file; give the model's folder"):
        check_model(gpt2_bl_model / "config.json", "--teacher")
    with pytest.raises(ModelFilesError, match="cannot load its config"):
        check_model(tmp_path / "no" / "such-model", "--teacher")
