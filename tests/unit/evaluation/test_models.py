"""Which model folder a path names (alm_pipeline.evaluation.models.resolve_model_dir)."""

from __future__ import annotations

import pytest

from alm_pipeline.evaluation.models import EvalError, resolve_model_dir


def test_model_dir_resolution(tmp_path):
    run = tmp_path / "run"
    for name in (
        "checkpoints/checkpoint-000010",
        "checkpoints/checkpoint-000020",
        "checkpoints/checkpoint-000030",
    ):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    for step in (10, 20):
        (run / "checkpoints" / f"checkpoint-{step:06d}" / "trainer_state.json").write_text(
            f'{{"step": {step}}}'
        )
    path, how = resolve_model_dir(run)
    assert path.endswith("checkpoint-000020") and "step 20" in how  # 30 is incomplete
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert resolve_model_dir(run)[0] == str(run / "final")
    assert resolve_model_dir(run / "final")[1] == "model folder"
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "a" / "config.json").write_text("{}")
    assert resolve_model_dir(other)[0] == str(other / "a")
    (other / "b" / "inner").mkdir(parents=True)
    (other / "b" / "inner" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="several model folders"):
        resolve_model_dir(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no model here"):
        resolve_model_dir(tmp_path / "empty")
