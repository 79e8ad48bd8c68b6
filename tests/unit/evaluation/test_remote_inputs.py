"""Evaluation inputs and outputs on object storage (a real S3 server): a model folder, a run directory, a text
file and a task file on ``s3://`` are read through local copies, and the JSON result lands at a URI."""

from __future__ import annotations

import json

import pytest

from alm_pipeline.evaluation.models import EvalError, resolve_model_dir
from alm_pipeline.evaluation.run import EvalConfig, run_evaluation, write_json
from alm_pipeline.storage import location, upload_folder
from tests.factories import EVAL_TEXTS, write_texts


def test_model_and_data_on_s3_score_like_local(s3_bucket, tmp_path, monkeypatch, gpt2_bl_model):
    monkeypatch.setenv("ALM_PIPELINE_HOME", str(tmp_path / "home"))
    data = write_texts(tmp_path / "texts.jsonl", EVAL_TEXTS)
    upload_folder(gpt2_bl_model, f"{s3_bucket}/runs/r1/final")
    location(f"{s3_bucket}/data/texts.jsonl").write_bytes(data.read_bytes())

    local = run_evaluation(EvalConfig(model=(f"m={gpt2_bl_model}",), data=(f"d={data}",), max_length=64))
    remote = run_evaluation(
        EvalConfig(
            model=(f"m={s3_bucket}/runs/r1",), data=(f"d={s3_bucket}/data/texts.jsonl",), max_length=64
        )
    )
    assert remote["models"]["m"]["model"]["chosen_as"].startswith("final/ of the run directory")
    bpb_local = local["models"]["m"]["bits_per_byte"]["d"]["bits_per_byte"]
    bpb_remote = remote["models"]["m"]["bits_per_byte"]["d"]["bits_per_byte"]
    assert bpb_remote == pytest.approx(bpb_local, rel=1e-6)

    write_json(f"{s3_bucket}/out/eval.json", remote)
    assert json.loads(location(f"{s3_bucket}/out/eval.json").read_bytes())["table"] == remote["table"]
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_remote_model_missing_is_a_clear_error(s3_bucket):
    with pytest.raises(EvalError, match=rf"{s3_bucket}/nothing: no model here"):
        resolve_model_dir(f"{s3_bucket}/nothing")
