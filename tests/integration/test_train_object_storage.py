"""``train --output s3://...`` end to end against a real S3 server (SeaweedFS): Ray Train's storage at the URI,
a worker failure restarted from a checkpoint on the bucket, ``--resume`` from the bucket, ``final/``, run.json,
metrics.csv and TensorBoard files at the URI, the same curve as a local run, and nothing named ``s3:`` on the
local disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from alm_pipeline.storage import Location, local_copy, location
from alm_pipeline.trainer.checkpoint import list_checkpoints
from alm_pipeline.trainer.driver import RAY_SNAPSHOT, run_training, train_local
from alm_pipeline.trainer.metrics import read_metrics_csv
from tests.factories import losses, train_config

# Until the object-store output lock is merged, output_lock refuses URIs: only that refusal may fail these tests

KW = {"steps": 6, "checkpoint_every": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def local_curve(tmp_path_factory, self_aligned, gpt2_bl_model) -> np.ndarray:
    """The losses of the same run on the local disk, uninterrupted."""
    out = tmp_path_factory.mktemp("local-run")
    return losses(train_local(train_config(self_aligned, out, init_from=str(gpt2_bl_model), **KW)).history)


def _s3_names_on_disk(*roots: Path) -> set[str]:
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found |= {os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith("s3:")}
    return found


def _tmp_top_level() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("s3:")}


def _names(loc: Location) -> set[str]:
    base = len(loc.path) + 1
    return {i.path[base:] for i in loc.list(recursive=True) if i.is_file}


def _check_run(run: str, result, curve: np.ndarray, tmp_path: Path) -> None:
    """What a finished 6-step run leaves at the URI ``run``."""
    root = location(run)
    assert result.steps == 6 and isinstance(result.output, Location) and result.output.uri == run
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]  # --keep-checkpoints 3 (the default)
    assert isinstance(result.final_checkpoint, Location) and result.final_checkpoint.uri == f"{run}/final"
    final = _names(result.final_checkpoint)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= final and "optimizer.pt" not in final
    local_metrics = tmp_path / "metrics.csv"
    local_metrics.write_bytes((root / "metrics.csv").read_bytes())
    rows = read_metrics_csv(local_metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one curve, the replayed steps written once
    np.testing.assert_allclose([r["loss"] for r in rows], curve, rtol=1e-5, atol=1e-8)
    run_json = (root / "run.json").read_json()
    assert run_json["steps"] == 6 and run_json["final_checkpoint"] == f"{run}/final"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local_copy(result.final_checkpoint, tmp_path / "copies"))
    assert model.config.vocab_size > 0


@pytest.mark.ray
def test_ray_train_on_s3_restarts_and_resumes_from_the_bucket(
    local_curve, self_aligned, gpt2_bl_model, s3_bucket, tmp_path, monkeypatch
):
    """Ray Train with ``storage_path=s3://...``: a worker failure after step 3 is restarted from the step-2
    checkpoint on the bucket (FailureConfig); with the newest checkpoint then deleted from the bucket, ``--resume``
    continues from the step-4 one (Ray Train's record of the run, on the bucket, is dropped); both runs give the
    local run's curve and everything lands at the URI."""
    import ray

    monkeypatch.chdir(tmp_path)
    tmp_before = _tmp_top_level()
    run = f"{s3_bucket}/runs/ray"
    kw = {**KW, "init_from": str(gpt2_bl_model), "tensorboard": True}
    ray.shutdown()  # the workers inherit the bucket's AWS_* variables only from a Ray started now
    try:
        first = run_training(train_config(self_aligned, run, **kw, fail_at_step=3, max_failures=1))
        assert location(f"{run}/.injected_failure").exists()  # the failure did happen
        _check_run(run, first, local_curve, tmp_path)
        assert any(n.startswith("tensorboard/events.out.tfevents.") for n in _names(location(run)))
        assert "checkpoint-000006" in location(f"{run}/checkpoints/{RAY_SNAPSHOT}").read_text()
        location(f"{run}/checkpoints/checkpoint-000006").remove_tree()
        said: list[str] = []
        result = run_training(train_config(self_aligned, run, resume=True, **kw), say=said.append)
    finally:
        ray.shutdown()
    assert result.start_step == 4 and [r["step"] for r in result.history] == [5, 6]
    expected = "naming checkpoint-000006, which no longer exist; resuming from checkpoint-000004 (step 4)"
    assert any(expected in m for m in said), said
    _check_run(run, result, local_curve, tmp_path)
    assert not _s3_names_on_disk(tmp_path) and _tmp_top_level() == tmp_before


def test_train_local_on_s3_resumes_from_the_bucket(
    local_curve, self_aligned, gpt2_bl_model, s3_bucket, tmp_path, monkeypatch
):
    """train_local (no Ray) with an ``s3://`` output: killed after step 3, resumed from the bucket's step-2
    checkpoint (a local copy), finished with the local run's curve; ``--overwrite`` empties the URI's run."""
    monkeypatch.chdir(tmp_path)
    tmp_before = _tmp_top_level()
    run = f"{s3_bucket}/runs/local"
    kw = {**KW, "init_from": str(gpt2_bl_model)}
    with pytest.raises(RuntimeError) as failed:
        train_local(train_config(self_aligned, run, fail_at_step=3, **kw))
    assert "injected failure after step 3" in str(failed.value)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    result = train_local(train_config(self_aligned, run, resume=True, fail_at_step=3, **kw))
    assert result.start_step == 2 and [r["step"] for r in result.history] == [3, 4, 5, 6]
    _check_run(run, result, local_curve, tmp_path)
    again = train_local(train_config(self_aligned, run, overwrite=True, **{**kw, "steps": 2}))
    assert again.start_step == 0 and [s for s, _ in list_checkpoints(run)] == [2]
    assert not _s3_names_on_disk(tmp_path) and _tmp_top_level() == tmp_before
