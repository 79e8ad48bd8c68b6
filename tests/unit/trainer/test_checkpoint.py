"""Checkpoints (alm_pipeline.trainer.checkpoint): a resumed run gives the same curve, mismatches are
refused."""

from __future__ import annotations

import numpy as np
import pytest

from alm_pipeline.trainer.checkpoint import find_latest_checkpoint
from alm_pipeline.trainer.driver import train_local
from alm_pipeline.trainer.errors import TrainingError
from alm_pipeline.trainer.metrics import read_metrics_csv
from tests.factories import losses, train_config


def test_resume_gives_the_same_curve_and_refuses_mismatches(small_aligned, gpt2_bl_model, tmp_path):
    kw = {"init_from": str(gpt2_bl_model), "steps": 6, "checkpoint_every": 3}
    full = train_local(train_config(small_aligned, tmp_path / "full", **kw))
    # the same run, interrupted right after step 4 (its last checkpoint is step 3), then resumed
    with pytest.raises(RuntimeError, match="injected failure after step 4"):
        train_local(train_config(small_aligned, tmp_path / "part", fail_at_step=4, **kw))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train_local(train_config(small_aligned, tmp_path / "part", **kw))
    resumed = train_local(train_config(small_aligned, tmp_path / "part", resume=True, fail_at_step=4, **kw))
    assert resumed.start_step == 3 and resumed.steps == 6
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    np.testing.assert_allclose(losses(resumed.history), losses(full.history)[3:], rtol=1e-6, atol=1e-9)
    curve = read_metrics_csv(tmp_path / "part" / "metrics.csv")  # one curve, steps 4.. rewritten once
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in curve], losses(full.history), rtol=1e-6, atol=1e-9)
    # a checkpoint copied only in part (a file shorter than recorded) is never resumed from
    import shutil

    latest = find_latest_checkpoint(tmp_path / "part")
    broken = latest.with_name("checkpoint-000099")
    shutil.copytree(latest, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert find_latest_checkpoint(tmp_path / "part") == latest
    with pytest.raises(Exception, match="settings differ.*batch_size"):
        train_local(
            train_config(small_aligned, tmp_path / "part", resume=True, **{**kw, "steps": 8, "batch_size": 4})
        )
