"""Checkpoints (alm_pipeline.trainer.checkpoint): a resumed run gives the same curve, mismatches are
refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alm_pipeline.trainer.checkpoint import (
    OPTIMIZER_FILE,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_name,
    find_latest_checkpoint,
)
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


class _RunsCode:
    """Unpickling this touches a file: what a crafted checkpoint file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_checkpoint_file_that_would_run_code(small_aligned, gpt2_bl_model, tmp_path):
    """A crafted optimizer.pt (an object whose unpickling runs code), with the size recorded in
    trainer_state.json updated so the checkpoint looks complete: --resume refuses it by name, and the code never
    runs (with torch.load(weights_only=False) the file was touched and the resumed run finished normally)."""
    out = tmp_path / "run"
    kw = {"init_from": str(gpt2_bl_model), "steps": 3, "checkpoint_every": 1, "keep_checkpoints": 0}
    train_local(train_config(small_aligned, out, **kw))
    shutil.rmtree(out / "checkpoints" / checkpoint_name(3))
    shutil.rmtree(out / "final")
    victim = out / "checkpoints" / checkpoint_name(2)
    marker = tmp_path / "code-ran"
    optimizer_state = torch.load(victim / OPTIMIZER_FILE, weights_only=True)  # the real one, plus a payload
    optimizer_state["param_groups"][0]["note"] = _RunsCode(marker)
    torch.save(optimizer_state, victim / OPTIMIZER_FILE)
    state = json.loads((victim / TRAINER_STATE).read_text())
    state["files"][OPTIMIZER_FILE] = (victim / OPTIMIZER_FILE).stat().st_size
    (victim / TRAINER_STATE).write_text(json.dumps(state))
    assert find_latest_checkpoint(out) == victim  # it passes the completeness check

    with pytest.raises(CheckpointError, match=rf"{OPTIMIZER_FILE}: refused .* could run code"):
        train_local(train_config(small_aligned, out, resume=True, **kw))
    assert not marker.exists()
