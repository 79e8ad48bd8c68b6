"""metrics.csv (alm_pipeline.trainer.metrics): a resumed run rewinds and backfills."""

from __future__ import annotations

import pytest

from alm_pipeline.trainer.metrics import read_metrics_csv


def test_metrics_logger_rewinds_and_backfills(tmp_path):
    from alm_pipeline.trainer.metrics import MetricsLogger

    cols = ["step", "loss", "lr"]
    log = MetricsLogger(tmp_path, cols, total_steps=5, tensorboard=True, console=False)
    for s in range(1, 5):
        log.log({"step": s, "loss": 1.0 / s, "lr": 0.1})
    log.log({"step": 3, "loss": 0.5, "lr": 0.1})  # a restart from the step-2 checkpoint replays step 3
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics_csv(tmp_path / "metrics.csv")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.5),
    ]
    # a resumed run (checkpoint at step 5) whose predecessor logged only up to step 3: rows 4, 5 come back
    # from the checkpoint, rows after 5 are dropped
    backfill = [{"step": s, "loss": 0.1 * s, "lr": 0.1} for s in (2, 3, 4, 5)]
    log = MetricsLogger(
        tmp_path, cols, total_steps=8, resume_step=5, backfill=backfill, tensorboard=False, console=False
    )
    log.log({"step": 6, "loss": 0.06, "lr": 0.1})
    log.close()
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[3]["loss"] == pytest.approx(0.4)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
